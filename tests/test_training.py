"""Training behaviour a user relies on: it learns, it exports a stock model, it resumes exactly,
bad inputs are skipped and counted, the perceptual loss never runs on a random backbone."""

import json
from pathlib import Path

import pytest
import torch
from conftest import fast_config, reset_accelerate, run_python, trained_run

from latent_vae.config import ModelConfig, load_config
from latent_vae.data.datasets import ValidationDataset
from latent_vae.data.sources import sample_photo_sources
from latent_vae.errors import PerceptualWeightsUnavailable
from latent_vae.models.loading import build_autoencoder, load_autoencoder
from latent_vae.models.stock import reconstruct
from latent_vae.train.checkpoint import list_checkpoints, load_tensors, load_training_state
from latent_vae.train.loop import train


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    """The default KL recipe (tiny-kl-f4, the dataclass defaults), 250 steps (~1 min on 2 cores), GAN from 150."""
    return trained_run(tmp_path_factory, "kl", "train.max_steps=250", "gan.start=150", "train.val_every=250",
                       "train.checkpoint_every=1000", "reconstruction.perceptual_weight=0", "logging.image_every=125")


def test_validation_psnr_rises_on_real_photos(kl_run):
    _, summary = kl_run
    before, after = summary.initial_val_metrics["psnr"], summary.val_metrics["psnr"]
    print(f"validation PSNR {before:.2f} dB -> {after:.2f} dB, SSIM "
          f"{summary.initial_val_metrics['ssim']:.3f} -> {summary.val_metrics['ssim']:.3f}")
    assert after > before + 3.0
    assert summary.val_metrics["ssim"] > summary.initial_val_metrics["ssim"] + 0.1
    assert summary.skipped_steps == 0 and summary.failed_inputs == 0


STOCK_RECONSTRUCTION = """
import sys, torch
from diffusers import AutoencoderKL
model = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
images = torch.load(sys.argv[2])
with torch.no_grad():
    out = model.decode(model.encode(images).latent_dist.mode()).sample
torch.save(out, sys.argv[3])
assert "latent_vae" not in sys.modules, "the stock load must not need latent_vae"
print("scaling_factor", model.config.scaling_factor)
"""


def test_exported_model_loads_in_plain_diffusers_with_bit_identical_outputs(kl_run, tmp_path):
    out, summary = kl_run
    model_dir = out / "model"
    assert summary.model_dir == model_dir and (model_dir / "diffusion_pytorch_model.safetensors").is_file()
    _, val = sample_photo_sources()
    images = torch.stack([ValidationDataset(val, load_config().data)[i]["pixel_values"] for i in range(2)])
    torch.save(images, tmp_path / "images.pt")
    result = run_python(STOCK_RECONSTRUCTION, str(model_dir), str(tmp_path / "images.pt"), str(tmp_path / "stock.pt"))
    assert result.returncode == 0, result.stderr
    stock = torch.load(tmp_path / "stock.pt")

    # In process: the EMA weights of the final checkpoint in our preset-built model.
    vae = build_autoencoder(ModelConfig()).eval()  # the default preset
    ema = load_tensors(list_checkpoints(out / "checkpoints")[-1] / "ema.safetensors")
    vae.load_state_dict({k[len("shadow."):]: v for k, v in ema.items() if k.startswith("shadow.")})
    with torch.no_grad():
        ours = reconstruct(vae, images)
    assert torch.equal(stock, ours)
    scaling = float(result.stdout.split("scaling_factor")[1])
    assert scaling != 1.0 and 0.05 < scaling < 20  # 1/std of the trained latents, not the preset's placeholder


def test_run_directory_logs_and_model_card(kl_run):
    out, summary = kl_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/nll", "train/kl", "train/lr", "train/g_loss", "train/d_loss", "train/gan_weight",
            "train/logits_real", "train/ae_grad_norm", "val/psnr", "val/ssim"} <= scalars
    assert "reconstructions" in events.Tags()["images"]
    assert len(list((out / "samples").glob("reconstructions-*.png"))) >= 2
    card = (out / "model" / "README.md").read_text()
    assert "AutoencoderKL.from_pretrained" in card and "steps: 250" in card and "psnr" in card
    assert load_config(out / "config.yaml").train.max_steps == 250
    assert json.loads((out / "summary.json").read_text())["steps"] == 250
    assert "perceptual loss: off" in (out / "train.log").read_text()


def all_tensors(checkpoint: Path) -> dict:
    tensors = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update({f"{file.stem}/{k}": v for k, v in load_tensors(file).items()})
    states = load_training_state(checkpoint)
    for name in ("optimizer_ae", "optimizer_disc"):
        for pid, slots in states[name]["state"].items():
            tensors.update({f"{name}/{pid}/{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    return tensors


def test_resume_ends_with_identical_weights(tmp_path):
    """Stop after 3 steps (a finished run), resume it with a larger max_steps: bit-identical to 6 straight steps."""
    common = ["gan.start=2", "gan.lecam_weight=0.1", "train.ema_decay=0.9", "train.lr_warmup_steps=2",
              "train.lr_schedule=cosine", "export.scaling_images=0"]
    train(fast_config("train.max_steps=6", *common), tmp_path / "straight")
    first = train(fast_config("train.max_steps=3", *common), tmp_path / "resumed")
    assert first.steps == 3 and (tmp_path / "resumed" / "model").is_dir()
    resumed = train(fast_config("train.max_steps=6", "data.num_workers=2", *common), tmp_path / "resumed",
                    resume="latest")
    assert resumed.steps == 6
    a = all_tensors(list_checkpoints(tmp_path / "straight" / "checkpoints")[-1])
    b = all_tensors(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1])
    assert a.keys() == b.keys() and len(a) > 100
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_resume_refuses_an_incompatible_checkpoint(tmp_path):
    from latent_vae.errors import CheckpointError

    train(fast_config("train.max_steps=1", "model.preset=tiny-kl"), tmp_path)
    with pytest.raises(CheckpointError, match="model.preset: checkpoint 'tiny-kl' vs now 'tiny-vq'"):
        train(fast_config("train.max_steps=2", "model.preset=tiny-vq", "regularizer.kind=vq"), tmp_path, resume="latest")


def test_unreadable_inputs_are_skipped_counted_and_listed(photo_folder, tmp_path):
    (photo_folder / "zero.png").write_bytes(b"")
    (photo_folder / "notes.jpg").write_text("not an image")
    cut = photo_folder / "photo_01.png"
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    summary = train(fast_config(f"data.path={photo_folder}", "train.max_steps=4", "train.batch_size=3"), tmp_path)
    assert summary.steps == 4 and summary.failed_inputs == 3
    listed = (tmp_path / "skipped_inputs.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == ["notes.jpg", "photo_01.png", "zero.png"]
    assert all("\t" in line and line.split("\t")[1] for line in listed)


def test_missing_lpips_weights_stop_the_run_before_the_first_step(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PerceptualWeightsUnavailable, match=r"reconstruction.perceptual_weights=.*reconstruction.perceptual_weight=0"):
        train(fast_config("reconstruction.perceptual_weight=1.0"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    summary = train(fast_config("reconstruction.perceptual_weight=1.0", "reconstruction.perceptual_if_unavailable=disable",
                                "train.max_steps=1"), tmp_path / "run2")
    assert summary.steps == 1
    assert "perceptual loss: DISABLED" in (tmp_path / "run2" / "train.log").read_text()
    assert load_config(tmp_path / "run2" / "config.yaml").reconstruction.perceptual_weight == 0


def test_lpips_from_a_local_weights_file(tmp_path, lpips_weights):
    summary = train(fast_config("reconstruction.perceptual_weight=1.0", f"reconstruction.perceptual_weights={lpips_weights}",
                                "train.max_steps=2", "logging.log_every=1", "logging.trackers=[tensorboard]"), tmp_path)
    assert summary.steps == 2
    log = (tmp_path / "train.log").read_text()
    assert f"backbone weights from {lpips_weights}" in log


class GradientSpy(torch.optim.Adam):
    """Records the gradients each optimiser step receives."""

    record: list = []

    def step(self, closure=None):
        GradientSpy.record.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return super().step(closure)


def first_step_gradients(tmp_path, monkeypatch, *overrides):
    GradientSpy.record = []
    monkeypatch.setattr(torch.optim, "Adam", GradientSpy)
    train(fast_config("train.max_steps=1", "gan.start=0", *overrides), tmp_path)
    ae, disc = GradientSpy.record
    return ae, disc


def test_no_gradient_leaks_between_the_two_optimisers(tmp_path, monkeypatch):
    """The D gradient must not depend on the generator's GAN weight, nor the autoencoder's on
    the D-only LeCam term; at step 0 both see the same reconstructions."""
    ae_a, d_a = first_step_gradients(tmp_path / "a", monkeypatch, "gan.weight=0.5")
    ae_b, d_b = first_step_gradients(tmp_path / "b", monkeypatch, "gan.weight=5.0")
    assert all(torch.equal(x, y) for x, y in zip(d_a, d_b))
    assert not all(torch.equal(x, y) for x, y in zip(ae_a, ae_b))  # the knob does act on G
    ae_c, d_c = first_step_gradients(tmp_path / "c", monkeypatch, "gan.weight=0.5", "gan.lecam_weight=1.0")
    assert all(torch.equal(x, y) for x, y in zip(ae_a, ae_c))
    assert not all(torch.equal(x, y) for x, y in zip(d_a, d_c))


def test_decoder_only_finetune_freezes_the_latent_space_and_improves_reconstructions(kl_run, tmp_path):
    """Start from the trained KL model with a fresh (random) decoder: fine-tuning the
    decoder alone recovers the reconstructions, and the encoder — the latent space — never moves."""
    out, _ = kl_run
    start = load_autoencoder(str(out / "model"))
    torch.manual_seed(1)
    fresh = build_autoencoder(ModelConfig())  # the default preset
    start.decoder.load_state_dict(fresh.decoder.state_dict())
    start.post_quant_conv.load_state_dict(fresh.post_quant_conv.state_dict())
    start.save_pretrained(tmp_path / "start")
    tuned = train(fast_config(f"model.pretrained={tmp_path / 'start'}", "model.trainable=decoder",
                              "data.resolution=64", "data.resize=128", "train.batch_size=8", "train.max_steps=100",
                              "data.val_images=8", "train.val_every=1000"), tmp_path / "tuned")
    after = load_autoencoder(str(tuned.model_dir))
    frozen = [k for k in start.state_dict() if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(start.state_dict()[k], after.state_dict()[k]) for k in frozen)
    assert tuned.latent_drift["relative_l2"] == 0.0 and tuned.latent_drift["scaled_relative_l2"] == 0.0
    assert after.config.scaling_factor == start.config.scaling_factor  # what the diffusion model sees is unchanged
    print(f"validation PSNR {tuned.initial_val_metrics['psnr']:.2f} -> {tuned.val_metrics['psnr']:.2f} dB")
    assert tuned.val_metrics["psnr"] > tuned.initial_val_metrics["psnr"] + 2.0
    assert "the encoder was frozen" in (tuned.model_dir / "README.md").read_text()


def test_gradient_accumulation_equals_the_combined_batch(tmp_path, monkeypatch):
    """2 micro-batches of 2 images give the gradients of one batch of 4 (same samples, same noise).
    Without the GAN term: with it, λ is measured per micro-batch, as every trainer does."""
    GradientSpy.record = []
    monkeypatch.setattr(torch.optim, "Adam", GradientSpy)
    train(fast_config("train.max_steps=1", "train.batch_size=4", "regularizer.kl.weight=1e-3"), tmp_path / "batch")
    reset_accelerate()
    train(fast_config("train.max_steps=1", "train.batch_size=2", "train.grad_accum_steps=2", "regularizer.kl.weight=1e-3"),
          tmp_path / "accumulated")
    combined, accumulated = GradientSpy.record
    scale = max(g.abs().max() for g in combined)
    assert all((a - b).abs().max() <= 1e-5 * scale for a, b in zip(combined, accumulated))
