"""Latent-space tools: interpolation, sampling, visualisation and anomaly scores, through the
Python API and the four commands (interpolate, sample, visualize, score)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_config, reset_accelerate, write_photo_crops
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from latent_vae.cli import main
from latent_vae.config import ModelConfig
from latent_vae.data.images import GRID_PADDING, load_image
from latent_vae.data.sources import FolderSource, sample_photos_dir
from latent_vae.errors import ConfigError, PerceptualWeightsUnavailable
from latent_vae.latent_tools.common import load_model, open_inputs, unique_stems
from latent_vae.latent_tools.interpolation import interpolate_images, interpolation_path, latent_path, lerp, slerp
from latent_vae.latent_tools.sampling import fit_gaussian, prior_latents
from latent_vae.latent_tools.scoring import load_lpips, score_images, write_scores
from latent_vae.latent_tools.visualization import channel_grid, pca_rgb
from latent_vae.models.loading import build_autoencoder
from latent_vae.models.stock import decoder_latents, from_diffusion_latents, reconstruct, to_diffusion_latents
from latent_vae.train.loop import train

RES = 32
# An f4 variant of tiny-kl: at 32 px its 8×8×4 latent reconstructs photos well after 100 steps (~5 s idle CPU).
TINY_F4 = ["model.preset=tiny-kl", "model.config.block_out_channels=[16,32,32]",
           "model.config.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D,DownEncoderBlock2D]",
           "model.config.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D,UpDecoderBlock2D]"]


@pytest.fixture(scope="module")
def trained_kl(tmp_path_factory) -> Path:
    """A tiny KL model trained on the bundled sample photos; its folder (scaling_factor set from data)."""
    out = tmp_path_factory.mktemp("trained_kl")
    summary = train(fast_config("train.max_steps=100", "train.learning_rate=1e-3", *TINY_F4), out)
    reset_accelerate()
    return summary.model_dir


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    """An untrained tiny-vq model folder (quantisation behaviour does not need training)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vq") / "model"
    build_autoencoder(ModelConfig(preset="tiny-vq")).save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    """Three photos and one file that is not an image."""
    folder = tmp_path / "images"
    write_photo_crops(folder, count=3, size=48)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_inputs_mix_folders_and_files_in_order_with_unique_keys(images, photo_folder, tmp_path):
    (photo_folder / "empty.png").write_bytes(b"")
    single = str(images / "photo_01.png")
    source, failures = open_inputs([str(photo_folder), single, str(images)])
    keys = [source.key(i) for i in range(len(source))]
    assert keys[:7] == [f"{photo_folder}/photo_{i:02d}.png" for i in range(6)] + [single]
    assert keys[7:] == [f"{images}/photo_{i:02d}.png" for i in range(3)]
    # files whose header is not an image are known before reading, keyed like the rest
    assert [f.key for f in failures] == [f"{photo_folder}/empty.png", f"{images}/broken.png"]
    assert np.array_equal(np.asarray(source.read(6)), np.asarray(load_image(single)))
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file or folder"):
        open_inputs([str(tmp_path / "missing.png")])
    # output file names: flat, and never the same for two inputs
    assert unique_stems(["a/c.png", "a/c.jpg", "a__c-2.png", "d"]) == ["a__c", "a__c-2", "a__c-2-2", "d"]


def cpu_model(folder: Path):
    return load_model(str(folder), torch.device("cpu"))


def pixels_of(folder: Path, count: int) -> torch.Tensor:
    from latent_vae.latent_tools.common import load_images

    source, _ = open_inputs([str(folder)])
    _, pixels, _ = load_images(source, RES)
    return pixels[:count]


# --------------------------------------------------------------------------- interpolation


def test_slerp_keeps_equal_norms_and_interpolates_unequal_norms_linearly():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=generator)
    b_same_norm = b * (a.norm() / b.norm())
    angle = math.acos(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item())
    for t in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        mid = slerp(a, b_same_norm, t)
        assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)  # classic slerp keeps the norm
        unequal = slerp(a, 3 * b, t)
        assert unequal.norm().item() == pytest.approx((1 - t) * a.norm().item() + t * 3 * b.norm().item(), rel=1e-5)
        # constant angular speed along the great circle
        to_a = math.acos(min(1.0, torch.nn.functional.cosine_similarity(unequal.flatten(), a.flatten(), dim=0).item()))
        assert to_a == pytest.approx(t * angle, abs=1e-3)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # why slerp: the linear midpoint of two independent latents loses ~1/√2 of the norm
    assert lerp(a, b_same_norm, 0.5).norm() < 0.8 * a.norm()
    # (anti-)parallel latents have no great circle: the path is the linear one
    torch.testing.assert_close(slerp(a, 2 * a, 0.3), lerp(a, 2 * a, 0.3))
    torch.testing.assert_close(slerp(a, -a, 0.3), lerp(a, -a, 0.3))


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_interpolation_endpoints_decode_to_the_reconstructions(kind, method, trained_kl, vq_dir, photo_folder):
    model = cpu_model(trained_kl if kind == "kl" else vq_dir)
    pixels = pixels_of(photo_folder, 3)
    frames = interpolate_images(model, pixels, steps=5, method=method)
    assert frames.shape == (2, 5, 3, RES, RES)
    with torch.no_grad():
        expected = reconstruct(model, pixels).clamp(-1, 1)
    for segment in range(2):
        torch.testing.assert_close(frames[segment, 0], expected[segment], atol=1e-4, rtol=0)
        torch.testing.assert_close(frames[segment, -1], expected[segment + 1], atol=1e-4, rtol=0)
    if kind == "kl":  # the inside of the path is new images, not a copy of an endpoint
        assert (frames[0, 2] - frames[0, 0]).abs().mean() > 1e-3 and (frames[0, 2] - frames[0, -1]).abs().mean() > 1e-3


def test_interpolation_runs_in_the_scaled_space_around_the_shift():
    torch.manual_seed(0)
    model = build_autoencoder(ModelConfig(preset="tiny-kl", config={"scaling_factor": 0.5, "shift_factor": 2.0}))
    pixels = torch.rand(2, 3, RES, RES) * 2 - 1
    latents = decoder_latents(model, pixels)
    path = latent_path(model, pixels, steps=5)[0]
    torch.testing.assert_close(path[0], latents[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(path[-1], latents[1], atol=1e-5, rtol=0)
    scaled_norms = to_diffusion_latents(model, path).flatten(1).norm(dim=1)
    start, end = scaled_norms[0].item(), scaled_norms[-1].item()
    for t, norm in zip(torch.linspace(0, 1, 5).tolist(), scaled_norms.tolist()):
        assert norm == pytest.approx((1 - t) * start + t * end, rel=1e-5)
    # not the same as slerp around the origin of the unshifted latents
    assert not torch.allclose(path, interpolation_path(latents, 5)[0], atol=1e-3)


def test_scaled_space_follows_the_diffusers_pipeline_conventions():
    model = build_autoencoder(ModelConfig(preset="tiny-kl", config={"scaling_factor": 0.5, "shift_factor": 0.3}))
    z = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(to_diffusion_latents(model, z), (z - 0.3) * 0.5)  # SD3 / FLUX style
    torch.testing.assert_close(from_diffusion_latents(model, to_diffusion_latents(model, z)), z)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 4.0]
    model.register_to_config(latents_mean=mean, latents_std=std)
    per_channel = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    scaled = torch.randn(2, 4, 3, 3)
    # SDXL pipeline before vae.decode: latents * latents_std / scaling_factor + latents_mean
    torch.testing.assert_close(from_diffusion_latents(model, scaled), scaled * per_channel[1] / 0.5 + per_channel[0])
    torch.testing.assert_close(to_diffusion_latents(model, from_diffusion_latents(model, scaled)), scaled)


def test_interpolate_command_writes_grid_and_animation(trained_kl, images, tmp_path, capsys):
    files = [str(images / "photo_00.png"), str(images / "photo_01.png"), str(images / "photo_02.png")]
    out = tmp_path / "interp"
    assert main(["interpolate", "--model", str(trained_kl), *files, "--resolution", str(RES), "--steps", "4",
                 "--device", "cpu", "--output-dir", str(out)]) == 0
    grid = Image.open(out / "interpolation_grid.png")
    assert grid.size == (4 * RES + 5 * GRID_PADDING, 2 * RES + 3 * GRID_PADDING)  # 2 pairs × 4 steps
    gif = Image.open(out / "interpolation.gif")
    assert gif.size == (RES, RES) and gif.n_frames == 2 * 3 + 1  # shared endpoint shown once

    assert main(["interpolate", "--model", str(trained_kl), str(images), "--resolution", str(RES),
                 "--format", "webp", "--method", "linear", "--output-dir", str(out / "webp")]) == 0
    webp = Image.open(out / "webp" / "interpolation.webp")
    assert webp.is_animated and webp.n_frames == 2 * 7 + 1  # 3 readable images, default 8 steps
    with open(out / "webp" / "unreadable.csv") as handle:
        assert [row["key"] for row in csv.DictReader(handle)] == ["broken.png"]
    assert "unreadable inputs skipped: 1" in capsys.readouterr().out


# --------------------------------------------------------------------------- sampling


def test_prior_latents_in_model_and_scaled_space():
    model = build_autoencoder(ModelConfig(preset="tiny-kl", config={"scaling_factor": 0.5, "shift_factor": 0.3}))
    prior = prior_latents(model, 3, (4, 4), "prior", torch.Generator().manual_seed(7))
    torch.testing.assert_close(prior, torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7)))
    scaled = prior_latents(model, 3, (4, 4), "scaled-prior", torch.Generator().manual_seed(7))
    torch.testing.assert_close(scaled, prior / 0.5 + 0.3)  # N(0, I) in the space diffusion models use


def test_vq_prior_is_uniform_codes_and_has_no_scaled_prior(vq_dir):
    model = cpu_model(vq_dir)
    latents = prior_latents(model, 2, (4, 4), "prior", torch.Generator().manual_seed(0))
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    distances = (vectors[:, None] - model.quantize.embedding.weight.detach()[None]).norm(dim=-1)
    assert torch.all(distances.min(dim=1).values < 1e-6)  # every position is a codebook row
    assert len(set(distances.argmin(dim=1).tolist())) > 8  # drawn across the codebook
    with pytest.raises(ConfigError, match="VQModel has no Gaussian prior"):
        prior_latents(model, 2, (4, 4), "scaled-prior")


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_fitted_gaussian_recovers_planted_channel_statistics(covariance):
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    planted = torch.tensor([[1.0, 0.8, 0.0], [0.8, 2.0, -0.5], [0.0, -0.5, 0.5]], dtype=torch.float64)
    values = mean + torch.randn(40000, 3, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(planted).T
    latents = values.reshape(100, 20, 20, 3).permute(0, 3, 1, 2).float()
    fitted = fit_gaussian(latents, covariance)
    expected = planted if covariance == "full" else torch.diag(torch.diagonal(planted))
    torch.testing.assert_close(fitted.mean, mean, atol=0.05, rtol=0)
    torch.testing.assert_close(fitted.covariance, expected, atol=0.06, rtol=0)
    samples = fitted.sample(50, (20, 20), torch.Generator().manual_seed(1))
    assert samples.shape == (50, 3, 20, 20)
    torch.testing.assert_close(torch.cov(samples.permute(1, 0, 2, 3).flatten(1).double()), expected, atol=0.08, rtol=0)


def test_sample_command_prior_and_fitted(trained_kl, images, tmp_path, capsys):
    out = tmp_path / "prior"
    assert main(["sample", "--model", str(trained_kl), "--count", "5", "--resolution", str(RES),
                 "--output-dir", str(out)]) == 0
    files = sorted((out / "samples").glob("*.png"))
    assert len(files) == 5 and all(Image.open(f).size == (RES, RES) for f in files)
    side = 3 * RES + 4 * GRID_PADDING  # 5 samples on a 3-column grid: 2 rows, padded like 3
    assert Image.open(out / "samples_grid.png").size == (side, 2 * RES + 3 * GRID_PADDING)

    out = tmp_path / "fitted"
    assert main(["sample", "--model", str(trained_kl), str(images), "--covariance", "full", "--count", "4",
                 "--resolution", str(RES), "--seed", "3", "--output-dir", str(out)]) == 0
    fitted = json.loads((out / "fitted_gaussian.json").read_text())
    assert fitted["kind"] == "full" and len(fitted["covariance"]) == 4
    assert fitted["fitted_on_positions"] == 3 * (RES // 4) ** 2  # 3 readable images, 8×8 latents
    assert len(list((out / "samples").glob("*.png"))) == 4
    assert (out / "unreadable.csv").read_text().count("broken.png") == 1
    assert "fitted on 192 latent positions" in capsys.readouterr().out


# --------------------------------------------------------------------------- visualisation


def test_pca_rgb_shows_the_dominant_latent_direction():
    generator = torch.Generator().manual_seed(0)
    pattern = torch.linspace(-1, 1, 8).view(8, 1).expand(8, 8)  # a vertical ramp
    direction = torch.tensor([0.6, -0.8, 0.0, 0.0])
    latents = 3 * pattern[None, None] * direction.view(1, 4, 1, 1) + 0.05 * torch.randn(2, 4, 8, 8, generator=generator)
    rgb = pca_rgb(latents)
    assert rgb.shape == (2, 3, 8, 8) and rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[:, 0].flatten()
    ramp = pattern.expand(2, 8, 8).flatten()
    assert abs(torch.corrcoef(torch.stack([red, ramp]))[0, 1]) > 0.98
    # fewer than three channels: the missing components are mid-grey
    assert torch.all(pca_rgb(latents[:, :2])[:, 2] == 0.5)


def test_channel_grid_tiles_each_channel_min_max_scaled():
    latent = torch.stack([torch.full((4, 4), 5.0), torch.arange(16.0).view(4, 4), -torch.arange(16.0).view(4, 4)])
    grid = np.asarray(channel_grid(latent, factor=8))
    assert grid.shape == (2 * 32 + 3 * GRID_PADDING, 2 * 32 + 3 * GRID_PADDING, 3)
    first = grid[GRID_PADDING:GRID_PADDING + 32, GRID_PADDING:GRID_PADDING + 32, 0]
    second = grid[GRID_PADDING:GRID_PADDING + 32, 2 * GRID_PADDING + 32:2 * GRID_PADDING + 64, 0]
    assert np.all(first == 128)  # a constant channel is mid-grey
    assert second.min() == 0 and second.max() == 255 and second[0, 0] == 0 and second[-1, -1] == 255


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_visualize_command_writes_channels_pca_and_histograms(kind, trained_kl, vq_dir, images, tmp_path):
    out = tmp_path / "viz"
    model_dir = trained_kl if kind == "kl" else vq_dir
    assert main(["visualize", "--model", str(model_dir), str(images), "--resolution", str(RES),
                 "--output-dir", str(out)]) == 0
    for i in range(3):
        channels = Image.open(out / f"photo_{i:02d}_channels.png")
        assert channels.size == (2 * RES + 3 * GRID_PADDING,) * 2  # 4 channels, tiles of input size
        assert Image.open(out / f"photo_{i:02d}_pca.png").size == (3 * RES + 4 * GRID_PADDING, RES + 2 * GRID_PADDING)
    histograms = Image.open(out / "histograms.png")
    histograms.load()
    assert histograms.size[0] > 400
    with open(out / "latent_stats.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["channel"]) for r in rows] == [0, 1, 2, 3]
    model = cpu_model(model_dir)
    latents = to_diffusion_latents(model, decoder_latents(model, pixels_of(images, 3)))
    assert float(rows[1]["std"]) == pytest.approx(latents[:, 1].double().std().item(), rel=1e-4)
    assert (out / "unreadable.csv").read_text().count("broken.png") == 1


# --------------------------------------------------------------------------- anomaly scores


def planted_images(folder: Path):
    """Held-out photos (not in the training set) cut into quadrants, and planted anomalies made
    from the same crops: uniform noise, or the photo under heavy Gaussian noise (σ = 60/255)."""
    rng = np.random.default_rng(0)
    normal, anomalous = folder / "normal", folder / "anomalous"
    normal.mkdir(parents=True)
    anomalous.mkdir()
    for name in ("chelsea.png", "coffee.png", "motorcycle_right.png"):
        photo = load_image(sample_photos_dir() / name)
        width, height = photo.size
        side = min(width, height) // 2
        for i, (left, top) in enumerate([(0, 0), (width - side, 0), (0, height - side), (width - side, height - side)]):
            crop = photo.crop((left, top, left + side, top + side)).resize((RES, RES), Image.BICUBIC, reducing_gap=3.0)
            crop.save(normal / f"{name[:-4]}_{i}.png")
            pixels = np.asarray(crop, dtype=np.float64)
            corrupted = rng.uniform(0, 255, pixels.shape) if i % 2 == 0 else pixels + rng.normal(0, 60, pixels.shape)
            Image.fromarray(np.clip(corrupted, 0, 255).astype(np.uint8)).save(anomalous / f"{name[:-4]}_{i}.png")
    return normal, anomalous


def source_of(folder: Path, pattern: str = "*.png") -> FolderSource:
    return FolderSource(folder, sorted(folder.glob(pattern)))


def test_anomaly_scores_separate_planted_anomalies_on_a_trained_model(trained_kl, tmp_path):
    model = cpu_model(trained_kl)
    normal, anomalous = planted_images(tmp_path)
    normal_scores = score_images(model, source_of(normal), RES, desc=None)
    anomaly_scores = score_images(model, source_of(anomalous), RES, desc=None)
    labels = torch.tensor([0] * 12 + [1] * 12)
    auroc = binary_auroc(torch.tensor(normal_scores.scores["mse"] + anomaly_scores.scores["mse"]), labels).item()
    print(f"AUROC (mse) {auroc:.3f}")
    assert auroc >= 0.95

    # Calibrated on two quadrants of each normal photo, applied to the other normal quadrants and the anomalies.
    inputs = FolderSource(tmp_path, sorted(normal.glob("*_[23].png")) + sorted(anomalous.glob("*.png")))
    report = write_scores(model, inputs, tmp_path / "scores", RES, reference=source_of(normal, "*_[01].png"))
    flagged = set(report.exceeding)
    assert sum(key.startswith("anomalous/") for key in flagged) >= 10  # of 12
    assert sum(key.startswith("normal/") for key in flagged) <= 2  # of 6


def test_threshold_calibration_and_report(trained_kl, photo_folder, tmp_path):
    model = cpu_model(trained_kl)
    inputs = tmp_path / "inputs"
    write_photo_crops(inputs, count=4, size=40)
    (inputs / "empty.png").write_bytes(b"")
    (photo_folder / "truncated.png").write_bytes((photo_folder / "photo_00.png").read_bytes()[:200])
    source, known = open_inputs([str(inputs)])
    reference, reference_known = open_inputs([str(photo_folder)])
    report = write_scores(model, source, tmp_path / "out", RES, reference=reference, score="l1", percentile=50,
                          known_failures=known, reference_known_failures=reference_known)
    out = tmp_path / "out"
    with open(out / "reference_scores.csv") as handle:
        reference_rows = list(csv.DictReader(handle))
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(reference_rows) == 6 and len(rows) == 4
    assert report.threshold == pytest.approx(float(np.median([float(r["l1"]) for r in reference_rows])))
    assert [int(r["anomalous"]) for r in rows] == [int(float(r["l1"]) > report.threshold) for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exceeding"] == sum(int(r["anomalous"]) for r in rows) == len(report.exceeding)
    assert summary["inputs_unreadable"] == 1 and summary["reference_unreadable"] == 1
    assert set(summary["columns"]) == {"mse", "l1", "kl"}
    assert "empty.png" in (out / "unreadable.csv").read_text()
    assert "truncated.png" in (out / "reference_unreadable.csv").read_text()
    assert all(float(r["kl"]) > 0 for r in rows)


def test_score_command_with_lpips_weights_and_vq(trained_kl, vq_dir, images, photo_folder, lpips_weights, tmp_path,
                                                 capsys):
    out = tmp_path / "kl"
    assert main(["score", "--model", str(trained_kl), str(images), "--reference", str(photo_folder),
                 "--lpips-net", "vgg", "--lpips-weights", str(lpips_weights), "--score", "lpips",
                 "--resolution", str(RES), "--output-dir", str(out)]) == 0
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["key", "mse", "l1", "lpips", "kl", "anomalous"] and len(rows) == 3
    printed = capsys.readouterr().out
    assert "threshold: lpips >" in printed and "of 3 inputs exceed it" in printed
    assert "unreadable inputs skipped: 1" in printed

    out = tmp_path / "vq"
    assert main(["score", "--model", str(vq_dir), str(images), "--threshold", "0", "--no-lpips",
                 "--resolution", str(RES), "--output-dir", str(out)]) == 0
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["key", "mse", "l1", "anomalous"] and all(r["anomalous"] == "1" for r in rows)


def test_lpips_is_skipped_with_a_note_only_when_no_weights_were_given(monkeypatch, tmp_path):
    def unavailable(net, weights_path=None):
        raise PerceptualWeightsUnavailable("no backbone weights (offline)")

    monkeypatch.setattr("latent_vae.latent_tools.scoring.build_lpips", unavailable)
    network, note = load_lpips("alex")
    assert network is None and "LPIPS skipped" in note and "offline" in note
    with pytest.raises(PerceptualWeightsUnavailable):
        load_lpips("alex", str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("arguments, message", [
    (["score", "--resolution", "30"], "not a multiple of the model's downsampling factor 8; use e.g. --resolution 32"),
    (["score", "--score", "kl", "--no-lpips", "--threshold", "1"], "--score kl needs a KL model"),
    (["sample", "--distribution", "scaled-prior"], "VQModel has no Gaussian prior"),
    (["visualize", "--device", "gpu"], "--device 'gpu' is not a torch device"),
])
def test_bad_arguments_give_one_clear_error(arguments, message, vq_dir, photo_folder, tmp_path, capsys):
    command, *options = arguments
    images = [] if command == "sample" else [str(photo_folder)]
    code = main([command, "--model", str(vq_dir), *images, *options, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
