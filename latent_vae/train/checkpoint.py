"""Atomic, verifiable training checkpoints.

Layout: ``<run>/checkpoints/checkpoint-<step:08d>/`` holding safetensors weights, the
optimiser/scheduler/scaler state (``torch.save`` of tensors and numbers only, read back with
``weights_only=True``), one RNG file per process, the config, and ``manifest.json`` written
last, with each file's size and SHA-256. Everything is first written into a hidden temporary folder and renamed into place
only when complete, so a process killed at any moment leaves either the previous
checkpoints or a new complete one, never a half-written one that ``--resume`` would pick.
Old checkpoints are pruned only after the new one is in place. On resume the content of every
file is checked against the manifest: a checkpoint corrupted in place (same size, other bytes) is
passed over for the newest one that verifies, with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..runtime import atomic_write, file_digest, fsync_path, replace_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
logger = logging.getLogger("latent_vae")
_NAME = re.compile(r"^checkpoint-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{checkpoint_name(step)}"


def write_rank_file(root: Path, step: int, rank: int, payload: Dict[str, Any]) -> None:
    """Per-process state (RNG) into the staging folder; every rank calls this before ``commit``."""
    torch.save(payload, staging_dir(root, step) / f"rng-rank{rank}.pt")


def commit(root: Path, step: int, state: Dict[str, Dict[str, Any]], metadata: Dict[str, Any], num_ranks: int) -> Path:
    """Write the main-process files, the manifest, then atomically rename into place.

    ``state``: ``TrainState.state_dict()``; each of its ``weights`` (name -> tensor dict) is saved as
    ``<name>.safetensors``, its ``training_state`` (optimiser/scheduler/scaler state dicts) as
    ``training_state.pt``. ``metadata`` (step, config...) goes to ``trainer_state.json``.
    """
    stage = staging_dir(root, step)
    for name, tensors in state["weights"].items():
        save_tensors(tensors, stage / f"{name}.safetensors")
    torch.save(state["training_state"], stage / "training_state.pt")
    (stage / "trainer_state.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    expected_rank_files = {f"rng-rank{r}.pt" for r in range(num_ranks)}
    missing = expected_rank_files - {p.name for p in stage.iterdir()}
    if missing:
        raise CheckpointError(f"checkpoint {stage} is missing per-process files {sorted(missing)}")
    files = {p.name: p.stat().st_size for p in sorted(stage.iterdir())}
    for name in files:
        fsync_path(stage / name)
    manifest = {"format": FORMAT_VERSION, "step": step, "complete": True, "files": files,
                "sha256": {name: file_digest(stage / name) for name in files},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(stage / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    # re-saving a step (e.g. after a resume) moves the old folder aside first
    return replace_dir(stage, root / checkpoint_name(step))


def discard_staging(root: Path) -> None:
    """Remove half-written checkpoints and folders an interrupted re-save moved aside (a killed or
    failed write); complete ones are untouched."""
    for leftover in [*root.glob(".tmp-*"), *root.glob(".*.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def prepare_staging(root: Path, step: int) -> Path:
    """Main process: a fresh, empty staging folder."""
    root.mkdir(parents=True, exist_ok=True)
    discard_staging(root)
    stage = staging_dir(root, step)
    stage.mkdir()
    return stage


def _manifest(path: Path) -> Optional[Dict[str, Any]]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") else None


def is_complete(path: Path) -> bool:
    """Every file the manifest lists is there with its size (cheap: for listing and pruning)."""
    manifest = _manifest(path)
    if manifest is None:
        return False
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def verify(path: Path) -> Optional[str]:
    """Why ``path`` cannot be resumed, or None: the manifest, every size and every SHA-256
    (checkpoints written before hashes were recorded are checked by size)."""
    if not is_complete(path):
        return f"no valid {MANIFEST}, or a file is missing or has the wrong size"
    for name, expected in _manifest(path).get("sha256", {}).items():
        if file_digest(path / name) != expected:
            return f"{name} does not match its SHA-256 in {MANIFEST} (corrupted on disk)"
    return None


def list_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_checkpoint(run_dir: Path, resume: str) -> Optional[Path]:
    """``latest`` / ``auto`` (newest complete checkpoint of the run) or an explicit path."""
    if resume in ("latest", "auto"):
        found = list_checkpoints(run_dir / "checkpoints")
        for candidate in reversed(found):
            reason = verify(candidate)
            if reason is None:
                return candidate
            logger.warning("checkpoint %s is passed over: %s; trying the one before it", candidate, reason)
        if found:
            raise CheckpointError(f"--resume {resume}: none of the {len(found)} checkpoints in "
                                  f"{run_dir / 'checkpoints'} verifies (see the warnings above); start a new run")
        if resume == "auto":
            return None
        raise CheckpointError(
            f"--resume latest: no complete checkpoint in {run_dir / 'checkpoints'} "
            "(use --resume auto to start fresh when there is none)"
        )
    path = Path(resume)
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"{resume} cannot be resumed: {reason}")
    return path


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_state(path: Path) -> Dict[str, Dict[str, Any]]:
    """What ``commit`` wrote, in the layout of ``TrainState.state_dict()``."""
    weights = {file.stem: load_tensors(file) for file in sorted(path.glob("*.safetensors"))}
    return {"weights": weights, "training_state": load_training_state(path)}


def load_training_state(path: Path) -> Dict[str, Any]:
    return torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)


def load_rank_file(path: Path, rank: int) -> Optional[Dict[str, Any]]:
    file = path / f"rng-rank{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None


def load_metadata(path: Path) -> Dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())
