"""VQ tokenizer: codebook loss formulas, codebook health, stock VQModel export, multi-process codebooks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fast_config, reset_accelerate, run_python
from torch import nn

from latent_vae.config import ModelConfig, VQConfig, load_config
from latent_vae.data.datasets import ValidationDataset
from latent_vae.data.sources import sample_photo_sources
from latent_vae.losses.vq import VectorQuantizerTrainer, codebook_statistics, nearest_codes
from latent_vae.models.loading import build_autoencoder, load_autoencoder
from latent_vae.models.stock import decode_from_indices, encode_to_indices, reconstruct
from latent_vae.train.loop import train


def two_code_quantizer(reduction="sum", **vq_kwargs):
    """Codes e0 = (0, 0), e1 = (1, 1); regularizer.vq settings from keyword arguments."""
    embedding = nn.Embedding(2, 2)
    with torch.no_grad():
        embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    return VectorQuantizerTrainer(embedding, VQConfig(**vq_kwargs), reduction, seed=0), embedding


def one_token(values=(0.8, 0.6)):
    return torch.tensor(values).reshape(1, 2, 1, 1).requires_grad_(True)  # (B, D, h, w)


@pytest.mark.parametrize("legacy, grad_e, grad_z", [
    # ||z - e1||^2 = 0.2 over 2 elements (mean 0.1); e1 - z = (0.2, 0.4)
    (False, [0.2, 0.4], [-0.05, -0.1]),   # correct: full weight pulls e to z, beta=0.25 commits z
    (True, [0.05, 0.1], [-0.2, -0.4]),    # legacy (taming legacy=True / diffusers): beta on the codebook term
])
def test_codebook_loss_beta_placement(legacy, grad_e, grad_z):
    quantizer, embedding = two_code_quantizer(reduction="mean", beta=0.25, legacy_beta=legacy)
    z = one_token()
    out = quantizer.eval()(z, step=0)
    assert out.loss.item() == pytest.approx(0.1 + 0.25 * 0.1)
    out.loss.backward()
    assert embedding.weight.grad[1].tolist() == pytest.approx(grad_e)
    assert embedding.weight.grad[0].tolist() == [0.0, 0.0]
    assert z.grad.flatten().tolist() == pytest.approx(grad_z)


def test_codebook_weight_and_sum_reduction():
    quantizer, _ = two_code_quantizer(reduction="sum", weight=2.0)
    assert quantizer.eval()(one_token(), 0).loss.item() == pytest.approx(2.0 * (0.2 + 0.25 * 0.2))


def test_straight_through_estimator():
    quantizer, _ = two_code_quantizer()
    z = one_token()
    out = quantizer.eval()(z, 0)
    assert out.latents.flatten().tolist() == pytest.approx([1.0, 1.0])  # forward: the code
    out.latents.sum().backward()
    assert z.grad.flatten().tolist() == pytest.approx([1.0, 1.0])  # backward: identity to z


def test_ema_codebook_update_with_laplace_smoothing():
    quantizer, embedding = two_code_quantizer(ema_decay=0.5, ema_epsilon=1e-12, reduction="mean")
    assert not embedding.weight.requires_grad  # the codebook is not learned by gradient
    out = quantizer.train()(one_token(), 0)
    assert out.loss.item() == pytest.approx(0.25 * 0.1)  # commitment only
    # cluster sizes 0.5*[1,1] + 0.5*[0,1] = [0.5, 1]; sums 0.5*e + 0.5*[[0,0],[0.8,0.6]]
    assert quantizer.ema_cluster_size.tolist() == pytest.approx([0.5, 1.0])
    assert torch.allclose(embedding.weight, torch.tensor([[0.0, 0.0], [0.9, 0.8]]))


def test_usage_perplexity_and_dead_codes():
    stats = codebook_statistics(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert stats["usage"].item() == 0.5 and stats["perplexity"].item() == pytest.approx(2.0)
    quantizer, _ = two_code_quantizer(dead_after=2)
    for step in range(3):
        logs = quantizer.train()(one_token(), step).logs
    assert logs["dead_codes"].item() == 1.0 and logs["codebook_usage"].item() == 0.5



def test_dead_code_restart_replaces_only_dead_codes_with_recent_encoder_outputs():
    """e0 is never hit: after dead_after steps it is re-seeded from the buffer of recent encoder
    outputs (here only (0.8, 0.6) and (0.7, 0.9)); e1, in use, is left alone."""
    quantizer, embedding = two_code_quantizer(restart_dead=True, dead_after=2, reduction="mean")
    quantizer.train()(one_token(), 0)
    assert embedding.weight[0].tolist() == [0.0, 0.0]  # unused for 1 step: not dead yet
    logs = quantizer(one_token((0.7, 0.9)), 1).logs
    assert logs["restarted_codes"].item() == 1.0
    filled = quantizer.recent[:int(quantizer.recent_filled)].tolist()  # the draws pick among these rows
    assert filled == [pytest.approx([0.8, 0.6]), pytest.approx([0.7, 0.9])]
    assert embedding.weight[0].tolist() in (pytest.approx([0.8, 0.6]), pytest.approx([0.7, 0.9]))
    assert embedding.weight[1].tolist() == [1.0, 1.0]
    assert quantizer.steps_unused.tolist() == [0, 0]


def test_l2_normalised_codes_make_stock_lookup_equal_cosine_lookup():
    torch.manual_seed(0)
    codebook = nn.functional.normalize(torch.randn(512, 8), dim=1)
    z = torch.randn(4096, 8) * 3
    assert torch.equal(nearest_codes(z, codebook), nearest_codes(nn.functional.normalize(z, dim=1), codebook))


PHOTO_CROPS = None


def photo_crops():
    global PHOTO_CROPS
    if PHOTO_CROPS is None:
        source, _ = sample_photo_sources()
        dataset = ValidationDataset(source, load_config(None, ["data.resolution=64"]).data, crops=8)
        PHOTO_CROPS = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    return PHOTO_CROPS


def test_dead_code_restart_revives_a_collapsed_codebook(tmp_path):
    """All codes start in a far corner of latent space: only one is ever the nearest. Without
    restart the codebook stays collapsed; with it, unused codes are re-seeded from encoder outputs."""
    torch.manual_seed(0)
    vq = build_autoencoder(ModelConfig(preset="tiny-vq"))
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(5.0 + 1e-3 * torch.randn_like(vq.quantize.embedding.weight))
    vq.save_pretrained(tmp_path / "bad-init")
    usage = {}
    for restart in (False, True):
        train(fast_config(f"model.pretrained={tmp_path / 'bad-init'}", "regularizer.kind=vq", "data.resolution=64", "data.resize=128",
                          "train.batch_size=8", "train.max_steps=60", "reconstruction.reduction=mean",
                          # the optimiser and pixel loss this test was set on (the quickstart's former defaults)
                          "reconstruction.pixel_loss=l1", "train.learning_rate=1e-4", "train.adam_betas=[0.5,0.9]",
                          f"regularizer.vq.restart_dead={restart}", "regularizer.vq.dead_after=10"), tmp_path / f"run-{restart}")
        reset_accelerate()
        model = load_autoencoder(str(tmp_path / f"run-{restart}" / "model")).eval()
        usage[restart] = encode_to_indices(model, photo_crops()).unique().numel() / 256
    print(f"codebook usage after 60 steps: without restart {usage[False]:.1%}, with restart {usage[True]:.1%}")
    assert usage[False] <= 0.05
    assert usage[True] >= 0.8


STOCK_VQ = """
import sys, torch
from diffusers import VQModel
model = VQModel.from_pretrained(sys.argv[1]).eval()
images = torch.load(sys.argv[2])
with torch.no_grad():
    latents = model.encode(images).latents
    quantized, _, (_, _, ids) = model.quantize(latents)
    recon = model.decode(latents).sample
torch.save({"recon": recon, "ids": ids.reshape(latents.shape[0], latents.shape[2], latents.shape[3])}, sys.argv[3])
assert "latent_vae" not in sys.modules
"""


def test_vq_export_loads_in_stock_diffusers_with_identical_tokens_and_reconstructions(tmp_path):
    summary = train(fast_config("model.preset=tiny-vq", "regularizer.kind=vq", "reconstruction.reduction=mean", "train.max_steps=6",
                                "gan.start=3", "regularizer.vq.restart_dead=true", "regularizer.vq.dead_after=2",
                                "regularizer.vq.l2_normalize=true"), tmp_path / "run")
    images = photo_crops()[:4]
    torch.save(images, tmp_path / "images.pt")
    result = run_python(STOCK_VQ, str(summary.model_dir), str(tmp_path / "images.pt"), str(tmp_path / "stock.pt"))
    assert result.returncode == 0, result.stderr
    stock = torch.load(tmp_path / "stock.pt")
    model = load_autoencoder(str(summary.model_dir)).eval()
    with torch.no_grad():
        assert torch.equal(encode_to_indices(model, images), stock["ids"])
        assert torch.equal(reconstruct(model, images), stock["recon"])
        assert torch.allclose(decode_from_indices(model, stock["ids"]), stock["recon"], atol=1e-5)
    norms = model.quantize.embedding.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # l2-normalised codes exported as such


CODEBOOK_SPY = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import fast_config
import latent_vae.losses.vq as quantizer
from latent_vae.train.loop import train

snapshots = []
original = quantizer.VectorQuantizerTrainer._maintain_codebook

def spy(self, z, indices, step):
    logs = original(self, z, indices, step)
    snapshots.append(self.embedding.weight.detach().clone())
    return logs

quantizer.VectorQuantizerTrainer._maintain_codebook = spy
out, batch = sys.argv[1], sys.argv[2]
train(fast_config(f"train.batch_size={{batch}}", "model.preset=tiny-vq", "regularizer.kind=vq", "reconstruction.reduction=mean", "train.max_steps=2",
                  "regularizer.vq.ema_decay=0.9", "regularizer.vq.restart_dead=true", "regularizer.vq.dead_after=1",
                  "regularizer.vq.restart_buffer=64", "export.scaling_images=0"), out)
torch.save(snapshots, os.path.join(out, f"codebooks-{{os.environ.get('RANK', '0')}}.pt"))
"""


@pytest.mark.multiprocess
def test_codebooks_stay_identical_across_ranks_and_match_one_process(tmp_path):
    script = tmp_path / "spy.py"
    script.write_text(CODEBOOK_SPY.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"run{nproc}"
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(nproc)]
        result = subprocess.run([*launcher, str(script), str(out), str(batch)], capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = [torch.load(out / f"codebooks-{r}.pt") for r in range(nproc)]
    single, (rank0, rank1) = runs[1][0], runs[2]
    assert len(single) == len(rank0) == 2
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)  # EMA statistics are all-reduced and restarts decided identically
    for a, b in zip(single, rank0):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.equal(single[0], single[1])  # the codebook did change (EMA and restarts)


def test_vq_training_logs_codebook_health(tmp_path):
    train(fast_config("model.preset=tiny-vq", "regularizer.kind=vq", "reconstruction.reduction=mean", "train.max_steps=4", "logging.log_every=2",
                      "logging.trackers=[tensorboard]", "regularizer.vq.restart_dead=true", "regularizer.vq.dead_after=2"),
          tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/codebook_usage", "train/codebook_perplexity_batch", "train/dead_codes", "train/restarted_codes",
            "train/codebook_loss", "train/commitment_loss"} <= set(events.Tags()["scalars"])
