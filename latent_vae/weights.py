"""Reading weight files safely, and pretrained weights from a local file, the cache or a download.

Only safetensors files and ``torch.load(weights_only=True)`` are ever used: a file holding
pickled Python objects is refused before any of them runs.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Dict, Optional, Tuple, Type

import torch
from safetensors import safe_open

from .errors import UnreadableWeights

# A blocked network should fail in seconds, not after the OS's minutes-long connect timeout.
DOWNLOAD_TIMEOUT_S = 20


def read_weights(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, safetensors metadata) of a ``.safetensors`` file, or of a ``.ckpt``/``.pt``/``.pth``
    read with ``torch.load(weights_only=True)``; Lightning's ``{"state_dict": ...}`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableWeights(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except Exception as err:  # SafetensorError: truncated or not a safetensors file
            raise UnreadableWeights(f"{path} is not a readable safetensors file ({err})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything beyond tensors; corrupt files
        raise UnreadableWeights(
            f"{path} was refused: torch.load(weights_only=True) cannot read it ({type(err).__name__}); it "
            "holds Python objects beyond tensors, and unpickling those can execute code. Use a "
            ".safetensors file or a plain tensor checkpoint"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UnreadableWeights(f"{path} does not hold a state dict")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, {}


def cached_path(url: str) -> Path:
    """Where ``torch.hub`` keeps the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def pretrained_weights(url: str, weights_path: Optional[str], unavailable: Type[Exception], what: str,
                       option: str) -> Dict[str, torch.Tensor]:
    """The state dict of ``url``: from ``weights_path`` if given, else the torch hub cache, else a
    download. Failing that, ``unavailable`` is raised with the fixes (``option`` names the setting
    that takes a local file)."""
    cached = cached_path(url)
    path = weights_path or (cached if cached.is_file() else None)
    if path is not None:
        try:
            return read_weights(path)[0]
        except UnreadableWeights as err:
            raise unavailable(f"{what}: {err}") from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                  weights_only=True)
    except Exception as err:  # URLError, timeout, hash mismatch, read-only cache...
        raise unavailable(
            f"{what} needs the weights at {url}; they are not in the torch hub cache ({cached.parent}) and the download "
            f"failed ({type(err).__name__}: {err}). Fixes: download that file where there is network and "
            f"copy it into {cached.parent}, or pass {option.format(path=f'/path/{cached.name}')}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
