"""Inputs that are not what they claim: pixel modes by their real range, embedded colour profiles,
decoded sizes that would explode on resize, dataset cells that are not images.

Each case fails on the code before the trust pass (docs/RELIABILITY.md lists the classes)."""

import io
import random
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from latent_vae.config import DataConfig
from latent_vae.data.datasets import TrainDataset, ValidationDataset
from latent_vae.data.images import load_image
from latent_vae.data.sources import DatasetSource
from latent_vae.data.transforms import crop_image
from latent_vae.errors import ImageReadError

# --------------------------------------------------------------------------- pixel modes


def _saved(image: Image.Image, fmt: str = "TIFF") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, values, expected", [
    # 32-bit integer data, full range: mid-grey stays mid-grey (was clipped to white)
    ("I", [0, 2**31 - 1, 2**30], [0, 255, 128]),
    # signed 32-bit data: the most negative value is black
    ("I", [-(2**31), 0, 2**31 - 1], [0, 128, 255]),
    # 16-bit data in PIL's 'I' mode
    ("I", [0, 65535, 32896], [0, 255, 128]),
    # 8-bit data in 'I' mode is left as it is
    ("I", [0, 255, 100], [0, 255, 100]),
    # float images: [0, 1], [0, 255], [0, 65535], and an unnormalised range (by its maximum)
    ("F", [0.0, 1.0, 0.5], [0, 255, 128]),
    ("F", [0.0, 255.0, 100.0], [0, 255, 100]),
    ("F", [0.0, 65535.0, 32896.0], [0, 255, 128]),
    ("F", [0.0, 1.0e6, 5.0e5], [0, 255, 128]),
])
def test_high_bit_depth_modes_are_rescaled_by_their_range(mode, values, expected):
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.fromarray(np.array([values], dtype=dtype), mode=mode)
    assert image.mode == mode
    rgb = np.asarray(load_image(_saved(image)))
    assert rgb.shape == (1, 3, 3)
    assert rgb[0, :, 0].tolist() == pytest.approx(expected, abs=1)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_pixels_make_an_unreadable_image(bad):
    image = Image.fromarray(np.array([[0.0, bad, 0.5]], dtype=np.float32), mode="F")
    with pytest.raises(ImageReadError, match="not finite"):
        load_image(_saved(image))


# --------------------------------------------------------------------------- colour profiles

# D50-adapted colorants (ICC PCS) of Adobe RGB (1998); sRGB's are r (0.4361, 0.2225, 0.0139) ...
ADOBE_RGB_COLORANTS = {b"rXYZ": (0.6097, 0.3111, 0.0195), b"gXYZ": (0.2053, 0.6257, 0.0609),
                       b"bXYZ": (0.1492, 0.0632, 0.7446)}


def wide_gamut_profile() -> bytes:
    """An RGB matrix/TRC ICC profile with Adobe RGB primaries: lcms' sRGB profile with its colorant
    tags replaced and its description renamed (nothing to download, no file shipped)."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    for i in range(count):
        signature, offset, size = struct.unpack(">4sII", data[132 + 12 * i: 144 + 12 * i])
        if signature in ADOBE_RGB_COLORANTS:
            xyz = b"".join(struct.pack(">i", round(v * 65536)) for v in ADOBE_RGB_COLORANTS[signature])
            data[offset + 8: offset + 20] = xyz
    return bytes(data).replace(b"sRGB", b"wRGB").replace("sRGB".encode("utf-16-be"), "wRGB".encode("utf-16-be"))


def test_an_embedded_wide_gamut_profile_is_converted_to_srgb():
    profile = wide_gamut_profile()
    assert "wrgb" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile))).lower()
    pixels = np.array([[[200, 60, 60], [60, 200, 60], [128, 128, 128]]], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", icc_profile=profile)
    converted = np.asarray(load_image(buffer.getvalue())).astype(int)
    # a wider gamut means the same numbers are more saturated colours: in sRGB they spread further
    red, green, grey = converted[0]
    assert red[0] - red[1] > 200 - 60 + 10
    assert green[1] - green[0] > 200 - 60 + 10
    assert abs(grey - 128).max() <= 2  # neutral stays neutral (same white point and curve)


def test_srgb_tagged_and_untagged_images_are_left_as_they_are():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for extra in ({}, {"icc_profile": srgb}):
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG", **extra)
        assert np.array_equal(np.asarray(load_image(buffer.getvalue())), pixels)


def test_a_garbled_profile_makes_the_image_unreadable_with_the_reason():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", icc_profile=b"\x00not a profile" * 4)
    with pytest.raises(ImageReadError, match="ICC"):
        load_image(buffer.getvalue())


# --------------------------------------------------------------------------- decoded size


def test_an_extreme_aspect_ratio_is_refused_before_the_resize_allocates():
    thin = Image.new("RGB", (200000, 1))
    with pytest.raises(ImageReadError, match="aspect ratio is too extreme"):
        crop_image(thin, 64, 128, "center", False, random.Random(0))


class _Images:
    """An in-memory image source."""

    name = "memory"

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def key(self, index):
        return f"img{index}"

    def read(self, index):
        return self.images[index]


def test_training_and_validation_skip_and_report_a_bomb_by_resize():
    source = _Images([Image.new("RGB", (200000, 1)), Image.new("RGB", (96, 96), (10, 20, 30))])
    cfg = DataConfig(resolution=32, resize=64)
    sample = TrainDataset(source, cfg)[(0, 7)]
    assert sample["pixel_values"].shape == (3, 32, 32)
    assert [f.key for f in sample["failures"]] == ["img0"] and "too extreme" in sample["failures"][0].reason
    val = ValidationDataset(source, cfg)[0]
    assert val["pixel_values"] is None and val["failures"][0].key == "img0"


# --------------------------------------------------------------------------- dataset cells


def test_dataset_cells_that_are_not_images_are_unreadable_rows():
    import datasets

    good = _saved(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    table = datasets.Dataset.from_dict({"image": [None, good, None]})
    source = DatasetSource(table, "image", "cells")
    with pytest.raises(ImageReadError, match="not an image .got NoneType"):
        source.read(0)
    assert source.read(1).size == (8, 8)
    for value, name in ((7, "int"), ([1, 2], "list")):
        odd = DatasetSource(datasets.Dataset.from_dict({"image": [value]}), "image", "odd")
        with pytest.raises(ImageReadError, match=f"got {name}"):
            odd.read(0)


# --------------------------------------------------------------------------- file names


def test_any_file_name_gives_a_printable_unique_id_and_stays_readable(tmp_path):
    import os

    from latent_vae.data.sources import FolderSource, list_image_files

    names = [b"bad\xff.png", b"new\nline.png", b"tab\tand \xc3\xa9.png", b"plain.png"]
    for name in names:
        Image.new("RGB", (8, 8), (9, 9, 9)).save(os.path.join(os.fsencode(tmp_path), name), format="PNG")
    files, problems = list_image_files(tmp_path)
    source = FolderSource(tmp_path, files)
    keys = [source.key(i) for i in range(len(source))]
    assert not problems and len(set(keys)) == len(names)
    assert sorted(keys) == sorted(["bad\\xff.png", "new\\x0aline.png", "tab\\x09and é.png", "plain.png"])
    for i, key in enumerate(keys):
        key.encode("utf-8")  # every writer (logs, CSV, JSON, Arrow) accepts it
        assert "\n" not in key
        assert source.read(i).size == (8, 8)
