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
    from latent_vae.models.loading import build_autoencoder
    from latent_vae.config import ModelConfig

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
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
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
