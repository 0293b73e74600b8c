"""Building the model a run trains (a preset or an existing VAE) and loading diffusers folders or hub ids."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from diffusers import AutoencoderKL, AutoencoderTiny, VQModel

from ..config import ModelConfig
from ..errors import ConfigError
from ..presets import check_preset
from .checks import (
    build_on_meta,
    check_config,
    check_tiny_levels,
    check_weights_match,
    read_json_config,
    read_safetensors_header,
)
from .init import lowpass_init
from .stock import Autoencoder, is_tiny


def build_autoencoder(cfg: ModelConfig) -> Autoencoder:
    """The diffusers model a run trains: a preset (initialised as ``model.init`` says), or an existing VAE
    (``model.pretrained``)."""
    if cfg.pretrained:
        if cfg.config:
            raise ConfigError(
                "model.config cannot change the architecture of model.pretrained; "
                "remove model.config or train from a preset"
            )
        model = load_autoencoder(cfg.pretrained, subfolder=cfg.subfolder)
        found = type(model).__name__
        if cfg.pretrained_class and found != cfg.pretrained_class:
            recipe = "vq-f8" if found == "VQModel" else "kl-f8"
            raise ConfigError(
                f"model.pretrained={cfg.pretrained} is a {found}, but this recipe fine-tunes an {cfg.pretrained_class} "
                f"(model.pretrained_class: its losses and numbers are for that kind of model); start from a recipe for "
                f"a {found} instead, e.g. --config {recipe} model.pretrained={cfg.pretrained} model.trainable=decoder"
            )
        return model
    preset = check_preset(cfg.preset)
    kwargs = {**preset.kwargs, **cfg.config}
    try:
        model = preset.cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model.config does not fit {preset.cls.__name__}: {err}") from None
    if is_tiny(model):
        check_tiny_levels(model.config, "model.config")
    return lowpass_init(model) if cfg.init == "lowpass" else model


SUPPORTED = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel, "AutoencoderTiny": AutoencoderTiny}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# What every --model (and model.pretrained) accepts, said in each "not found" message.
EXPECTED = ("expected a diffusers model folder (config.json + diffusion_pytorch_model.safetensors), a Hub id "
            "(owner/name; --subfolder vae for a pipeline repository), or for a single .safetensors file "
            "`latent-vae import --checkpoint FILE --output-dir DIR` first")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(reference: str) -> bool:
    """``owner/name`` (or a bare canonical name) that is not a path on this machine."""
    return bool(HUB_ID.match(str(reference))) and not Path(reference).exists()


def check_model_reference(name_or_path: str, subfolder: Optional[str] = None) -> None:
    """One line naming ``name_or_path`` and what was expected, for what can be told without the network:
    a missing folder, a file, a folder without config.json. (A Hub id is checked when it is loaded.)"""
    local = Path(name_or_path)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a diffusers model folder (no config.json); {EXPECTED}")
    elif local.exists():
        raise FileNotFoundError(f"{name_or_path} is a file, not a model folder; {EXPECTED}")
    elif not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such folder, and not a Hub id; {EXPECTED}")


def load_autoencoder(name_or_path: str, subfolder: Optional[str] = None) -> Autoencoder:
    """An ``AutoencoderKL``, ``VQModel`` or ``AutoencoderTiny`` from a diffusers folder or a hub id.

    A local folder's config is checked field by field and against the shapes its safetensors
    header declares before anything is built (``models.checks``). Only safetensors weights are
    read: a folder holding pickled ``.bin`` weights is refused (convert it with ``diffusers``
    ``save_pretrained(safe_serialization=True)`` first). A reference that is none of these is one
    line naming it and what was expected (``check_model_reference``).
    """
    name_or_path = str(name_or_path)
    check_model_reference(name_or_path, subfolder)
    local = Path(name_or_path)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        config = read_json_config(folder / "config.json")
        cls = check_config(config, SUPPORTED, str(folder))
        if (folder / WEIGHTS_NAME).is_file():
            check_weights_match(build_on_meta(cls, config, str(folder)), read_safetensors_header(folder / WEIGHTS_NAME),
                                str(folder))
    else:
        try:
            config = AutoencoderKL.load_config(name_or_path, subfolder=subfolder)
        except (OSError, ValueError) as err:  # not on the Hub, no network (offline), no config.json there
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FileNotFoundError(f"{name_or_path}: no such local folder, and the Hub id could not be loaded "
                                    f"({reason}); {EXPECTED}") from None
        cls = check_config(config, SUPPORTED, name_or_path)
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder, use_safetensors=True)
    except OSError as err:
        if "safetensors" in str(err).lower():
            raise FileNotFoundError(
                f"{name_or_path}: no safetensors weights found. Pickled .bin/.pt weights are "
                "refused because loading them can execute code; convert them to safetensors first."
            ) from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(f"{name_or_path}: {reason}; {EXPECTED}") from None
