"""Shared fixtures: tiny fast configs, generated image folders, a local LPIPS weights file.

Nothing here touches the network or ../shared: images are generated or come from the
photographs bundled with scikit-image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the models here are tiny (little to parallelise), and on a 2-core machine
# two OpenMP threads per process spin against DataLoader workers and subprocesses (measured:
# a 100-step tiny run took 10 s with one thread, 295 s with two on a loaded machine).
torch.set_num_threads(1)

from latent_vae.config import load_config
from latent_vae.runtime import reset_accelerate_state as reset_accelerate

# Fast settings for loop-mechanics tests: 32 px crops, no workers, no trackers, no LPIPS.
FAST = [
    "data.resolution=32", "data.resize=48", "data.num_workers=0", "data.val_images=0",
    "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=1000", "train.val_every=1000",
    "logging.trackers=[]", "logging.image_every=1000", "reconstruction.perceptual_weight=0",
    "export.scaling_images=4",
]


def fast_config(*overrides: str):
    return load_config(None, [*FAST, *overrides])


def trained_run(tmp_path_factory, name: str, *overrides: str) -> tuple:
    """``load_config(None, overrides)`` trained into a fresh folder: (the folder, its ``RunSummary``)."""
    from latent_vae.train.loop import train

    out = tmp_path_factory.mktemp(name)
    summary = train(load_config(None, list(overrides)), out)
    reset_accelerate()
    return out, summary


@pytest.fixture
def make_config():
    return fast_config


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    yield
    reset_accelerate()


def write_photo_crops(folder: Path, count: int = 6, size: int = 64) -> list:
    """Real photographs (scikit-image's bundled samples) cut into small PNG files."""
    from latent_vae.data.sources import sample_photo_sources

    folder.mkdir(parents=True, exist_ok=True)
    source, _ = sample_photo_sources()
    paths = []
    for i in range(count):
        image = source.read(i % len(source)).resize((size + 16, size + 16))
        path = folder / f"photo_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    folder = tmp_path / "photos"
    write_photo_crops(folder)
    return folder


@pytest.fixture(scope="session")
def lpips_weights(tmp_path_factory) -> Path:
    """A local VGG16 weights file in torchvision's layout (random values: the download is
    impossible offline). Exercises the real loading path a user takes with a downloaded file."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    path = tmp_path_factory.mktemp("lpips") / "vgg16-features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def run_python(code: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (nothing of this process leaks in)."""
    # Same intra-op thread count as this process: bit-identical comparisons need the same kernels.
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
