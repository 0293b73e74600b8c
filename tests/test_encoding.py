"""Encoding datasets to latents: stock-equal latents, resumable and loss-free, multi-process,
preprocessing records, storage dtypes, fast paths, tiling, decode and latent statistics.

Tolerances: fp32 latents match stock diffusers to 1e-5 absolute (latents are O(0.1–1); the
difference is float summation order between batch sizes). Compiled path: 1e-5 absolute.
channels_last: 1e-3 of the latent std (other convolution kernels: 1e-6 at 32 px, 3e-4·std
measured at 256 px). bf16 autocast: 10% of the latent std (8 mantissa bits through ~20
layers); fp16 autocast: 2%. Statistics: 1e-9 relative to a float64 two-pass numpy reference.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import run_python, write_photo_crops
from diffusers import AutoencoderKL, VQModel
from PIL import Image

from latent_vae.cli import build_parser, main
from latent_vae.data.sources import load_image, sample_photo_sources
from latent_vae.data.transforms import crop_image, to_tensor
from latent_vae.encode.decode import decode_latents, load_latent_dataset
from latent_vae.encode.encoder import LatentEncoder
from latent_vae.encode.options import EncodeOptions
from latent_vae.encode.preprocess import Preprocessing, bucket_sizes
from latent_vae.encode.run import encode_dataset
from latent_vae.encode.stats import latent_statistics
from latent_vae.encode.storage import latent_to_tensor
from latent_vae.errors import ConfigError
from latent_vae.evaluate.metrics import psnr_per_image
from latent_vae.interop.export import save_diffusers_model
from latent_vae.models.tiling import configure_tiling
from latent_vae.presets import PRESETS
from latent_vae.seeding import derive_seed

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5


def tiny(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = AutoencoderKL if preset == "tiny-kl" else VQModel
    return cls(**PRESETS[preset].kwargs).eval()


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory) -> Path:
    return save_diffusers_model(tiny("tiny-kl"), tmp_path_factory.mktemp("kl") / "model")


def encode(model, data, out, **options):
    options = {"resolution": 32, "num_workers": 0, "progress": False, **options}
    return encode_dataset(model, data, out, **options)


def write_images(folder: Path, sizes: dict) -> Path:
    """Real photo content resized to the given (width, height) per file name."""
    folder.mkdir(parents=True, exist_ok=True)
    source, _ = sample_photo_sources()
    for i, (name, size) in enumerate(sizes.items()):
        source.read(i).resize(size, Image.BICUBIC).save(folder / name)
    return folder


def as_tensor(value) -> torch.Tensor:
    return torch.tensor(np.asarray(value, dtype=np.float32))


def read_failures(out: Path) -> list:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- what a row holds


def test_rows_hold_the_stock_posterior_mean_of_the_centre_crop(tmp_path, kl_dir):
    sizes = {"a_wide.png": (80, 60), "b_tall.png": (60, 80), "c_square.png": (32, 32), "d_small.png": (20, 30)}
    folder = write_images(tmp_path / "images", sizes)
    # Two DataLoader workers and batches of 3: the fast input pipeline, checked against stock.
    summary = encode(kl_dir, folder, tmp_path / "latents", batch_size=3, num_workers=2)
    assert (summary.read, summary.encoded, summary.failed) == (4, 4, 0)

    rows, config = load_latent_dataset(tmp_path / "latents")
    assert rows["id"] == sorted(sizes) and config["model_path"] == str(kl_dir.resolve())
    vae = AutoencoderKL.from_pretrained(kl_dir).eval()
    for row in rows:
        image = load_image(folder / row["id"])
        # The training pipeline's centre crop, an independent implementation of resize + crop.
        crop = crop_image(image, 32, None, "center", False, random.Random(0))
        with torch.no_grad():
            expected = vae.encode(to_tensor(crop)[None]).latent_dist.mean[0]
        assert torch.allclose(as_tensor(row["latent"]), expected, atol=ATOL, rtol=0), row["id"]
        width, height = sizes[row["id"]]
        scale = 32 / min(width, height)
        resized = [max(32, round(height * scale)), max(32, round(width * scale))]
        assert row["original_size"] == [height, width] and row["resized_size"] == resized
        assert row["crop_top_left"] == [(resized[0] - 32) // 2, (resized[1] - 32) // 2]
        assert row["target_size"] == [32, 32] and row["latent_shape"] == [4, 4, 4]
        assert row["upscaled"] == (min(width, height) < 32)


def test_logvar_and_seeded_samples_reproduce_stock_diffusers(tmp_path, kl_dir, photo_folder):
    encode(kl_dir, photo_folder, tmp_path / "sample", latent="sample", seed=7, batch_size=4)
    encode(kl_dir, photo_folder, tmp_path / "logvar", latent="mean_logvar", batch_size=4)
    samples, _ = load_latent_dataset(tmp_path / "sample")
    logvars, _ = load_latent_dataset(tmp_path / "logvar")
    vae = AutoencoderKL.from_pretrained(kl_dir).eval()
    for row_s, row_l in zip(samples, logvars):
        crop = crop_image(load_image(photo_folder / row_s["id"]), 32, None, "center", False, random.Random(0))
        with torch.no_grad():
            posterior = vae.encode(to_tensor(crop)[None]).latent_dist
            # The recorded seed reproduces the row with stock diffusers, one image at a time.
            sample = posterior.sample(generator=torch.Generator().manual_seed(row_s["sample_seed"]))
        assert row_s["sample_seed"] == derive_seed(7, row_s["index"])
        assert torch.allclose(as_tensor(row_s["latent"]), sample[0], atol=ATOL, rtol=0)
        assert torch.allclose(as_tensor(row_l["logvar"]), posterior.logvar[0], atol=ATOL, rtol=0)
        assert torch.allclose(as_tensor(row_l["latent"]), posterior.mean[0], atol=ATOL, rtol=0)


def test_vq_rows_hold_stock_latents_and_token_ids(tmp_path, photo_folder):
    vq_dir = save_diffusers_model(tiny("tiny-vq"), tmp_path / "vq")
    encode(vq_dir, photo_folder, tmp_path / "latents", batch_size=4)
    rows, _ = load_latent_dataset(tmp_path / "latents")
    vq = VQModel.from_pretrained(vq_dir).eval()
    assert len(rows) == 6
    for row in rows:
        crop = crop_image(load_image(photo_folder / row["id"]), 32, None, "center", False, random.Random(0))
        with torch.no_grad():
            latents = vq.encode(to_tensor(crop)[None]).latents
            indices = vq.quantize(latents)[2][2]  # what stock VQModel.decode quantises to
        assert torch.equal(torch.tensor(row["tokens"]), indices.reshape(4, 4))
        assert torch.allclose(as_tensor(row["latent"]), latents[0], atol=ATOL, rtol=0)


def test_dataset_columns_pass_through_unchanged(tmp_path, kl_dir, photo_folder):
    files = sorted(photo_folder.glob("*.png"))[:4]
    source = datasets.Dataset.from_dict({
        "image": [str(f) for f in files], "caption": [f"photo number {i}" for i in range(4)],
        "label": [3, 1, 4, 1], "id": ["x", "y", "z", "w"],
    }).cast_column("image", datasets.Image())
    source.save_to_disk(str(tmp_path / "dataset"))
    encode(kl_dir, tmp_path / "dataset", tmp_path / "latents", batch_size=3, shard_size=3)
    rows, _ = load_latent_dataset(tmp_path / "latents")
    assert rows["id"] == ["0", "1", "2", "3"]  # stable id of a dataset row: its index
    assert rows["caption"] == source["caption"] and rows["label"] == source["label"]
    assert rows["source_id"] == source["id"]  # a source column named like ours is kept, renamed
    assert rows.features["label"] == source.features["label"]


def test_fp16_storage_round_trips_exactly_and_bf16_is_refused(tmp_path, kl_dir, photo_folder):
    encode(kl_dir, photo_folder, tmp_path / "fp32", batch_size=6)
    reference, _ = load_latent_dataset(tmp_path / "fp32")
    encode(kl_dir, photo_folder, tmp_path / "fp16", batch_size=6, dtype="fp16")
    rows, config = load_latent_dataset(tmp_path / "fp16")
    assert rows.features["latent"] == datasets.Array3D((4, 4, 4), "float16")
    for row, ref in zip(rows, reference):
        stored = latent_to_tensor(row["latent"], "fp16")
        assert stored.dtype == torch.float16 and torch.equal(stored, as_tensor(ref["latent"]).half())
    # Fixed-shape arrays: the torch format gives float tensors of the latent's shape, per row and
    # per batch, holding the stored fp16 values exactly.
    batch = rows.with_format("torch")[:3]["latent"]
    assert batch.dtype == torch.float32 and batch.shape == (3, 4, 4, 4)
    assert torch.equal(batch.half(), as_tensor(reference["latent"][:3]).half())
    with pytest.raises(ConfigError, match="bf16 is not offered.*use --dtype fp16"):
        encode(kl_dir, photo_folder, tmp_path / "bf16", dtype="bf16")
    assert not (tmp_path / "bf16").exists()


def test_sdxl_buckets_record_what_was_done(tmp_path, kl_dir):
    sizes = {"wide.png": (200, 50), "tall.png": (60, 150), "square.png": (64, 64), "small.png": (20, 10)}
    folder = write_images(tmp_path / "images", sizes)
    encode(kl_dir, folder, tmp_path / "latents", buckets="sdxl", resolution=64, batch_size=4)
    rows, config = load_latent_dataset(tmp_path / "latents")
    buckets = bucket_sizes(64, 16)  # sides: the VAE factor 8 × the default --patch-size 2
    assert config["buckets"] == [list(b) for b in buckets] and [64, 64] in config["buckets"]
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    upscaled = set()
    for row in rows:
        width, height = sizes[row["id"]]
        target_h, target_w = row["target_size"]
        distance = lambda h, w: abs(math.log(w / h) - math.log(width / height))  # noqa: E731
        assert distance(target_h, target_w) == min(distance(h, w) for h, w in buckets)
        scale = max(target_h / height, target_w / width)
        resized = [max(target_h, round(height * scale)), max(target_w, round(width * scale))]
        assert row["resized_size"] == resized and row["original_size"] == [height, width]
        assert row["crop_top_left"] == [(resized[0] - target_h) // 2, (resized[1] - target_w) // 2]
        assert row["latent_shape"] == [4, target_h // 8, target_w // 8] and row["upscaled"] == (scale > 1)
        upscaled |= {row["id"]} if scale > 1 else set()
    assert upscaled == {"small.png"}
    square = next(row for row in rows if row["id"] == "square.png")  # no resize, no crop: the image itself
    with torch.no_grad():
        expected = AutoencoderKL.from_pretrained(kl_dir).encode(to_tensor(load_image(folder / "square.png"))[None])
    assert torch.allclose(as_tensor(square["latent"]), expected.latent_dist.mean[0], atol=ATOL, rtol=0)

    # --no-upscale: the image that would be upscaled is listed with the reason, not encoded.
    summary = encode(kl_dir, folder, tmp_path / "no_upscale", buckets="sdxl", resolution=64, upscale=False)
    assert (summary.encoded, summary.failed) == (3, 1)
    [failure] = read_failures(tmp_path / "no_upscale")
    assert failure["id"] == "small.png" and "upscaling is off" in failure["reason"]


# --------------------------------------------------------------------------- nothing lost


def test_unreadable_inputs_are_listed_and_the_rest_encoded(tmp_path, kl_dir, photo_folder, capsys):
    good = sorted(p.name for p in photo_folder.glob("*.png"))
    (photo_folder / "empty.png").write_bytes(b"")
    (photo_folder / "notes.jpg").write_text("not an image")
    whole = (photo_folder / good[0]).read_bytes()
    (photo_folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "latents"
    assert main(["encode", "--model", str(kl_dir), "--data", str(photo_folder), "--output-dir", str(out),
                 "--resolution", "32", "--num-workers", "1", "--shard-size", "4"]) == 0
    assert "read 9, encoded 6, failed 3" in capsys.readouterr().out
    failures = read_failures(out)
    assert sorted(f["id"] for f in failures) == ["empty.png", "notes.jpg", "truncated.png"]
    assert all(f["reason"] for f in failures)
    assert datasets.load_from_disk(str(out))["id"] == good


KILLABLE_ENCODE = """
import sys, time, torch
torch.set_num_threads(1)
from latent_vae.encode.run import encode_dataset
from latent_vae.models.loading import load_autoencoder
model, data, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
vae = load_autoencoder(model)
vae.encoder.register_forward_pre_hook(lambda module, args: time.sleep(delay))  # a slow encoder
s = encode_dataset(vae, data, out, resolution=32, shard_size=2, batch_size=1, num_workers=0, progress=False)
print("counts", s.read, s.encoded, s.failed, s.resumed)
"""


def test_sigkill_then_rerun_gives_exactly_one_row_per_readable_input(tmp_path, kl_dir):
    folder = tmp_path / "images"
    names = [p.name for p in write_photo_crops(folder, count=9, size=32)]
    (folder / "photo_04b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # index 5 of 10, in shard 2
    out = tmp_path / "latents"
    script = tmp_path / "encode.py"
    script.write_text(KILLABLE_ENCODE)
    command = [sys.executable, str(script), str(kl_dir), str(folder), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "0.3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list((out / "shards").glob("*.json"))) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (out / "summary.json").exists()
    done = sorted(p.stem for p in (out / "shards").glob("shard-*.json"))
    assert 2 <= len(done) < 5
    # What a kill in the middle of a shard write leaves: a torn file under the final name
    # (never counted: it has no manifest) and a stale temporary file.
    unfinished = next(j for j in range(5) if f"shard-{j:06d}" not in done)
    (out / "shards" / f"shard-{unfinished:06d}.arrow").write_bytes(b"torn")
    (out / "shards" / f".shard-{unfinished:06d}.arrow.tmp-1").write_bytes(b"torn")

    rerun = subprocess.run([*command, "0"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    read, encoded, failed, resumed = map(int, rerun.stdout.split("counts")[1].split())
    assert (read, encoded, failed, resumed) == (10, 9, 1, 2 * len(done))
    rows = datasets.load_from_disk(str(out))
    assert rows["id"] == sorted(names)  # every readable input once, in order: no duplicate, no gap
    assert [f["id"] for f in read_failures(out)] == ["photo_04b.png"]
    # Rows of the killed run and of the rerun are what an uninterrupted run writes.
    encode(kl_dir, folder, tmp_path / "uninterrupted", shard_size=2, batch_size=1)
    clean = datasets.load_from_disk(str(tmp_path / "uninterrupted"))
    assert torch.allclose(as_tensor(rows["latent"]), as_tensor(clean["latent"]), atol=ATOL, rtol=0)


def test_a_different_encode_into_the_same_directory_is_refused(tmp_path, kl_dir, photo_folder):
    out = tmp_path / "latents"
    encode(kl_dir, photo_folder, out)
    with pytest.raises(ConfigError, match="resolution: 32 -> 64"):
        encode(kl_dir, photo_folder, out, resolution=64)
    assert encode(kl_dir, photo_folder, out, resolution=64, overwrite=True).encoded == 6
    assert load_latent_dataset(out)[0][0]["latent_shape"] == [4, 8, 8]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no latent_vae encode"):
        encode(kl_dir, photo_folder, tmp_path / "other")


@pytest.mark.multiprocess
def test_two_processes_write_the_same_rows_as_one(tmp_path, kl_dir, photo_folder):
    (photo_folder / "broken.png").write_bytes(b"not a png")
    args = ["--model", str(kl_dir), "--data", str(photo_folder), "--resolution", "32", "--shard-size", "2",
            "--batch-size", "2", "--num-workers", "0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_scripts" / "encode_dataset.py"), *args, "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read 7, encoded 6, failed 1" in result.stdout
    encode(kl_dir, photo_folder, tmp_path / "one", shard_size=2, batch_size=2)
    one, two = datasets.load_from_disk(str(tmp_path / "one")), datasets.load_from_disk(str(tmp_path / "two"))
    assert two["id"] == one["id"] and two["index"] == one["index"]
    assert torch.allclose(as_tensor(two["latent"]), as_tensor(one["latent"]), atol=ATOL, rtol=0)
    assert read_failures(tmp_path / "two") == read_failures(tmp_path / "one")


# --------------------------------------------------------------------------- fast paths


@pytest.fixture(scope="module")
def photo_pixels() -> torch.Tensor:
    source, _ = sample_photo_sources()
    crops = [Preprocessing(32)(source.read(i))[0] for i in range(4)]
    return torch.stack([torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1) for c in crops])


def test_fast_paths_compute_what_the_plain_path_computes(photo_pixels):
    vae = tiny("tiny-kl")
    plain = torch.cat([LatentEncoder(copy.deepcopy(vae))(p[None])["latent"] for p in photo_pixels])  # batch 1
    scale = plain.std().item()
    variants = {
        "batched": (dict(), ATOL),
        "channels_last": (dict(channels_last=True), 1e-3 * scale),
        "compiled": (dict(compile=True, compile_backend="aot_eager"), ATOL),
        "bf16 autocast": (dict(precision="bf16"), 0.1 * scale),
        "fp16 autocast": (dict(precision="fp16"), 0.02 * scale),
    }
    for name, (options, tolerance) in variants.items():
        encoder = LatentEncoder(copy.deepcopy(vae), **options)
        fast = encoder(photo_pixels)["latent"]
        assert (fast - plain).abs().max().item() <= tolerance, name
        assert encoder.compile_failure is None and encoder.fp32_retries == 0, name


def test_fp16_overflow_is_recomputed_in_fp32(photo_pixels):
    vae = tiny("tiny-kl")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e6)  # activations far beyond fp16's 65504
    plain = LatentEncoder(copy.deepcopy(vae))(photo_pixels)["latent"]
    encoder = LatentEncoder(vae, precision="fp16")
    out = encoder(photo_pixels)["latent"]
    assert encoder.fp32_retries == 1 and torch.isfinite(out).all()
    assert torch.allclose(out, plain, atol=ATOL, rtol=1e-5)


def test_compile_falls_back_to_eager_when_unavailable(photo_pixels, monkeypatch, caplog):
    vae = tiny("tiny-kl")
    plain = LatentEncoder(copy.deepcopy(vae))(photo_pixels)["latent"]

    def compile_that_fails_at_first_call(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found")
        return compiled

    for fake in (compile_that_fails_at_first_call, lambda fn, **kwargs: (_ for _ in ()).throw(RuntimeError("no"))):
        monkeypatch.setattr(torch, "compile", fake)
        encoder = LatentEncoder(copy.deepcopy(vae), compile=True)
        assert torch.allclose(encoder(photo_pixels)["latent"], plain, atol=ATOL, rtol=0)
        assert encoder.compile_failure.startswith("RuntimeError")
    assert "continuing without compilation" in caplog.text


# --------------------------------------------------------------------------- tiling and decode


def test_tiled_encode_and_decode_are_diffusers_tiling_and_agree_with_untiled(tmp_path, kl_dir):
    folder = write_images(tmp_path / "images", {"big.png": (192, 192)})
    encode(kl_dir, folder, tmp_path / "whole", resolution=192)
    encode(kl_dir, folder, tmp_path / "tiled", resolution=192, tiled=True, tile_size=64, tile_overlap=0.25)
    whole = as_tensor(load_latent_dataset(tmp_path / "whole")[0][0]["latent"])[None]
    tiled = as_tensor(load_latent_dataset(tmp_path / "tiled")[0][0]["latent"])[None]

    vae = AutoencoderKL.from_pretrained(kl_dir).eval()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 64, 8, 0.25
    x = to_tensor(load_image(folder / "big.png"))[None]
    with torch.no_grad():
        stock_tiled = vae.encode(x).latent_dist.mean
        stock_tiled_images = vae.decode(whole).sample
        vae.disable_tiling()
        untiled_images = vae.decode(whole).sample
    assert torch.allclose(tiled, stock_tiled, atol=ATOL, rtol=0) and not torch.allclose(tiled, whole, atol=1e-3)

    decode_latents(tmp_path / "whole", tmp_path / "previews", limit=None, tiled=True, tile_size=64, progress=False)
    [png] = sorted((tmp_path / "previews").glob("*.png"))
    decoded = torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert (decoded - stock_tiled_images.clamp(-1, 1)).abs().max() <= 1.01 / 127.5  # uint8 rounding
    # Agreement with untiled decoding. Random weights are the worst case (measured ~14 dB here;
    # trained VAEs reach far more, see docs/BENCHMARKS.md), and the seams are no sharper than the
    # image: the column-to-column jump at tile boundaries stays near the median jump.
    assert psnr_per_image(stock_tiled_images, untiled_images).item() > 12.0
    jumps = (stock_tiled_images[..., 1:] - stock_tiled_images[..., :-1]).abs().mean(dim=(0, 1, 2))
    boundaries = torch.arange(48, 192, 48) - 1
    assert jumps[boundaries].mean() < 2.0 * jumps.median()


def test_tile_overlap_that_would_misplace_tiles_is_refused():
    with pytest.raises(ConfigError, match="multiple of 1/8"):
        configure_tiling(tiny("tiny-kl"), 64, 0.3)
    with pytest.raises(ConfigError, match="VQModel has no tiled"):
        configure_tiling(tiny("tiny-vq"), 64, 0.25)


def test_decode_writes_what_stock_diffusers_decodes(tmp_path, kl_dir, photo_folder, capsys):
    encode(kl_dir, photo_folder, tmp_path / "latents", dtype="fp16")
    assert main(["decode", "--latents", str(tmp_path / "latents"), "--output-dir", str(tmp_path / "previews"),
                 "--limit", "2"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    rows, _ = load_latent_dataset(tmp_path / "latents")
    files = sorted((tmp_path / "previews").glob("*.png"))
    assert [f.name for f in files] == ["000000-photo_00.png", "000001-photo_01.png"]
    vae = AutoencoderKL.from_pretrained(kl_dir).eval()
    for row, file in zip(rows, files):
        with torch.no_grad():
            stock = vae.decode(latent_to_tensor(row["latent"], "fp16").float()[None]).sample
        expected = ((stock.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0)
        assert (torch.from_numpy(np.array(Image.open(file))).float() - expected).abs().max() <= 1


# --------------------------------------------------------------------------- statistics


def test_statistics_of_a_known_distribution_are_exact(tmp_path):
    rng = np.random.default_rng(0)
    means, stds = np.array([1e4, -2.0, 0.0, 3.0]), np.array([1e-2, 0.5, 1.0, 2.0])
    # Two latent shapes (aspect-ratio buckets) and a mean of 1e4 with std 1e-2: a naive
    # sum-of-squares loses every digit here.
    latents = [rng.normal(means[:, None, None], stds[:, None, None], size=(4, *shape)).astype(np.float32)
               for shape in [(8, 8)] * 20 + [(4, 16)] * 20]
    for dtype in ("fp32", "fp16"):
        stored = [z.astype(np.float16) if dtype == "fp16" else z for z in latents]
        rows = datasets.Dataset.from_dict({"latent": [z.tolist() for z in stored],
                                           "latent_shape": [list(z.shape) for z in latents]})
        stats = latent_statistics(rows, dtype, batch_size=16)
        values = np.stack([latent_to_tensor(z, dtype).double().numpy().reshape(4, -1) for z in stored], axis=1)
        per_channel = values.reshape(4, -1)
        assert np.allclose(stats.channel_mean, per_channel.mean(axis=1), rtol=1e-9, atol=0)
        assert np.allclose(stats.channel_std, per_channel.std(axis=1, ddof=1), rtol=1e-9, atol=0)
        assert math.isclose(stats.mean, values.mean(), rel_tol=1e-9)
        assert math.isclose(stats.std, values.std(ddof=1), rel_tol=1e-9)
        assert math.isclose(stats.scaling_factor, 1 / values.std(ddof=1), rel_tol=1e-9)
        # ... and they are the distribution's parameters, up to sampling error (and fp16 rounding
        # of 1e4, whose spacing is 8: that channel's std is then the rounding's).
        assert np.allclose(stats.channel_mean[1:], means[1:], atol=0.05)
        assert np.allclose(stats.channel_std[1:], stds[1:], rtol=0.05)
        assert stats.values_per_channel == 40 * 64 and stats.rows == 40


def test_stats_write_the_scale_into_a_config_that_diffusers_loads(tmp_path, kl_dir, photo_folder, capsys):
    encode(kl_dir, photo_folder, tmp_path / "latents", dtype="fp16")
    model = save_diffusers_model(AutoencoderKL.from_pretrained(kl_dir), tmp_path / "model")
    assert main(["stats", "--latents", str(tmp_path / "latents"), "--write-to", str(model)]) == 0
    assert "wrote scaling_factor, shift_factor" in capsys.readouterr().out
    rows, _ = load_latent_dataset(tmp_path / "latents")
    values = np.stack([latent_to_tensor(z, "fp16").double().numpy() for z in rows["latent"]], axis=1)
    values = values.reshape(4, -1)
    check = run_python(
        "import json, sys; from diffusers import AutoencoderKL\n"
        "vae = AutoencoderKL.from_pretrained(sys.argv[1])\n"
        "assert 'latent_vae' not in sys.modules\n"
        "c = vae.config\n"
        "print(json.dumps([c.scaling_factor, c.shift_factor, c.latents_mean, c.latents_std]))",
        str(model))
    assert check.returncode == 0, check.stderr[-2000:]
    scaling, shift, channel_mean, channel_std = json.loads(check.stdout.strip().splitlines()[-1])
    assert math.isclose(scaling, 1 / values.std(ddof=1), rel_tol=1e-9)
    assert math.isclose(shift, values.mean(), rel_tol=1e-9, abs_tol=1e-12)
    assert channel_mean is None and channel_std is None  # never both sets: SDXL pipelines would scale twice
    assert json.loads((tmp_path / "latents" / "latent_stats.json").read_text())["scaling_factor"] == scaling

    assert main(["stats", "--latents", str(tmp_path / "latents"), "--write-to", str(model),
                 "--fields", "per-channel"]) == 0
    config = AutoencoderKL.load_config(model)
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] is None
    assert np.allclose(config["latents_mean"], values.mean(axis=1), rtol=1e-9, atol=1e-12)
    assert np.allclose(config["latents_std"], values.std(axis=1, ddof=1), rtol=1e-9)


# --------------------------------------------------------------------------- command line


def test_command_line_defaults_are_the_api_defaults():
    args = build_parser().parse_args(["encode", "--model", "m", "--output-dir", "o"])
    defaults = EncodeOptions()
    for name in ("resolution", "buckets", "patch_size", "upscale", "latent", "seed", "dtype", "layout", "precision",
                 "tiled", "tile_size",
                 "tile_overlap", "image_column", "split", "shard_size", "batch_size", "channels_last", "compile",
                 "compile_backend", "overwrite", "keep_shards", "output_format", "shards", "streaming", "shard_slice",
                 "max_samples", "push_to_hub", "hub_private"):
        assert getattr(args, name) == getattr(defaults, name), name
