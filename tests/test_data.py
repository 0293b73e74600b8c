"""Image decoding, sources and the deterministic sampler."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from latent_vae.config import DataConfig
from latent_vae.data.datasets import TrainBatchSampler, TrainDataset, collate
from latent_vae.data.images import load_image
from latent_vae.data.sources import list_image_files, open_source, sample_photo_sources, split_train_val
from latent_vae.errors import DataError, ImageReadError


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    array = np.array([[0, 32768], [65535, 257 * 10]], dtype=np.uint16)
    path = save(Image.fromarray(array), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (2, 2, 3)
    assert rgb[..., 0].tolist() == [[0, 128], [255, 10]]


def test_alpha_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    out = np.asarray(load_image(save(rgba, tmp_path / "a.png")))
    assert out[0, 0].tolist() == [255, 127, 127]
    la = Image.new("LA", (2, 2), (0, 0))
    assert np.asarray(load_image(save(la, tmp_path / "la.png")))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    path = save(palette, tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(path))[0, 0].tolist() == [0, 255, 0]
    palette.putpixel((0, 0), 0)
    path = save(palette, tmp_path / "p2.png", transparency=0)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]  # transparent -> white


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = np.asarray(load_image(path))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = save(image, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(path).size == (10, 20)


@pytest.mark.parametrize("content, reason", [
    (b"", "not a recognised image"),
    (b"this is text, not a jpeg", "not a recognised image"),
])
def test_unreadable_files_raise_with_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason):
        load_image(path)


def test_truncated_png_is_an_error_not_a_grey_image(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageReadError):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_image(path)


def test_folder_listing_is_recursive_sorted_and_survives_symlink_loops(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ("b/2.png", "a/deep/1.JPG", "a/0.webp"):
        save(Image.new("RGB", (4, 4)), tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    files, problems = list_image_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/0.webp", "a/deep/1.JPG", "b/2.png"]
    assert any("symlink loop" in p.reason for p in problems)


def test_open_source_reports_unreadable_files_and_keeps_the_rest(photo_folder):
    (photo_folder / "empty.png").write_bytes(b"")
    (photo_folder / "text.jpg").write_text("hello")
    source, failures = open_source(str(photo_folder))
    assert len(source) == 6
    assert sorted(f.key for f in failures) == ["empty.png", "text.jpg"]


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no images found in"):
        open_source(str(tmp_path))


def test_hugging_face_dataset_on_disk_with_pass_through_columns(tmp_path, photo_folder):
    import datasets

    paths = sorted(photo_folder.glob("*.png"))
    table = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "caption": [p.stem for p in paths]})
    table = table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "ds"))
    source, failures = open_source(str(tmp_path / "ds"))
    assert len(source) == len(paths) and not failures
    assert source.read(0).mode == "RGB"
    assert source.columns(1) == {"caption": paths[1].stem}
    with pytest.raises(DataError, match="no column 'pixels'"):
        open_source(str(tmp_path / "ds"), image_column="pixels")


def test_validation_split_is_fixed_and_disjoint(photo_folder):
    cfg = DataConfig(path=str(photo_folder), val_images=2)
    train_a, val_a, _ = split_train_val(cfg)
    train_b, val_b, _ = split_train_val(cfg)
    keys = lambda s: [s.key(i) for i in range(len(s))]  # noqa: E731
    assert keys(val_a) == keys(val_b) and len(keys(val_a)) == 2
    assert not set(keys(val_a)) & set(keys(train_a)) and len(train_a) == 4
    with pytest.raises(DataError, match="leaves none to train on"):
        split_train_val(DataConfig(path=str(photo_folder), val_images=6))


def test_sample_photos_are_real_and_split():
    train, val = sample_photo_sources()
    assert len(train) >= 10 and len(val) >= 2
    assert min(train.read(0).size) >= 256


def test_sampler_is_deterministic_and_shards_like_one_big_batch():
    def first(batches, n):
        it = iter(batches)
        return [next(it) for _ in range(n)]

    single = first(TrainBatchSampler(10, 4, seed=3), 5)
    assert single == first(TrainBatchSampler(10, 4, seed=3), 5)
    rank0 = first(TrainBatchSampler(10, 2, seed=3, rank=0, num_processes=2), 5)
    rank1 = first(TrainBatchSampler(10, 2, seed=3, rank=1, num_processes=2), 5)
    assert [a + b for a, b in zip(rank0, rank1)] == single
    resumed = first(TrainBatchSampler(10, 4, seed=3, start_batch=2), 3)
    assert resumed == single[2:]
    epoch_one = [i for batch in single[:3] for i, _ in batch][:10]
    assert sorted(epoch_one) == list(range(10))  # every image once per epoch
    assert first(TrainBatchSampler(10, 4, seed=4), 1) != single[:1]


def test_train_dataset_replaces_an_undecodable_image_and_reports_it(photo_folder):
    truncated = photo_folder / "photo_00.png"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    source, failures = open_source(str(photo_folder))  # the header is intact: found only at decode time
    assert not failures
    dataset = TrainDataset(source, DataConfig(resolution=32, resize=48))
    sample = dataset[(0, 123)]
    assert sample["pixel_values"].shape == (3, 32, 32)
    assert [f.key for f in sample["failures"]] == ["photo_00.png"]
    batch = collate([sample, dataset[(1, 5)]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and len(batch["failures"]) == 1
    assert batch["seeds"].tolist() == [123, 5]
    assert torch.equal(dataset[(2, 9)]["pixel_values"], dataset[(2, 9)]["pixel_values"])  # seeded crop


class CountingSource:
    """Wraps a source and counts its reads."""

    def __init__(self, source):
        self.source, self.reads = source, 0

    def __len__(self):
        return len(self.source)

    def key(self, index):
        return self.source.key(index)

    def read(self, index):
        self.reads += 1
        return self.source.read(index)


@pytest.mark.parametrize("resize", [None, 0, 96])
def test_train_crops_from_kept_resized_images_equal_fresh_reads(resize):
    """The in-memory cache of resized images is a fast path: the same crops, far fewer decodes."""
    photos, _ = sample_photo_sources()
    cfg = DataConfig(resolution=64, resize=resize)
    cached, fresh = CountingSource(photos), CountingSource(photos)
    cached_dataset, fresh_dataset = TrainDataset(cached, cfg), TrainDataset(fresh, cfg, cache_bytes=0)
    keys = [(i % len(photos), 1000 + i) for i in range(3 * len(photos))]
    for key in keys:
        assert torch.equal(cached_dataset[key]["pixel_values"], fresh_dataset[key]["pixel_values"])
    assert fresh.reads == len(keys) and cached.reads == len(photos)


def test_resized_image_cache_stops_at_its_byte_budget():
    photos, _ = sample_photo_sources()
    source = CountingSource(photos)
    one_image = 128 * 128 * 3  # every sample photo is at least 128 px on its shorter side
    dataset = TrainDataset(source, DataConfig(resolution=64, resize=128), cache_bytes=int(2.5 * one_image))
    for _ in range(2):
        for index in range(len(photos)):
            dataset[(index, index)]
    assert dataset._cached_bytes <= 2.5 * one_image and 1 <= len(dataset._cached) <= 2
    assert source.reads == 2 * len(photos) - len(dataset._cached)

