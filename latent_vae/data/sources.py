"""Image sources (folders, Hugging Face datasets, embedded sample photos), preprocessing,
and the deterministic, resumable training sampler.

Every random choice of the data pipeline (which image, which crop, flip or not, the
posterior noise) is a function of ``(train.seed, position in the sample stream)``. A
resumed run therefore sees exactly the batches the uninterrupted run would have seen,
and N processes with batch B see the same samples as one process with batch N·B.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..config import DataConfig
from ..errors import DataError, ImageReadError
from .images import check_header, load_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")

# Real photographs shipped inside the scikit-image wheel: the no-argument quickstart and the
# test suite train on these (greyscale ones are converted to RGB like any other input). The last
# three add the colour the first twelve lack (half are greyscale, the colour ones red/brown): a
# demo trained on those alone pulled the colours of unseen photos towards red (docs/BENCHMARKS.md,
# "Quickstart"). color.png is scikit-image's hue/saturation wheel; grace_hopper.jpg ships with
# matplotlib. New photos go at the end: tests take the first N.
SAMPLE_TRAIN_PHOTOS = ("astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                       "retina.jpg", "rocket.jpg", "camera.png", "coins.png", "moon.png",
                       "brick.png", "grass.png", "gravel.png", "motorcycle_right.png", "color.png",
                       "matplotlib:grace_hopper.jpg")
SAMPLE_VAL_PHOTOS = ("chelsea.png", "coffee.png")
SAMPLE_PHOTOS_NAME = "scikit-image and matplotlib sample photos"  # how logs and model cards name them


@dataclass
class Failure:
    """An input that could not be used, by stable id and reason."""

    key: str
    reason: str


def printable(name: str) -> str:
    """Any file name as text every writer accepts: bytes that are not UTF-8 (surrogate escapes) and
    control characters (a newline would split a one-entry-per-line list) become ``\\xNN``. A UTF-8
    name without control characters is unchanged."""
    if name.isprintable():
        return name
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(char)
    return "".join(out)


# --------------------------------------------------------------------------- sources


class ImageSource:
    """Indexable images with stable string ids and pass-through columns."""

    name: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> Image.Image:
        """The image as 8-bit RGB, or ImageReadError."""
        raise NotImplementedError

    def columns(self, index: int) -> Dict[str, Any]:
        """Other fields of the row (captions, labels...), passed through unchanged."""
        return {}

    def subset(self, indices: Sequence[int]) -> "ImageSource":
        return SubsetSource(self, list(indices))


class FolderSource(ImageSource):
    def __init__(self, root: Path, files: List[Path], name: Optional[str] = None):
        self.root, self.files = Path(root), list(files)
        self.name = name or str(root)

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        try:
            return printable(self.files[index].relative_to(self.root).as_posix())
        except ValueError:
            return printable(self.files[index].as_posix())

    def read(self, index: int) -> Image.Image:
        return load_image(self.files[index])

    def columns(self, index: int) -> Dict[str, Any]:
        return {"path": str(self.files[index])}

    def verify(self, workers: int = 8) -> Tuple["FolderSource", List[Failure]]:
        """Drop files whose header is unreadable (empty, not an image, bomb), reporting each."""

        def check(path: Path) -> Optional[str]:
            try:
                check_header(path)
                return None
            except ImageReadError as err:
                return str(err)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check, self.files))
        good = [f for f, r in zip(self.files, reasons) if r is None]
        failures = [Failure(self.key(i), r) for i, r in enumerate(reasons) if r is not None]
        return FolderSource(self.root, good, self.name), failures


class DatasetSource(ImageSource):
    """A Hugging Face ``datasets.Dataset``; images are decoded here so a bad row is skipped, not fatal."""

    def __init__(self, dataset, image_column: str, name: str):
        import datasets

        if image_column not in dataset.column_names:
            raise DataError(
                f"{name} has no column '{image_column}' (columns: {', '.join(dataset.column_names)}); "
                "set data.image_column (CLI: --image-column)"
            )
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.name = dataset, image_column, name

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, index: int) -> str:
        return str(index)

    def read(self, index: int) -> Image.Image:
        cell = self.dataset[index][self.image_column]
        if not isinstance(cell, (dict, bytes, str, Image.Image)):
            raise ImageReadError(f"the '{self.image_column}' cell is not an image (got {type(cell).__name__})")
        return load_image(cell)

    def columns(self, index: int) -> Dict[str, Any]:
        row = self.dataset[index]
        return {k: v for k, v in row.items() if k != self.image_column}


class SubsetSource(ImageSource):
    def __init__(self, parent: ImageSource, indices: List[int]):
        self.parent, self.indices, self.name = parent, indices, parent.name

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, index: int) -> str:
        return self.parent.key(self.indices[index])

    def read(self, index: int) -> Image.Image:
        return self.parent.read(self.indices[index])

    def columns(self, index: int) -> Dict[str, Any]:
        return self.parent.columns(self.indices[index])


def list_image_files(root: str | Path) -> Tuple[List[Path], List[Failure]]:
    """Image files under ``root``, recursively and sorted; symlinked folders are followed
    once (loops are cut), unreadable folders are reported rather than skipped silently."""
    root = Path(root)
    problems: List[Failure] = []
    seen_dirs = set()
    files: List[Path] = []

    def on_error(err: OSError) -> None:
        problems.append(Failure(printable(str(err.filename)), f"folder not readable: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            problems.append(Failure(printable(dirpath), "symlink loop: folder already visited"))
            dirnames[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
    return files, problems


def sample_photos_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def sample_photo_path(name: str) -> Path:
    """A bundled photo by name: scikit-image's data folder, or ``matplotlib:NAME`` for matplotlib's sample data."""
    if name.startswith("matplotlib:"):
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name.split(":", 1)[1]
    return sample_photos_dir() / name


def sample_photo_sources() -> Tuple[FolderSource, FolderSource]:
    """(train, validation) sources over the photographs bundled with scikit-image and matplotlib."""
    root = sample_photos_dir()
    train = FolderSource(root, [sample_photo_path(n) for n in SAMPLE_TRAIN_PHOTOS], SAMPLE_PHOTOS_NAME)
    val = FolderSource(root, [sample_photo_path(n) for n in SAMPLE_VAL_PHOTOS], SAMPLE_PHOTOS_NAME)
    return train, val


def _is_saved_dataset(path: Path) -> bool:
    return any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def open_source(
    path: Optional[str], image_column: str = "image", split: str = "train", verify: bool = True
) -> Tuple[ImageSource, List[Failure]]:
    """An image folder, a ``save_to_disk`` dataset, a local data folder or hub dataset name.

    Returns the source and the inputs already known to be unusable (listed, not dropped silently).
    Raises DataError when nothing usable remains.
    """
    failures: List[Failure] = []
    if path is None:
        return sample_photo_sources()[0], failures
    local = Path(path).expanduser()
    if local.is_file():
        raise DataError(f"data path {path} is a file; give an image folder or a dataset (folder or name)")
    if local.is_dir() and _is_saved_dataset(local):
        import datasets

        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} has splits {list(loaded)}, not '{split}'; set data.split")
            loaded = loaded[split]
        source: ImageSource = DatasetSource(loaded, image_column, str(local))
    elif local.is_dir():
        files, failures = list_image_files(local)
        if not files:
            raise DataError(
                f"no images found in {path} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
                + (f"; {len(failures)} folders could not be read" if failures else "")
            )
        source = FolderSource(local, files)
        if verify:
            source, bad = source.verify()
            failures += bad
    else:
        source = _load_hub_dataset(path, image_column, split)
    if len(source) == 0:
        raise DataError(f"no readable images in {path} ({len(failures)} unusable inputs listed in the run log)")
    return source, failures


def _load_hub_dataset(name: str, image_column: str, split: str) -> "DatasetSource":
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, missing repo, unknown split ...
        raise DataError(
            f"'{name}' is not a folder and could not be loaded as a Hugging Face dataset "
            f"({type(err).__name__}: {err})"
        ) from None
    return DatasetSource(dataset, image_column, name)


def split_train_val(cfg: DataConfig) -> Tuple[ImageSource, Optional[ImageSource], List[Failure]]:
    """Training and validation sources from the data config, with the unusable inputs found."""
    if cfg.path is None:
        train, val = sample_photo_sources()
        return train, (val if cfg.val_images > 0 else None), []
    source, failures = open_source(cfg.path, cfg.image_column, cfg.split, cfg.verify)
    if cfg.val_path or cfg.val_split:
        val, val_failures = open_source(cfg.val_path or cfg.path, cfg.image_column, cfg.val_split or cfg.split, cfg.verify)
        return source, val, failures + val_failures
    if cfg.val_images == 0:
        return source, None, failures
    if len(source) <= cfg.val_images:
        raise DataError(
            f"{cfg.path} has {len(source)} usable images; holding out data.val_images={cfg.val_images} "
            "for validation leaves none to train on. Lower data.val_images or set data.val_path."
        )
    # A fixed permutation (independent of train.seed) so the validation set never moves.
    order = np.random.default_rng(0).permutation(len(source))
    val_idx, train_idx = sorted(order[: cfg.val_images].tolist()), sorted(order[cfg.val_images:].tolist())
    return source.subset(train_idx), source.subset(val_idx), failures


# --------------------------------------------------------------------------- preprocessing


# --------------------------------------------------------------------------- datasets


# --------------------------------------------------------------------------- sampling




