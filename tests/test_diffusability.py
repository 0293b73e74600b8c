"""Diffusability: the metrics on inputs with known answers, each regulariser against a direct
reimplementation of its published formula, the VF projection kept out of the export, the probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latent_vae.evaluate.diffusability import (
    PSNR_CAP,
    DiffusabilityStatistics,
    SpectrumStatistics,
    high_frequency_fraction,
    measure,
)


def _smooth_images(count: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] with a natural-image-like falling spectrum (upsampled noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


# --------------------------------------------------------------------------- metrics


def test_white_noise_has_the_area_fraction_of_power_above_half_nyquist():
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    spectrum = SpectrumStatistics()
    spectrum.update(noise)
    result = spectrum.result()
    # a flat spectrum: the share of frequency bins with |f| > 0.25 of [-0.5, 0.5)², i.e. 1 − π/16
    assert result["hf_fraction"] == pytest.approx(1 - math.pi / 16, abs=0.01)
    assert all(v == pytest.approx(1.0, abs=0.1) for v in result["profile"])


def test_a_constant_or_low_frequency_signal_has_no_high_frequency_power():
    y = torch.arange(16.0)
    wave = torch.cos(2 * math.pi * y / 16)[None, None, :, None].expand(2, 3, 16, 16)  # 1/16 cycles per sample
    assert high_frequency_fraction(wave).max() < 1e-12
    assert high_frequency_fraction(torch.full((1, 2, 8, 8), 3.0)).max() == 0.0


def test_a_latent_equal_to_the_downsampled_image_has_the_images_spectrum():
    images = _smooth_images()

    def encode(x):  # "latents" that are the image itself, area-downsampled ×4
        return F.avg_pool2d(x, 4)

    def decode(z):
        return F.interpolate(z, scale_factor=4, mode="nearest")

    statistics = DiffusabilityStatistics(encode, decode, 3, torch.device("cpu"), transforms=("hflip",))
    statistics.update(images)
    report = statistics.result()
    assert report["latent_hf_fraction"] == pytest.approx(report["image_hf_fraction"], rel=1e-9)
    assert report["spectrum"]["latent"] == pytest.approx(report["spectrum"]["image"], rel=1e-9)


def test_an_exactly_equivariant_map_has_capped_psnr_and_zero_latent_error():
    images = _smooth_images()
    statistics = DiffusabilityStatistics(lambda x: x.clone(), lambda z: z.clone(), 3, torch.device("cpu"))
    per_image = statistics.update(images)
    report = statistics.result()
    for name, values in report["equivariance"].items():
        assert values["psnr"] == PSNR_CAP, name
        assert values["latent_relative_error"] == 0.0, name
        assert torch.all(per_image[f"eq_psnr_{name}"] == PSNR_CAP)


def test_a_map_that_breaks_equivariance_is_measured():
    images = _smooth_images() * 0.5  # with the ramp inside [-1, 1]: PSNR's clamp never bites
    ramp = torch.linspace(-0.2, 0.2, 32)[None, None, None, :]  # position-dependent: breaks flips and rotations

    def encode(x):
        return x + F.interpolate(ramp.expand(1, 3, x.shape[-2], -1), size=x.shape[-2:], mode="bilinear")

    def decode(z):
        return z - F.interpolate(ramp.expand(1, 3, z.shape[-2], -1), size=z.shape[-2:], mode="bilinear")

    statistics = DiffusabilityStatistics(encode, decode, 3, torch.device("cpu"), transforms=("hflip", "rot180"))
    statistics.update(images)
    report = statistics.result()
    for name in ("hflip", "rot180"):
        # decode(flip(encode(x))) = flip(x) + flip(ramp) − ramp = flip(x) − 2·ramp: MSE is the ramp's, known
        expected_mse = (2 * ramp / 2).pow(2).mean().item()  # [-1, 1] -> [0, 1] halves the difference
        assert report["equivariance"][name]["psnr"] == pytest.approx(10 * math.log10(1 / expected_mse), abs=0.2)
        assert report["equivariance"][name]["latent_relative_error"] > 0.1


def test_channel_statistics_are_the_moments_of_the_latents():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(8, 1, 4, 4, generator=generator)
    latents = torch.cat([base * 2 + 1, -base * 2 + 1, torch.randn(8, 1, 4, 4, generator=generator)], dim=1)
    statistics = DiffusabilityStatistics(lambda x: latents, lambda z: z, 3, torch.device("cpu"), transforms=())
    statistics.update(torch.zeros(8, 3, 4, 4))
    channels = statistics.result()["channels"]["raw"]
    flat = latents.transpose(0, 1).flatten(1).double()
    assert channels["mean"] == pytest.approx(flat.mean(dim=1).tolist(), abs=1e-9)
    assert channels["std"] == pytest.approx(flat.std(dim=1, unbiased=False).tolist(), abs=1e-9)
    assert channels["correlation"][0][1] == pytest.approx(-1.0, abs=1e-9)
    assert channels["correlation"][0][0] == pytest.approx(1.0, abs=1e-9)


def test_measure_on_a_stock_model_reports_every_transform():
    from latent_vae.config import ModelConfig
    from latent_vae.models.loading import build_autoencoder

    torch.manual_seed(0)
    model = build_autoencoder(ModelConfig(preset="tiny-kl")).eval()
    report = measure(model, [_smooth_images(2, 32)])
    assert set(report["equivariance"]) == {"scale_0.5", "scale_0.75", "rot90", "rot180", "rot270", "hflip"}
    assert 0.0 < report["latent_hf_fraction"] < 1.0
    assert len(report["channels"]["scaled"]["std"]) == 4


# --------------------------------------------------------------------------- wiring: eval, compare, visualize


def test_eval_and_compare_report_diffusability_in_json_and_csv(tmp_path, photo_folder):
    import csv
    import json

    from latent_vae.cli import main
    from latent_vae.config import ModelConfig
    from latent_vae.models.loading import build_autoencoder

    torch.manual_seed(0)
    build_autoencoder(ModelConfig(preset="tiny-kl")).save_pretrained(tmp_path / "a")
    common = ["--data", str(photo_folder), "--resolution", "32", "--no-lpips", "--no-fid", "--num-workers", "0",
              "--diffusability"]
    assert main(["eval", "--model", str(tmp_path / "a"), *common, "--json", str(tmp_path / "e.json"),
                 "--csv", str(tmp_path / "e.csv")]) == 0
    summary = json.loads((tmp_path / "e.json").read_text())
    assert 0 < summary["metrics"]["latent_hf_fraction"] < 1
    assert summary["diffusability"]["equivariance"]["rot90"]["psnr"] == summary["metrics"]["eq_psnr_rot90"]
    with open(tmp_path / "e.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and float(rows[0]["eq_psnr_hflip"]) > 0
    mean_of_rows = sum(float(r["eq_psnr_scale_0.5"]) for r in rows) / len(rows)
    assert mean_of_rows == pytest.approx(summary["metrics"]["eq_psnr_scale_0.5"], rel=1e-5)
    assert main(["compare", "--model-a", str(tmp_path / "a"), "--model-b", str(tmp_path / "a"), *common,
                 "--json", str(tmp_path / "c.json")]) == 0
    comparison = json.loads((tmp_path / "c.json").read_text())
    assert comparison["a"]["metrics"]["latent_hf_fraction"] == comparison["b"]["metrics"]["latent_hf_fraction"]


def test_visualize_writes_the_spectrum_plot(tmp_path, photo_folder):
    from PIL import Image

    from latent_vae.cli import main
    from latent_vae.config import ModelConfig
    from latent_vae.models.loading import build_autoencoder

    build_autoencoder(ModelConfig(preset="tiny-kl")).save_pretrained(tmp_path / "m")
    assert main(["visualize", "--model", str(tmp_path / "m"), str(photo_folder), "--resolution", "32",
                 "--device", "cpu", "--output-dir", str(tmp_path / "viz")]) == 0
    assert Image.open(tmp_path / "viz" / "spectrum.png").size[0] > 100


# --------------------------------------------------------------------------- regularisers vs their formulas


def _tiny(preset: str = "tiny-kl", seed: int = 0):
    from latent_vae.config import ModelConfig
    from latent_vae.models.loading import build_autoencoder

    torch.manual_seed(seed)
    return build_autoencoder(ModelConfig(preset=preset))


def _l1(target, decoded):
    return (target - decoded).abs().mean()


def test_scale_equivariance_loss_is_the_published_downsampling_consistency():
    from latent_vae.config import ScaleEquivarianceConfig
    from latent_vae.losses.equivariance import scale_equivariance_loss

    vae = _tiny()
    images = _smooth_images(2, 64)
    latents = vae.encode(images).latent_dist.mode()
    cfg = ScaleEquivarianceConfig(weight=0.7, factors=[0.5, 0.25])
    loss, logs = scale_equivariance_loss(images, latents, lambda z: vae.decode(z).sample, _l1, cfg)
    expected = []
    for size in (4, 2):  # the 8x8 latent grid halved and quartered; the image to 8x the latent size
        small_z = F.interpolate(latents, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        small_x = F.interpolate(images, size=(8 * size, 8 * size), mode="bilinear", antialias=True,
                                align_corners=False)
        expected.append((small_x - vae.decode(small_z).sample).abs().mean())
    assert loss.item() == pytest.approx(0.7 * (expected[0] + expected[1]).item() / 2, rel=1e-5)
    assert logs["scale_equivariance"].item() == pytest.approx((expected[0] + expected[1]).item() / 2, rel=1e-5)
    loss.backward()
    assert vae.encoder.conv_out.weight.grad is not None  # the latents learn from it too, not only the decoder


def test_eq_vae_loss_is_the_transformed_reconstruction_on_the_drawn_steps():
    from latent_vae.config import EQVAEConfig
    from latent_vae.losses.equivariance import EQVAERegularizer

    vae = _tiny()
    images = _smooth_images(2, 64)
    latents = vae.encode(images).latent_dist.mode()
    regularizer = EQVAERegularizer(EQVAEConfig(weight=2.0, probability=0.5, scales=[0.5, 0.75],
                                               rotations=["rot90", "hflip"]), seed=3)
    draws = [regularizer.draw(step) for step in range(200)]
    assert 0.4 < sum(bool(d) for d in draws) / 200 < 0.6  # the per-step probability
    assert draws == [regularizer.draw(step) for step in range(200)]  # a pure function of (seed, step)
    step = next(s for s, d in enumerate(draws) if d and d[0] == "scale_0.75" and d[1] == "rot90")
    loss, _ = regularizer(images, latents, lambda z: vae.decode(z).sample, _l1, step)
    # direct: 8x8 latent -> round(0.75·8) = 6, image -> 48; then a quarter turn of both
    z = torch.rot90(F.interpolate(latents, size=(6, 6), mode="bilinear", antialias=True, align_corners=False), 1,
                    dims=(-2, -1))
    x = torch.rot90(F.interpolate(images, size=(48, 48), mode="bilinear", antialias=True, align_corners=False), 1,
                    dims=(-2, -1))
    assert loss.item() == pytest.approx(2.0 * (x - vae.decode(z).sample).abs().mean().item(), rel=1e-5)
    idle = next(s for s, d in enumerate(draws) if not d)
    assert regularizer(images, latents, lambda z: vae.decode(z).sample, _l1, idle)[0].item() == 0.0


def _lightningdit_vf_loss(z, aux_feature, distmat_margin, cos_margin):
    """VA-VAE's VF loss as hustvl/LightningDiT writes it (contperceptual.py), for comparison."""
    b, c = z.shape[:2]
    z_norm = F.normalize(z.reshape(b, c, -1), dim=1)
    aux_norm = F.normalize(aux_feature.reshape(b, aux_feature.shape[1], -1), dim=1)
    diff = torch.abs(torch.bmm(z_norm.transpose(1, 2), z_norm) - torch.bmm(aux_norm.transpose(1, 2), aux_norm))
    loss_1 = F.relu(diff - distmat_margin).mean()
    loss_2 = F.relu(1 - cos_margin - F.cosine_similarity(aux_feature, z)).mean()
    return loss_1 + loss_2


def test_vf_loss_is_vavaes_marginal_cosine_plus_marginal_distance_matrix():
    from latent_vae.config import VFLossConfig
    from latent_vae.losses.vf import vf_loss

    generator = torch.Generator().manual_seed(0)
    z, f = torch.randn(3, 16, 5, 5, generator=generator), torch.randn(3, 16, 5, 5, generator=generator)
    for cos_margin, distmat_margin in ((0.5, 0.25), (0.0, 0.0), (0.9, 0.05)):
        loss, _ = vf_loss(z, f, VFLossConfig(cos_margin=cos_margin, distmat_margin=distmat_margin))
        assert loss.item() == pytest.approx(_lightningdit_vf_loss(z, f, distmat_margin, cos_margin).item(), rel=1e-5)
    aligned, _ = vf_loss(f * 2.0, f, VFLossConfig())  # same directions: both margins absorb everything
    assert aligned.item() == 0.0


def _tiny_dinov2(folder=None):
    """A tiny randomly initialised DINOv2 (built in code; never a stand-in for real weights at run time)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=48, patch_size=8, image_size=64))
    if folder is not None:
        model.save_pretrained(folder)
    return model


def test_vf_adaptive_weight_is_the_gradient_norm_ratio_at_the_encoders_last_layer():
    from latent_vae.config import load_config
    from latent_vae.losses.autoencoder_loss import AutoencoderLoss
    from latent_vae.losses.diffusability import build_diffusability
    from latent_vae.losses.vf import VisionBackbone

    cfg = load_config(None, ["regularizer.vf.weight=0.1", "reconstruction.perceptual_weight=0",
                             "reconstruction.pixel_loss=l1", "regularizer.vf.image_size=64"])
    vae = _tiny()
    terms = build_diffusability(vae, cfg, VisionBackbone(_tiny_dinov2(), 64))
    images = _smooth_images(2, 64)
    latents = vae.encode(images).latent_dist.mode()
    recon = vae.decode(latents).sample
    rec_terms = AutoencoderLoss(cfg.reconstruction, cfg.gan).reconstruction_terms
    total, logs = terms(vae, images, latents, recon, torch.zeros(()), rec_terms, 0)
    layer = vae.encoder.conv_out.weight
    nll = (images - recon).abs().sum() / 2  # reduction "sum": over C·H·W, mean over the batch
    vf, _ = terms.vf(images, latents)
    g_nll = torch.autograd.grad(nll, layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf, layer, retain_graph=True)[0]
    weight = 0.1 * (g_nll.norm() / (g_vf.norm() + 1e-4))
    assert logs["vf_weight"].item() == pytest.approx(weight.item(), rel=1e-4)
    assert total.item() == pytest.approx((weight * vf).item(), rel=1e-4)


def test_missing_vf_backbone_weights_fail_naming_the_fix(tmp_path):
    from latent_vae.config import VFLossConfig
    from latent_vae.errors import USER_ERRORS, VisionBackboneUnavailable
    from latent_vae.losses.vf import load_vision_backbone

    with pytest.raises(VisionBackboneUnavailable, match="regularizer.vf.backbone") as caught:
        load_vision_backbone(VFLossConfig(weight=0.1, backbone=str(tmp_path / "no-such-model")))
    assert isinstance(caught.value, USER_ERRORS) and "regularizer.vf.weight=0" in str(caught.value)


def test_vf_with_a_frozen_encoder_is_refused():
    from latent_vae.config import load_config
    from latent_vae.errors import ConfigError

    with pytest.raises(ConfigError, match="model.trainable=all"):
        load_config(None, ["regularizer.vf.weight=0.1", "model.trainable=decoder"])


STOCK_LOAD = """
import sys, torch
from diffusers import AutoencoderKL
model = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model.decode(model.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()).sample
assert out.shape == (1, 3, 32, 32) and "latent_vae" not in sys.modules
print("stock ok")
"""


def test_training_with_all_three_regularisers_exports_a_stock_model_without_the_projection(tmp_path):
    from conftest import fast_config, run_python
    from safetensors.torch import load_file

    from latent_vae.train.loop import train

    _tiny_dinov2(tmp_path / "dinov2")
    summary = train(fast_config("train.max_steps=3", "regularizer.scale_equivariance.weight=0.5",
                                "regularizer.eq_vae.weight=1.0", "regularizer.eq_vae.probability=1.0",
                                "regularizer.vf.weight=0.1", f"regularizer.vf.backbone={tmp_path / 'dinov2'}",
                                "regularizer.vf.image_size=32", "data.val_images=2", "train.val_every=3",
                                "logging.diffusability=true"), tmp_path / "run")
    assert summary.steps == 3 and math.isfinite(summary.val_metrics["latent_hf_fraction"])
    assert "eq_psnr_rot90" in summary.val_metrics
    checkpoint = max((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    trained = load_file(checkpoint / "autoencoder.safetensors")
    assert "regularizer.diffusability.vf.projection.weight" in trained  # trained and checkpointed ...
    assert not any("backbone" in key or "dinov2" in key for key in trained)  # ... the frozen backbone is not
    exported = {k for f in (tmp_path / "run" / "model").glob("*.safetensors") for k in load_file(f)}
    assert exported and not any("projection" in k or "regularizer" in k for k in exported)
    result = run_python(STOCK_LOAD, str(tmp_path / "run" / "model"))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "VF loss: backbone" in log


def test_the_decoder_regularisers_serve_vq_models_through_the_straight_through_latents():
    from latent_vae.config import load_config
    from latent_vae.losses import build_regularizer
    from latent_vae.losses.autoencoder_loss import AutoencoderLoss

    cfg = load_config(None, ["model.preset=tiny-vq", "regularizer.kind=vq", "reconstruction.perceptual_weight=0",
                             "regularizer.scale_equivariance.weight=1", "regularizer.eq_vae.weight=1",
                             "regularizer.eq_vae.probability=1"])
    vae = _tiny("tiny-vq")
    regularizer = build_regularizer(vae, cfg)
    images = _smooth_images(2, 32)
    out = regularizer(vae.encode(images).latents, 0)
    rec_terms = AutoencoderLoss(cfg.reconstruction, cfg.gan).reconstruction_terms
    loss, logs = regularizer.diffusability(vae, images, out.latents, None, torch.zeros(()), rec_terms, 0)
    assert set(logs) == {"scale_equivariance", "eq_vae"} and torch.isfinite(loss)
    loss.backward()
    assert vae.encoder.conv_out.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- the diffusion probe


def test_probe_trains_the_same_denoiser_per_tokenizer_and_reports_held_out_loss(tmp_path, capsys):
    import json

    from conftest import write_photo_crops

    from latent_vae.cli import main

    write_photo_crops(tmp_path / "photos", count=8, size=32)
    _tiny("tiny-kl", seed=0).save_pretrained(tmp_path / "a")
    _tiny("tiny-kl", seed=0).save_pretrained(tmp_path / "same")
    _tiny("tiny-vq", seed=1).save_pretrained(tmp_path / "vq")
    args = ["probe", "--model", str(tmp_path / "a"), "--model", str(tmp_path / "same"), "--model", str(tmp_path / "vq"),
            "--data", str(tmp_path / "photos"), "--resolution", "32", "--held-out", "2", "--steps", "20",
            "--batch-size", "4", "--channels", "8", "16", "--timesteps", "100", "600", "--noise-draws", "2",
            "--eval-every", "10", "--samples", "2", "--sample-steps", "3", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    payload = json.loads((tmp_path / "out" / "probe.json").read_text())
    rows = {row["label"]: row for row in payload["tokenizers"]}
    assert set(rows) == {"a", "same", "vq"} and payload["settings"]["held_out_images"] == 2
    # identical tokenizers under the same seeds: identical probes (the budget and noise are shared)
    assert rows["a"]["held_out_loss"] == rows["same"]["held_out_loss"]
    assert rows["a"]["curve"] == rows["same"]["curve"] and len(rows["a"]["curve"]) == 2
    assert rows["vq"]["held_out_loss"] != rows["a"]["held_out_loss"]
    by_t = rows["a"]["held_out_loss_by_timestep"]
    assert rows["a"]["held_out_loss"] == pytest.approx((by_t["100"] + by_t["600"]) / 2)
    assert (tmp_path / "out" / "loss_curves.png").is_file() and (tmp_path / "out" / "samples.png").is_file()
    assert "held-out" in capsys.readouterr().out


def test_probe_denoiser_learns():
    from latent_vae.probe import ProbeOptions, build_denoiser, held_out_loss

    options = ProbeOptions(timesteps=(300,), noise_draws=2, channels=(8, 16))
    generator = torch.Generator().manual_seed(0)
    latents = F.interpolate(torch.randn(6, 4, 2, 2, generator=generator), size=(8, 8), mode="bilinear")
    denoiser = build_denoiser(4, 8, options.channels, 0)
    before = held_out_loss(denoiser, latents, options, torch.device("cpu"))[300]
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=3e-3)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    for _ in range(60):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(1000, (len(latents),), generator=generator)
        loss = F.mse_loss(denoiser(scheduler.add_noise(latents, noise, t), t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert held_out_loss(denoiser, latents, options, torch.device("cpu"))[300] < 0.7 * before


@pytest.mark.multiprocess
def test_probe_under_two_processes_equals_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import write_photo_crops

    write_photo_crops(tmp_path / "photos", count=8, size=32)
    _tiny("tiny-kl").save_pretrained(tmp_path / "a")
    args = ["--model", str(tmp_path / "a"), "--data", str(tmp_path / "photos"), "--resolution", "32", "--held-out",
            "2", "--steps", "10", "--batch-size", "4", "--channels", "8", "16", "--timesteps", "100", "600",
            "--noise-draws", "2", "--eval-every", "5", "--samples", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for nproc in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"] if nproc > 1 else []
        command = [sys.executable, *launcher, "-m", "latent_vae", "probe", *args,
                   "--output-dir", str(tmp_path / f"out{nproc}")]
        finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
        assert finished.returncode == 0, finished.stderr[-3000:]
        results.append(json.loads((tmp_path / f"out{nproc}" / "probe.json").read_text())["tokenizers"][0])
    single, double = results
    assert double["held_out_loss"] == pytest.approx(single["held_out_loss"], rel=1e-4)
    for a, b in zip(single["curve"], double["curve"]):
        assert b["held_out_loss"] == pytest.approx(a["held_out_loss"], rel=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_probe_fid_of_decoded_samples_against_held_out_images(tmp_path):
    from conftest import write_photo_crops
    from test_evaluation import SmallExtractor

    from latent_vae.data.sources import open_source
    from latent_vae.probe import ProbeOptions, run_probe, sample_fid

    extractor = SmallExtractor()
    images = _smooth_images(6, 32)
    assert sample_fid(images, images, extractor) == pytest.approx(0.0, abs=1e-3)
    assert sample_fid(images, -images, extractor) > 1e-3
    write_photo_crops(tmp_path / "photos", count=8, size=32)
    source, _ = open_source(str(tmp_path / "photos"))
    options = ProbeOptions(resolution=32, steps=4, batch_size=4, held_out=3, timesteps=(100,), noise_draws=1,
                           channels=(8, 16), eval_every=4, samples=3, sample_steps=2, fid=True)
    payload = run_probe([("a", _tiny())], source, options, tmp_path / "out", fid_extractor=extractor)
    assert math.isfinite(payload["tokenizers"][0]["fid"]) and payload["tokenizers"][0]["fid"] >= 0
