"""Every fast path computes what the plain path computes (tolerances stated per test)."""

import pytest
import torch
from conftest import fast_config, reset_accelerate

from latent_vae.losses.autoencoder_loss import AutoencoderLoss
from latent_vae.models.loading import load_autoencoder
from latent_vae.train.checkpoint import list_checkpoints, load_tensors
from latent_vae.train.loop import train

# GAN, LeCam and KL all active from the first step so every term of both losses is compared.
# The model and pixel loss the tolerances below were set on (not the quickstart's, which may change).
ALL_TERMS = ["model.preset=tiny-kl", "reconstruction.pixel_loss=l1", "gan.start=0", "gan.lecam_weight=0.1",
             "regularizer.kl.weight=1e-3", "train.max_steps=2"]


class Spy(torch.optim.Adam):
    record: list = []

    def step(self, closure=None):
        Spy.record.append(torch.cat([p.grad.flatten().float() for g in self.param_groups for p in g["params"]
                                     if p.grad is not None]))
        return super().step(closure)


def first_step_gradients(tmp_path, monkeypatch, *overrides):
    """Gradients of the autoencoder and the discriminator at step 0, flattened."""
    Spy.record = []
    monkeypatch.setattr(torch.optim, "Adam", Spy)
    reset_accelerate()
    train(fast_config(*ALL_TERMS, *overrides), tmp_path)
    return Spy.record[0], Spy.record[1]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def plain(tmp_path, monkeypatch):
    return first_step_gradients(tmp_path / "plain", monkeypatch)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


# fp16 autocast exists on CUDA only: on a CPU, Accelerate would run fp32 under that name (now refused, below).
FP16 = pytest.param("fp16", 0.9999, 0.01, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA"))


def test_fp16_on_a_cpu_is_refused_not_silently_fp32(tmp_path):
    from latent_vae.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(fast_config("train.mixed_precision=fp16"), tmp_path)


@pytest.mark.parametrize("precision, min_cosine, max_relative", [("bf16", 0.97, 0.25), FP16])
def test_mixed_precision_gradients_match_fp32(tmp_path, monkeypatch, precision, min_cosine, max_relative):
    """Autocast changes conv/matmul precision only (loss reductions and the adaptive weight stay
    fp32): the step-0 losses agree within 1% and the gradients point the same way. bf16 keeps 8
    mantissa bits, so at initialisation (heavy cancellation in the summed loss) its gradients
    differ from fp32 by up to ~20% in norm while their direction agrees (cosine > 0.97)."""
    losses = []
    original_g, original_d = AutoencoderLoss.generator_loss, AutoencoderLoss.discriminator_loss

    def record(original):
        def wrapper(*args, **kwargs):
            total, logs = original(*args, **kwargs)
            losses.append(total.item())
            return total, logs
        return wrapper

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", record(original_g))
    monkeypatch.setattr(AutoencoderLoss, "discriminator_loss", record(original_d))
    plain = first_step_gradients(tmp_path / "fp32", monkeypatch)
    fp32_losses, losses[:] = losses[:2], []
    fast = first_step_gradients(tmp_path / precision, monkeypatch, f"train.mixed_precision={precision}")
    assert losses[:2] == pytest.approx(fp32_losses, rel=0.01)
    for a, b in zip(fast, plain):
        assert cosine(a, b) > min_cosine
        assert relative_error(a, b) < max_relative


def test_channels_last_matches_plain(tmp_path, monkeypatch, plain):
    fast = first_step_gradients(tmp_path / "cl", monkeypatch, "train.channels_last=true")
    for a, b in zip(fast, plain):
        assert relative_error(a, b) < 1e-5


def test_compiled_modules_match_plain(tmp_path, monkeypatch, plain):
    """torch.compile through dynamo + AOTAutograd (the aot_eager backend keeps this test fast on CPU;
    inductor codegen is PyTorch's own responsibility). The compiled run must also export a stock model."""
    fast = first_step_gradients(tmp_path / "compiled", monkeypatch, "train.compile=true",
                                "train.compile_backend=aot_eager")
    for a, b in zip(fast, plain):
        assert relative_error(a, b) < 1e-5
    assert load_autoencoder(str(tmp_path / "compiled" / "model")) is not None


def test_fused_optimizer_matches_the_default(tmp_path):
    """Same update up to float rounding. (Adam normalises each coordinate, so gradients that are
    pure rounding noise — e.g. attention key biases — may move differently; hence a global bound.)"""
    weights = {}
    for name, extra in (("default", []), ("fused", ["train.fused_optimizer=true"])):
        train(fast_config(*ALL_TERMS, *extra), tmp_path / name)
        tensors = load_tensors(list_checkpoints(tmp_path / name / "checkpoints")[-1] / "autoencoder.safetensors")
        weights[name] = torch.cat([v.flatten() for v in tensors.values()])
    assert relative_error(weights["fused"], weights["default"]) < 1e-4


@pytest.mark.parametrize("preset", ["tiny-kl", "tiny-vq"])
def test_gradient_checkpointing_matches_plain(tmp_path, monkeypatch, preset):
    model = [f"model.preset={preset}", f"regularizer.kind={preset[-2:]}", "reconstruction.reduction=mean"]
    plain = first_step_gradients(tmp_path / "plain", monkeypatch, *model)
    fast = first_step_gradients(tmp_path / "gc", monkeypatch, *model, "model.gradient_checkpointing=true")
    for a, b in zip(fast, plain):
        assert relative_error(a, b) < 1e-5
