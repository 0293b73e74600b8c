"""Building the model a run trains (a preset or an existing VAE) and loading diffusers folders or hub ids."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from diffusers import AutoencoderKL, AutoencoderTiny, VQModel

from ..config import ModelConfig
from ..errors import ConfigError
from ..presets import check_preset
from .checks import build_on_meta, check_config, check_weights_match, read_json_config, read_safetensors_header
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


SUPPORTED = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel, "AutoencoderTiny": AutoencoderTiny}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def load_autoencoder(name_or_path: str, subfolder: Optional[str] = None) -> Autoencoder:
    """An ``AutoencoderKL``, ``VQModel`` or ``AutoencoderTiny`` from a diffusers folder or a hub id.

    A local folder's config is checked field by field and against the shapes its safetensors
    header declares before anything is built (``models.checks``). Only safetensors weights are
    read: a folder holding pickled ``.bin`` weights is refused (convert it with ``diffusers``
    ``save_pretrained(safe_serialization=True)`` first).
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
        config = read_json_config(folder / "config.json")
        cls = check_config(config, SUPPORTED, str(folder))
        if (folder / WEIGHTS_NAME).is_file():
            check_weights_match(build_on_meta(cls, config, str(folder)), read_safetensors_header(folder / WEIGHTS_NAME),
                                str(folder))
    else:
        config = AutoencoderKL.load_config(name_or_path, subfolder=subfolder)
        cls = check_config(config, SUPPORTED, name_or_path)
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder, use_safetensors=True)
    except (OSError, EnvironmentError) as err:
        if "safetensors" in str(err).lower() or "model.safetensors" in str(err):
            raise OSError(
                f"{name_or_path}: no safetensors weights found. Pickled .bin/.pt weights are "
                "refused because loading them can execute code; convert them to safetensors first."
            ) from None
        raise
