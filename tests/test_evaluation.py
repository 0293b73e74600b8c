"""`eval` and `compare`: numbers equal the reference libraries on the same images, metrics with
pretrained networks fail clearly without weights, unreadable inputs are counted, several
processes give the single-process result, and latent drift separates same vs different encoders."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_photo_crops
from diffusers import AutoencoderKL
from PIL import Image

from latent_vae.cli import main
from latent_vae.data.sources import open_source
from latent_vae.data.transforms import crop_image, to_tensor
from latent_vae.errors import InceptionWeightsUnavailable, PerceptualWeightsUnavailable
from latent_vae.evaluate.compare import CHECK_DRIFT, compare, judge, latent_drift
from latent_vae.evaluate.evaluation import evaluate
from latent_vae.evaluate.networks import INCEPTION_URL, MetricNetworks, build_metric_networks, load_inception
from latent_vae.evaluate.options import EvalOptions
from latent_vae.evaluate.report import write_outputs
from latent_vae.evaluate.statistics import RunningMoments
from latent_vae.losses import perceptual
from latent_vae.losses.kl import channel_activity
from latent_vae.losses.vq import codebook_statistics
from latent_vae.models.stock import encode_to_indices, reconstruct
from latent_vae.presets import PRESETS

RESOLUTION = 32
UNREACHABLE = "http://127.0.0.1:9/"  # connection refused at once: the offline case, without waiting


class SmallExtractor(torch.nn.Module):
    """A stand-in for InceptionV3: uint8 images -> 16 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)

    def forward(self, images):
        return torch.tanh(self.conv(images.float() / 127.5 - 1)).mean(dim=(2, 3))


def tiny_model(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    return PRESETS[preset].cls(**PRESETS[preset].kwargs).eval()


def preprocessed(folder: Path) -> torch.Tensor:
    """The photos as eval sees them: shorter side resized to the resolution, centre crop, [-1, 1]."""
    import random

    files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    crops = [crop_image(Image.open(f).convert("RGB"), RESOLUTION, None, "center", False, random.Random(0))
             for f in files]
    return torch.stack([to_tensor(c) for c in crops])


def reference_psnr(images: torch.Tensor, recon: torch.Tensor) -> list:
    """scikit-image's PSNR of each image pair, both mapped to [0, 1] (reconstruction clamped)."""
    from skimage.metrics import peak_signal_noise_ratio

    x, y = ((images + 1) / 2).clamp(0, 1).numpy(), ((recon + 1) / 2).clamp(0, 1).numpy()
    return [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)]


def fast_options(**overrides) -> EvalOptions:
    settings = dict(resolution=RESOLUTION, batch_size=4, num_workers=0, lpips=(), fid=False, progress=False)
    return EvalOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random values (the real file cannot be downloaded here),
    as .safetensors and .pth: exercises the loading path a user takes with the downloaded file."""
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        state = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["64"]).state_dict()
    folder = tmp_path_factory.mktemp("inception")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "inception.safetensors")
    torch.save(state, folder / "weights-inception-2015-12-05-6726825d.pth")
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No cached weights and no network for LPIPS backbones and InceptionV3."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for net, url in perceptual.BACKBONE_URLS.items():
        monkeypatch.setitem(perceptual.BACKBONE_URLS, net, UNREACHABLE + Path(url).name)
    monkeypatch.setattr("latent_vae.evaluate.networks.INCEPTION_URL", UNREACHABLE + Path(INCEPTION_URL).name)


# --------------------------------------------------------------------------- numbers


def test_kl_eval_numbers_equal_the_reference_libraries(photo_folder, lpips_weights, tmp_path):
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import structural_similarity_index_measure
    from torchmetrics.image.fid import FrechetInceptionDistance

    model = tiny_model("tiny-kl")
    source, failures = open_source(str(photo_folder))
    options = fast_options(lpips=("vgg",), lpips_weights={"vgg": str(lpips_weights)}, fid=True, grid_images=3)
    networks = build_metric_networks(options, fid_extractor=SmallExtractor())
    result = evaluate(model, source, options, networks, failures)

    images = preprocessed(photo_folder)
    with torch.no_grad():
        recon = reconstruct(model, images)
        posterior = model.encode(images).latent_dist
        lpips_vgg = networks.lpips["vgg"](images, recon).flatten()  # the network built from the local file
    x, y = ((images + 1) / 2).clamp(0, 1), ((recon + 1) / 2).clamp(0, 1)
    rows = result.per_image
    assert [r["key"] for r in rows] == sorted(p.name for p in photo_folder.iterdir())
    assert [r["psnr"] for r in rows] == pytest.approx(reference_psnr(images, recon), rel=1e-5)
    for i, row in enumerate(rows):
        xi, yi = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        reference, ssim_map = structural_similarity_index_measure(
            y[i:i + 1], x[i:i + 1], data_range=1.0, kernel_size=11, sigma=1.5, gaussian_kernel=True,
            return_full_image=True)
        assert row["ssim"] == pytest.approx(float(reference), abs=1e-6)
        # The same window and constants as scikit-image's Gaussian SSIM, which averages the map
        # without its 5-pixel border (torchmetrics keeps it, with reflected padding).
        assert float(ssim_map[..., 5:-5, 5:-5].mean()) == pytest.approx(structural_similarity(
            xi, yi, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
            channel_axis=-1), abs=1e-5)
        assert row["lpips_vgg"] == pytest.approx(float(lpips_vgg[i]), rel=1e-5)
    assert result.metrics["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows]), rel=1e-12)

    fid = FrechetInceptionDistance(feature=SmallExtractor())
    fid.update((x * 255).round().to(torch.uint8), real=True)
    fid.update((y * 255).round().to(torch.uint8), real=False)
    assert result.metrics["rfid"] == pytest.approx(float(fid.compute()), rel=1e-5)

    # Posterior-collapse monitor: per-channel KL and the activity of every channel over the set.
    mean, logvar = posterior.mean, posterior.logvar
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)
    assert result.latent["kl_per_channel"] == pytest.approx(kl.mean(dim=(0, 2, 3)).tolist(), rel=1e-5)
    assert result.latent["channel_activity"] == pytest.approx(channel_activity(mean).tolist(), rel=1e-5)
    assert result.latent["active_units"] == int((channel_activity(mean) > 0.01).sum())
    assert [r["kl"] for r in rows] == pytest.approx(kl.mean(dim=(1, 2, 3)).tolist(), rel=1e-5)

    write_outputs(result, tmp_path / "m.json", tmp_path / "m.csv", tmp_path / "grid.png")
    with open(tmp_path / "m.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["psnr"]) for r in table] == pytest.approx([r["psnr"] for r in rows])
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["metrics"]["rfid"] == pytest.approx(result.metrics["rfid"])
    assert summary["latent"]["channels"] == 4
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * (RESOLUTION + 2) + 2, 2 * (RESOLUTION + 2) + 2)  # 3 originals above 3 reconstructions


def test_vq_eval_reports_the_codebook_statistics_of_stock_token_ids(photo_folder):
    model = tiny_model("tiny-vq")
    result = evaluate(model, open_source(str(photo_folder))[0], fast_options())
    images = preprocessed(photo_folder)
    counts = torch.bincount(encode_to_indices(model, images).flatten(), minlength=model.config.num_vq_embeddings)
    expected = codebook_statistics(counts)
    assert result.codebook["usage"] == pytest.approx(float(expected["usage"]))
    assert result.codebook["perplexity"] == pytest.approx(float(expected["perplexity"]))
    assert result.codebook["codes_used"] == int((counts > 0).sum())
    with torch.no_grad():
        recon = reconstruct(model, images)
    assert [r["psnr"] for r in result.per_image] == pytest.approx(reference_psnr(images, recon), rel=1e-5)
    assert result.latent is None


def test_running_moments_equal_the_batch_variance():
    torch.manual_seed(0)
    data = torch.randn(11, 3, 4, 4) * 5 + 100  # a large mean: naive sum-of-squares would cancel
    moments = RunningMoments((3, 4, 4), torch.device("cpu"))
    for part in data.split(3):
        moments.update(part)
    assert torch.allclose(moments.variance(), data.double().var(dim=0), rtol=1e-10)


def test_collapsed_channels_are_reported_with_a_warning(photo_folder):
    model = tiny_model("tiny-kl")
    with torch.no_grad():  # the encoder ignores its input: constant posterior, no active unit
        model.encoder.conv_out.weight.zero_()
    result = evaluate(model, open_source(str(photo_folder))[0], fast_options())
    assert result.latent["active_units"] == 0
    assert any("0 of 4 latent channels are active" in w for w in result.warnings)


# --------------------------------------------------------------------------- inputs


def test_unreadable_inputs_are_skipped_by_path_and_counted(tmp_path):
    folder = tmp_path / "mixed"
    write_photo_crops(folder, count=3)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    good = (folder / "photo_00.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (4, 4), (200, 10, 10)).save(folder / "tiny.png")
    Image.new("RGBA", (40, 48), (0, 0, 255, 128)).save(folder / "alpha.png")
    source, failures = open_source(str(folder))
    result = evaluate(tiny_model("tiny-kl"), source, fast_options(), failures=failures)
    summary = result.summary()
    assert summary["inputs"] == {"evaluated": 5, "skipped": 3, "upscaled": 1}
    assert sorted(f["key"] for f in summary["skipped_inputs"]) == ["empty.png", "notes.jpg", "truncated.png"]
    assert all(f["reason"] for f in summary["skipped_inputs"])
    assert sorted(r["key"] for r in result.per_image) == ["alpha.png", "photo_00.png", "photo_01.png",
                                                          "photo_02.png", "tiny.png"]


# --------------------------------------------------------------------------- pretrained networks


def test_lpips_and_rfid_without_weights_fail_fast_naming_the_fix(offline):
    started = time.monotonic()
    with pytest.raises(PerceptualWeightsUnavailable, match="--lpips-weights") as lpips_error:
        build_metric_networks(EvalOptions(lpips=("alex",), fid=False))
    assert "--no-lpips" in str(lpips_error.value)
    with pytest.raises(InceptionWeightsUnavailable, match="--fid-weights") as fid_error:
        build_metric_networks(EvalOptions(lpips=(), fid=True))
    assert "--no-fid" in str(fid_error.value) and "weights-inception-2015-12-05" in str(fid_error.value)
    assert time.monotonic() - started < 30


def test_rfid_with_a_local_inception_file_equals_torchmetrics(photo_folder, inception_weights):
    from torchmetrics.image.fid import FrechetInceptionDistance

    model = tiny_model("tiny-kl")
    options = fast_options(fid=True, fid_weights=str(inception_weights / "inception.safetensors"), fid_features=64,
                           limit=3)
    result = evaluate(model, open_source(str(photo_folder))[0], options)
    # torchmetrics' own construction from the same weights (TF1-compatible resize, as eval uses)
    reference = FrechetInceptionDistance(
        feature=64, feature_extractor_weights_path=str(inception_weights / "weights-inception-2015-12-05-6726825d.pth"),
        antialias=False)
    images = preprocessed(photo_folder)[:3]
    with torch.no_grad():
        recon = reconstruct(model, images)
    reference.update(((images + 1) * 127.5).round().to(torch.uint8), real=True)
    reference.update(((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), real=False)
    assert result.metrics["rfid"] == pytest.approx(float(reference.compute()), rel=1e-4)


def test_pickled_inception_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"fc.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InceptionWeightsUnavailable, match="refused"):
        load_inception(str(tmp_path / "evil.pth"))
    assert not marker.exists()


# --------------------------------------------------------------------------- processes


DISTRIBUTED_SCRIPT = """
import sys, torch
from latent_vae.distributed import release_process_group
sys.path.insert(0, {tests!r})
from test_evaluation import distributed_run
distributed_run(*sys.argv[1:4])
release_process_group()
"""


def distributed_run(model_dir: str, data: str, out: str) -> None:
    """Evaluate with a seeded posterior sample per image and an injected feature extractor."""
    from latent_vae.distributed import process_state
    from latent_vae.models.loading import load_autoencoder

    source, failures = open_source(data)
    options = fast_options(batch_size=2, sample=True, seed=7, fid=True)
    result = evaluate(load_autoencoder(model_dir), source, options, MetricNetworks(fid_extractor=SmallExtractor()),
                      failures)
    if process_state().is_main_process:
        write_outputs(result, out + ".json", out + ".csv")


def assert_same_numbers(a, b, rel=1e-5):
    """Equal structure, strings and counts; floats equal to rounding (batch composition changes
    the summation order inside convolutions)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_numbers(a[key], b[key], rel)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_numbers(x, y, rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-7)
    else:
        assert a == b


@pytest.mark.multiprocess
def test_two_processes_write_the_single_process_results(tmp_path, photo_folder):
    tiny_model("tiny-kl").save_pretrained(tmp_path / "model")
    Image.new("RGB", (40, 40)).save(photo_folder / "zz_extra.png")  # 7 images: uneven shards
    (photo_folder / "broken.png").write_bytes(b"\x89PNG broken")
    script = tmp_path / "evaluate.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(tests=str(Path(__file__).parent)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path / "model"), str(photo_folder), str(tmp_path / "two")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    distributed_run(str(tmp_path / "model"), str(photo_folder), str(tmp_path / "one"))

    def read(name):
        with open(tmp_path / f"{name}.csv") as handle:
            rows = [{k: (v if k in ("key", "upscaled") else float(v)) for k, v in row.items()}
                    for row in csv.DictReader(handle)]
        return json.loads((tmp_path / f"{name}.json").read_text()), rows

    (single, single_rows), (double, double_rows) = read("one"), read("two")
    assert [r["key"] for r in double_rows] == [r["key"] for r in single_rows]  # every image once, in order
    assert_same_numbers(double_rows, single_rows)
    assert_same_numbers(double, single)
    assert single["inputs"] == {"evaluated": 7, "skipped": 1, "upscaled": 0}
    assert single["skipped_inputs"][0]["key"] == "broken.png"


# --------------------------------------------------------------------------- compare


def test_latent_drift_is_zero_for_the_same_encoder_and_large_for_another():
    model_a = tiny_model("tiny-kl", seed=0)
    same_encoder = tiny_model("tiny-kl", seed=0)
    with torch.no_grad():
        for param in same_encoder.decoder.parameters():
            param.add_(0.05)
    other = tiny_model("tiny-kl", seed=1)
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION) * 2 - 1
    same = latent_drift(model_a, same_encoder, images)
    assert same["relative_l2"] == 0.0 and same["scaled_relative_l2"] == 0.0
    assert same["max_abs_mean_shift"] == 0.0 and same["max_abs_std_ratio_change"] == 0.0
    assert judge(same, None, None).level == "drop-in"
    different = latent_drift(model_a, other, images)
    assert different["scaled_relative_l2"] > 0.5
    assert judge(different, None, None).level == "not a drop-in"
    # Same encoder, different scaling factor: the raw latents agree, the diffusion model's inputs do not.
    rescaled = tiny_model("tiny-kl", seed=0)
    rescaled.register_to_config(scaling_factor=1.5)
    drift = latent_drift(model_a, rescaled, images)
    assert drift["relative_l2"] == 0.0 and drift["scaled_relative_l2"] == pytest.approx(0.5, rel=1e-6)
    assert drift["channel_std_ratio"] == pytest.approx([1.5] * 4, rel=1e-6)
    assert 0.5 > CHECK_DRIFT


def test_compare_cli_writes_metrics_drift_and_verdict(tmp_path, photo_folder, capsys):
    model_a = tiny_model("tiny-kl", seed=0)
    model_a.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        model_a.decoder.conv_out.bias.add_(0.1)  # B: A with a changed decoder (a decoder-only fine-tune)
    model_a.save_pretrained(tmp_path / "b")
    tiny_model("tiny-kl", seed=3).save_pretrained(tmp_path / "c")
    common = ["--data", str(photo_folder), "--resolution", str(RESOLUTION), "--no-lpips", "--no-fid",
              "--num-workers", "0", "--limit", "4"]
    assert main(["compare", "--model-a", str(tmp_path / "a"), "--model-b", str(tmp_path / "b"), *common,
                 "--json", str(tmp_path / "ab.json")]) == 0
    report = json.loads((tmp_path / "ab.json").read_text())
    assert report["verdict"]["drop_in"] is True and report["latent_drift"]["scaled_relative_l2"] == 0.0
    assert report["a"]["metrics"]["psnr"] != report["b"]["metrics"]["psnr"]
    # With the same encoder, B's decoder on A's latents is B's own reconstruction.
    assert report["cross_decode"]["psnr"] == pytest.approx(report["b"]["metrics"]["psnr"], rel=1e-6)
    assert "B can replace A" in capsys.readouterr().out
    assert main(["compare", "--model-a", str(tmp_path / "a"), "--model-b", str(tmp_path / "c"), *common]) == 0
    assert "cannot replace A" in capsys.readouterr().out


def test_compare_of_different_latent_shapes_is_incompatible(photo_folder):
    kl = tiny_model("tiny-kl")
    wide = AutoencoderKL(**{**PRESETS["tiny-kl"].kwargs, "latent_channels": 8})
    comparison = compare(kl, wide, open_source(str(photo_folder))[0], fast_options(limit=2))
    assert comparison.verdict.level == "incompatible" and comparison.drift is None


# --------------------------------------------------------------------------- command line


def test_eval_cli_writes_json_csv_and_grid(tmp_path, photo_folder, inception_weights, capsys):
    tiny_model("tiny-kl").save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(photo_folder),
                 "--resolution", "48", "--num-workers", "0", "--no-lpips",
                 "--fid-weights", str(inception_weights / "inception.safetensors"), "--fid-features", "64",
                 "--tiled", "--tile-size", "32", "--limit", "3",
                 "--json", str(out / "m.json"), "--csv", str(out / "m.csv"), "--grid", str(out / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert "3 images (0 skipped" in printed and "rfid" in printed and "active units" in printed
    summary = json.loads((out / "m.json").read_text())
    assert summary["settings"]["tiled"] is True and summary["images"] == 3
    assert np.isfinite(summary["metrics"]["rfid"])
    assert len((out / "m.csv").read_text().splitlines()) == 4
    assert Image.open(out / "g.png").size[1] == 2 * (48 + 2) + 2


def test_eval_cli_errors_are_one_line(tmp_path, photo_folder, offline, capsys):
    tiny_model("tiny-kl").save_pretrained(tmp_path / "model")
    base = ["eval", "--model", str(tmp_path / "model"), "--data", str(photo_folder), "--num-workers", "0",
            "--resolution", str(RESOLUTION)]
    assert main([*base, "--no-fid", "--lpips", "alex"]) == 2
    err = capsys.readouterr().err
    assert "--lpips-weights" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--no-lpips"]) == 2
    assert "--fid-weights" in capsys.readouterr().err
    assert main([*base, "--no-fid", "--lpips-weights", "/weights/backbone.pth"]) == 2
    assert "write alex=/weights/backbone.pth or vgg=" in capsys.readouterr().err
    tiny_model("tiny-vq").save_pretrained(tmp_path / "vq")
    assert main(["eval", "--model", str(tmp_path / "vq"), "--data", str(photo_folder), "--no-lpips", "--no-fid",
                 "--tiled", "--resolution", str(RESOLUTION)]) == 2
    assert "VQModel has no tiled" in capsys.readouterr().err


def test_eval_names_every_missing_weights_file_and_its_flag_in_one_line(offline, photo_folder, tmp_path, capsys):
    """Not one network per run: LPIPS-alex, LPIPS-vgg and InceptionV3 in one message, with eval's flags only."""
    model_dir = tmp_path / "model"
    tiny_model("tiny-kl").save_pretrained(model_dir)
    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    bad.write_bytes(b"not weights")
    assert main(["eval", "--model", str(model_dir), "--data", str(photo_folder), "--resolution", "32",
                 "--lpips-weights", f"alex={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for expected in ("LPIPS (alex)", str(bad), "--lpips-weights alex=PATH", "LPIPS (vgg)", "vgg16-397923af.pth",
                     "--lpips-weights vgg=", "InceptionV3", "weights-inception-2015-12-05-6726825d.pth",
                     "--fid-weights", "--no-lpips", "--no-fid"):
        assert expected in err, expected
    assert "reconstruction." not in err and "train" not in err  # no training-only hints
