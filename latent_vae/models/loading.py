"""Building the model a run trains (a preset or an existing VAE) and loading diffusers folders or hub ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from diffusers import AutoencoderKL, VQModel

from ..config import ConfigError, ModelConfig
from ..presets import check_preset
from .stock import Autoencoder


def build_autoencoder(cfg: ModelConfig) -> Autoencoder:
    """The diffusers model a run trains: a preset, or an existing VAE (``model.pretrained``)."""
    if cfg.pretrained:
        if cfg.config:
            raise ConfigError(
                "model.config cannot change the architecture of model.pretrained; "
                "remove model.config or train from a preset"
            )
        return load_autoencoder(cfg.pretrained, subfolder=cfg.subfolder)
    preset = check_preset(cfg.preset)
    kwargs = {**preset.kwargs, **cfg.config}
    try:
        return preset.cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model.config does not fit {preset.cls.__name__}: {err}") from None


def load_autoencoder(name_or_path: str, subfolder: Optional[str] = None) -> Autoencoder:
    """An ``AutoencoderKL`` or ``VQModel`` from a diffusers folder or a hub id.

    Only safetensors weights are read: a folder holding pickled ``.bin`` weights is refused
    (convert it with ``diffusers`` ``save_pretrained(safe_serialization=True)`` first).
    """
    local = Path(name_or_path)
    if local.exists() and not local.is_dir():
        raise FileNotFoundError(
            f"{name_or_path} is a file, not a diffusers model folder; for a single-file "
            f"checkpoint run `latent-vae import --checkpoint {name_or_path} --output-dir DIR` first"
        )
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a diffusers model folder (no config.json)")
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    else:
        class_name = AutoencoderKL.load_config(name_or_path, subfolder=subfolder).get(
            "_class_name", "AutoencoderKL"
        )
    cls = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}.get(class_name)
    if cls is None:
        raise ValueError(f"{name_or_path}: {class_name} is not supported (AutoencoderKL or VQModel)")
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder, use_safetensors=True)
    except (OSError, EnvironmentError) as err:
        if "safetensors" in str(err).lower() or "model.safetensors" in str(err):
            raise OSError(
                f"{name_or_path}: no safetensors weights found. Pickled .bin/.pt weights are "
                "refused because loading them can execute code; convert them to safetensors first."
            ) from None
        raise
