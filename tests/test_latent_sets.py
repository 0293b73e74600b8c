"""Latent sets that the tools users already run consume as they are: the diffusers layout read by a
faithful reimplementation of diffusers' SDXL training script's precomputed-latents data path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import write_photo_crops
from diffusers import AutoencoderKL, DDPMScheduler

from latent_vae.data.images import load_image
from latent_vae.encode.preprocess import Preprocessing, bucket_sizes, to_model_input
from latent_vae.encode.run import encode_dataset
from latent_vae.errors import ConfigError, DataError
from latent_vae.interop.export import save_diffusers_model
from latent_vae.presets import PRESETS

RESOLUTION = 32


def tiny_kl(**config):
    torch.manual_seed(0)
    return AutoencoderKL(**{**PRESETS["tiny-kl"].kwargs, **config}).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_photo_crops(folder, count=5, size=40)
    return folder


def encode(model, data, out, **options):
    options = {"resolution": RESOLUTION, "num_workers": 0, "progress": False, "batch_size": 2, **options}
    return encode_dataset(model, data, out, **options)


# ---- diffusers examples/text_to_image/train_text_to_image_sdxl.py, the precomputed-latents path
# (collate_fn, the step's use of the batch and compute_time_ids), with the text embeddings left out.
# One change, documented in docs/ENCODING.md: rows read from disk hold lists where the script's
# preprocess_train made tuples, so compute_time_ids concatenates tuple(...) of them.

def sdxl_collate_fn(examples):
    model_input = torch.stack([torch.tensor(example["model_input"]) for example in examples])
    original_sizes = [example["original_sizes"] for example in examples]
    crop_top_lefts = [example["crop_top_lefts"] for example in examples]
    return {"model_input": model_input, "original_sizes": original_sizes, "crop_top_lefts": crop_top_lefts}


def sdxl_compute_time_ids(original_size, crops_coords_top_left, resolution):
    target_size = (resolution, resolution)
    add_time_ids = list(tuple(original_size) + tuple(crops_coords_top_left) + target_size)
    return torch.tensor([add_time_ids])


def sdxl_training_inputs(dataset, noise_scheduler, batch_size=2):
    loader = torch.utils.data.DataLoader(dataset, shuffle=False, collate_fn=sdxl_collate_fn, batch_size=batch_size)
    for batch in loader:
        model_input = batch["model_input"].to("cpu")
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        add_time_ids = torch.cat([sdxl_compute_time_ids(s, c, RESOLUTION)
                                  for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])])
        yield model_input, noisy_model_input, add_time_ids


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_sdxl_script_reads_the_diffusers_layout_as_it_is(tmp_path, images, dtype):
    vae = tiny_kl(scaling_factor=0.37)
    model_dir = save_diffusers_model(vae, tmp_path / "model")
    vae = AutoencoderKL.from_pretrained(model_dir).eval()
    out = tmp_path / "latents"
    encode(model_dir, images, out, layout="diffusers", latent="sample", seed=3, dtype=dtype)
    rows = datasets.load_from_disk(str(out))
    assert {"model_input", "latent", "original_sizes", "crop_top_lefts"} <= set(rows.column_names)
    assert rows.features["model_input"] == datasets.Array3D((4, 4, 4), "float16" if dtype == "fp16" else "float32")

    # The scale is recorded in the dataset's own metadata and in encode_config.json.
    scaling = json.loads((out / "encode_config.json").read_text())["identity"]["latent"]["diffusion_scaling"]
    assert scaling["scaling_factor"] == vae.config.scaling_factor and scaling["shift_factor"] is None
    assert "model_input = latent * scaling_factor" in rows.info.description
    assert '"scaling_factor": 0.37' in rows.info.description

    torch.manual_seed(0)
    batches = list(sdxl_training_inputs(rows, DDPMScheduler(num_train_timesteps=1000)))
    model_input = torch.cat([b[0] for b in batches])
    assert model_input.dtype == torch.float32 and model_input.shape == (5, 4, 4, 4)
    assert all(torch.isfinite(b[1]).all() for b in batches)
    tolerance = 1e-5 if dtype == "fp32" else 2e-3 * model_input.abs().max().item()
    for position, row in enumerate(rows):
        image = load_image(images / row["id"])
        # What the script's compute_vae_encodings stores: a posterior sample × scaling_factor, for
        # the same crop (the row's recorded seed reproduces the sample).
        crop, record = Preprocessing(RESOLUTION)(image)
        pixels = to_model_input(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)[None])
        with torch.no_grad():
            sample = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(row["sample_seed"]))
        expected = sample * vae.config.scaling_factor
        assert (model_input[position] - expected[0]).abs().max() <= tolerance
        raw = torch.tensor(row["latent"])
        assert torch.allclose(raw * vae.config.scaling_factor, model_input[position], atol=tolerance, rtol=0)
        time_ids = torch.cat([b[2] for b in batches])[position].tolist()
        assert time_ids == [*record["original_size"], *record["crop_top_left"], RESOLUTION, RESOLUTION]
        assert row["original_sizes"] == [image.height, image.width]


def test_model_input_applies_the_shift_or_the_per_channel_statistics_of_the_model(tmp_path, images):
    # SD3/FLUX-style shift, and SDXL-family latents_mean/latents_std: as diffusers pipelines apply them.
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    for name, config in (("shift", {"scaling_factor": 0.5, "shift_factor": 0.25}),
                         ("per-channel", {"scaling_factor": 1.0, "latents_mean": mean, "latents_std": std})):
        out = tmp_path / name
        encode(tiny_kl(**config), images, out, layout="diffusers")
        rows = datasets.load_from_disk(str(out)).with_format("torch")
        z, model_input = rows[:]["latent"], rows[:]["model_input"]
        if name == "shift":
            expected = (z - 0.25) * 0.5
            assert "model_input = (latent - shift_factor) * scaling_factor" in rows.info.description
        else:
            expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
            assert "per channel" in rows.info.description
        assert torch.allclose(model_input, expected, atol=1e-6, rtol=0), name


def test_buckets_give_latent_sides_patch_2_transformers_accept(tmp_path, images):
    for resolution in (256, 512, 768, 1024):
        for height, width in bucket_sizes(resolution, 8 * 2):
            assert (height // 8) % 2 == 0 and (width // 8) % 2 == 0 and height % 8 == 0 and width % 8 == 0
        assert all(h % 8 == 0 for b in bucket_sizes(resolution, 8) for h in b)
    assert (1024, 1024) in bucket_sizes(1024, 16) and len(bucket_sizes(1024, 16)) == 40  # SDXL's list, unchanged
    with pytest.raises(ConfigError, match="not a multiple of 16.*--patch-size 1"):
        encode(tiny_kl(), images, tmp_path / "odd", resolution=40)
    summary = encode(tiny_kl(), images, tmp_path / "patch1", resolution=40, patch_size=1)
    assert summary.encoded == 5


# --------------------------------------------------------------------------- output formats and the Hub


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory):
    """Five photos and two inputs that cannot be read."""
    folder = tmp_path_factory.mktemp("hostile")
    write_photo_crops(folder, count=5, size=40)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hostile_images):
    """The same encode in the default format: the rows every other format must hold."""
    out = tmp_path_factory.mktemp("reference") / "latents"
    encode(tiny_kl(), hostile_images, out, shard_size=3, layout="diffusers")
    return datasets.load_from_disk(str(out))


def test_parquet_shards_load_with_pyarrow_and_datasets(tmp_path, hostile_images, reference):
    import pyarrow.parquet as pq

    out = tmp_path / "latents"
    summary = encode(tiny_kl(), hostile_images, out, shard_size=3, layout="diffusers", output_format="parquet")
    assert (summary.read, summary.encoded, summary.failed) == (7, 5, 2)
    files = sorted((out / "data").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-{j:06d}-of-000003.parquet" for j in range(3)]
    # The documented plain-pyarrow route: one row per readable input, in order.
    table = pq.read_table(str(out / "data"))
    assert table.column("id").to_pylist() == reference["id"]
    latents = np.asarray(table.column("latent").to_pylist(), dtype=np.float32)
    assert np.array_equal(latents, np.asarray(reference["latent"], dtype=np.float32))
    # ... and the documented datasets route keeps the fixed-shape feature.
    rows = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert rows.features["model_input"] == datasets.Array3D((4, 4, 4), "float32")
    assert rows.with_format("torch")[:5]["model_input"].shape == (5, 4, 4, 4)
    assert sorted(json.loads(line)["id"] for line in (out / "failures.jsonl").read_text().splitlines()) == \
        ["broken.png", "notes.jpg"]


def test_webdataset_shards_hold_one_sample_per_readable_input(tmp_path, hostile_images, reference):
    out = tmp_path / "latents"
    summary = encode(tiny_kl(), hostile_images, out, shard_size=3, layout="diffusers", output_format="webdataset")
    assert (summary.encoded, summary.failed) == (5, 2)
    samples = {}
    for shard in sorted((out / "data").glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    assert len(samples) == 5 and all(set(s) == {"latent.npy", "model_input.npy", "json"} for s in samples.values())
    for key, ref in zip(sorted(samples), reference):
        record = json.loads(samples[key]["json"])
        assert record["id"] == ref["id"] and int(key) == record["index"] == ref["index"]
        assert record["original_sizes"] == ref["original_sizes"] and record["crop_top_lefts"] == ref["crop_top_lefts"]
        latent = np.load(io.BytesIO(samples[key]["latent.npy"]))
        assert latent.dtype == np.float32 and np.array_equal(latent, np.asarray(ref["latent"], dtype=np.float32))


class FakeHub:
    """huggingface_hub.HfApi without the network: a repository is a local folder."""

    root = None
    fail = False

    def whoami(self):
        return {"name": "me"}

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        assert repo_type == "dataset" and exist_ok
        (FakeHub.root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, folder_path, repo_id, repo_type=None, allow_patterns=None, commit_message=None):
        import fnmatch
        import shutil

        if FakeHub.fail:
            raise ConnectionError("no route to huggingface.co")
        for path in Path(folder_path).rglob("*"):
            relative = path.relative_to(folder_path).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                (FakeHub.root / repo_id / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, FakeHub.root / repo_id / relative)


@pytest.mark.parametrize("output_format", ["datasets", "parquet"])
def test_push_to_hub_uploads_the_shards_and_a_card(tmp_path, images, monkeypatch, output_format):
    import huggingface_hub

    FakeHub.root, FakeHub.fail = tmp_path / "hub", True
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    out = tmp_path / "latents"
    options = dict(output_format=output_format, push_to_hub="me/my-latents", shard_size=2)
    with pytest.raises(DataError, match="me/my-latents failed .*rerun the same command to retry"):
        encode(tiny_kl(), images, out, **options)
    assert (out / "summary.json").is_file()  # the encode itself is complete
    FakeHub.fail = False
    assert encode(tiny_kl(), images, out, **options).encoded == 5  # the rerun only uploads
    repo = FakeHub.root / "me" / "my-latents"
    card = (repo / "README.md").read_text()
    assert card.startswith("---\ntags:") and "path: data/*.parquet" in card
    assert "| rows | 5 of 5 inputs" in card and "scaling_factor" in card and str(tmp_path) not in card
    rows = datasets.load_dataset("parquet", data_files=str(repo / "data" / "*.parquet"), split="train")
    assert rows["id"] == sorted(p.name for p in images.glob("*.png"))


def test_push_to_hub_without_a_login_stops_before_encoding(tmp_path, images, monkeypatch):
    import huggingface_hub

    class LoggedOut(FakeHub):
        def whoami(self):
            raise OSError("no token")

    monkeypatch.setattr(huggingface_hub, "HfApi", LoggedOut)
    with pytest.raises(ConfigError, match="--push-to-hub needs a Hugging Face login: run `hf auth login`"):
        encode(tiny_kl(), images, tmp_path / "latents", push_to_hub="me/my-latents")
    assert not (tmp_path / "latents").exists()  # nothing encoded for an upload that could not happen


def test_webdataset_refuses_source_columns_json_cannot_hold(tmp_path, images):
    files = sorted(images.glob("*.png"))[:2]
    source = datasets.Dataset.from_dict({"image": [str(f) for f in files], "thumbnail": [b"\x00\x01", b"\x02"]})
    source.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "dataset"))
    with pytest.raises(ConfigError, match="thumbnail.*not JSON.*--format parquet"):
        encode(tiny_kl(), tmp_path / "dataset", tmp_path / "latents", output_format="webdataset")
    assert not (tmp_path / "latents").exists()
