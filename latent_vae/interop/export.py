"""Writing a trained model as a stock diffusers folder, with its latent scale and a model card."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
import yaml

from ..data.sources import SAMPLE_PHOTOS_NAME
from ..models.loading import is_hub_id
from ..models.stock import (
    Autoencoder,
    count_parameters,
    downsample_factor,
    is_tiny,
    is_vq,
    latent_channels,
    training_latents,
)
from ..models.tiling import DEFAULT_TILE_SIZE
from ..runtime import atomic_write, replace_dir


@torch.no_grad()
def compute_scaling_factor(model: Autoencoder, batches: Iterable[torch.Tensor], seed: int = 0) -> Optional[float]:
    """1 / std of the latents over the given images (how SD's 0.18215 was obtained)."""
    count, total, total_sq = 0, 0.0, 0.0
    generator = None
    for images in batches:
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(seed)
        latents = training_latents(model, images, generator).double()
        count += latents.numel()
        total += latents.sum().item()
        total_sq += latents.pow(2).sum().item()
    if count < 2:
        return None
    variance = (total_sq - total * total / count) / (count - 1)
    return float(1.0 / max(variance, 1e-12) ** 0.5)


def set_tile_size(model: Autoencoder, resolution: int) -> Optional[int]:
    """Set ``config.sample_size``, the tile size of stock ``enable_tiling()``, and return it.

    diffusers' default of 32 makes stock tiling cut a 256² image into 32-pixel tiles, each normalised
    (GroupNorm) on its own: colours shift and seams show (21 dB against untiled). The exported size is
    the largest of 512 px (SD 1.x's own VAE config, and ``models.tiling``'s default), the training
    resolution and a fine-tuned model's own value, rounded up to a multiple of 4 × the downsampling
    factor so that diffusers' 25% tile overlap is a whole number of latents (see ``models.tiling``).
    Images up to that size are decoded whole, exactly as untiled. An AutoencoderTiny has no such key
    (None is returned).
    """
    if is_tiny(model):  # no sample_size: diffusers' AutoencoderTiny tiles at a fixed 512 px and has no norms
        return None
    current = model.config.sample_size
    current = max(current) if isinstance(current, (list, tuple)) else int(current or 0)
    factor = downsample_factor(model)
    step = 4 * factor
    size = -(-max(DEFAULT_TILE_SIZE, int(resolution), current) // step) * step
    model.register_to_config(sample_size=size)
    if hasattr(model, "tile_sample_min_size"):  # this process's tiling follows the new config too
        model.tile_sample_min_size, model.tile_latent_min_size = size, size // factor
    return size


def save_diffusers_model(model: Autoencoder, folder: str | Path) -> Path:
    """``save_pretrained`` (safetensors) into a staging folder, then swapped into place (``runtime.replace_dir``)."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    if is_tiny(model):
        # AutoencoderTiny registers block_out_channels itself (for pipelines' vae_scale_factor) but does not
        # take it: saved, every stock load warns it "will be ignored". Loading registers it again.
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("block_out_channels", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return replace_dir(staging, folder)


def public_name(reference: Optional[str]) -> Optional[str]:
    """A model or dataset reference fit for a public card: a Hub id as it is, a local path by its last
    component only (an absolute path names the user's machine and means nothing to a reader)."""
    if not reference:
        return None
    if is_hub_id(reference):
        return reference
    return Path(str(reference).rstrip("/")).name or None


def card_metadata(model: Autoencoder, recipe: Dict, license_id: str) -> Dict:
    """The Hub's YAML front matter: what the Hub indexes, filters and links on."""
    vq = is_vq(model)
    metadata: Dict = {
        "library_name": "diffusers",
        "license": license_id,
        "tags": ["diffusers", "autoencoder", "latent-diffusion", type(model).__name__,
                 "vq-vae" if vq else "taesd" if is_tiny(model) else "vae", "latent_vae"],
    }
    pretrained = recipe.get("model", {}).get("pretrained")
    if pretrained and is_hub_id(pretrained):
        metadata["base_model"] = pretrained
        metadata["base_model_relation"] = "finetune"
    data_path = recipe.get("data", {}).get("path")
    if data_path and is_hub_id(data_path):
        metadata["datasets"] = [data_path]
    return metadata


def architecture_lines(model: Autoencoder) -> List[str]:
    """The architecture as the model's own config states it (a fine-tune's is its base model's, not a preset)."""
    config = model.config
    if is_tiny(model):
        return tiny_architecture_lines(model)
    attention = [i for i, block in enumerate(config.down_block_types) if block.startswith("Attn")]
    lines = [
        f"- class: `diffusers.{type(model).__name__}`, {count_parameters(model):,} parameters",
        f"- downsampling factor {downsample_factor(model)}, {latent_channels(model)} latent channels",
        f"- block_out_channels {list(config.block_out_channels)}, layers_per_block {config.layers_per_block}, "
        f"norm_num_groups {config.norm_num_groups}"
        + (f", attention in encoder levels {attention}" if attention else ", no attention in the down/up blocks"),
        f"- scaling_factor {config.scaling_factor:.6g}"
        + (f", shift_factor {config.shift_factor:.6g}" if getattr(config, "shift_factor", None) is not None else ""),
        f"- sample_size {config.sample_size} (the tile size of `enable_tiling()`; smaller images decode whole)",
    ]
    if is_vq(model):
        lines.append(f"- codebook: {config.num_vq_embeddings} codes of dim {latent_channels(model)}")
    return lines


def tiny_architecture_lines(model: Autoencoder) -> List[str]:
    config, factor = model.config, downsample_factor(model)
    lines = [
        f"- class: `diffusers.{type(model).__name__}` (TAESD's design: no normalisation, deterministic latents), "
        f"{count_parameters(model):,} parameters",
        f"- downsampling factor {factor}, {latent_channels(model)} latent channels",
        f"- widths: encoder {list(config.encoder_block_out_channels)} with blocks {list(config.num_encoder_blocks)}, "
        f"decoder {list(config.decoder_block_out_channels)} with blocks {list(config.num_decoder_blocks)}",
        f"- scaling_factor {config.scaling_factor:.6g}, shift_factor {config.shift_factor:.6g}",
    ]
    if factor != 8:  # AutoencoderTiny computes its tile geometry for f8 (2 ** out_channels)
        lines.append(f"- decode whole images: diffusers' `enable_tiling()` for AutoencoderTiny assumes f8, "
                     f"this model is f{factor}")
    return lines


def loss_lines(recipe: Dict) -> List[str]:
    """The objective the run actually trained with (the resolved config: a perceptual loss disabled at
    set-up for lack of weights is recorded there as weight 0)."""
    reconstruction, gan = recipe.get("reconstruction", {}), recipe.get("gan", {})
    regularizer = recipe.get("regularizer", {})
    lines = [f"- pixel loss: {reconstruction.get('pixel_loss')} × {reconstruction.get('pixel_weight')}"]
    if reconstruction.get("perceptual_weight"):
        lines.append(f"- perceptual loss: LPIPS-{reconstruction.get('perceptual_net')} × "
                     f"{reconstruction.get('perceptual_weight')}")
    else:
        lines.append("- perceptual loss: off")
    if gan.get("weight") and gan.get("start", 0) < recipe.get("train", {}).get("max_steps", float("inf")):
        lines.append(f"- GAN: PatchGAN ({gan.get('layers')} layers, {gan.get('loss')} loss) × {gan.get('weight')} "
                     f"from step {gan.get('start')}" + (", adaptive weight" if gan.get("adaptive_weight") else ""))
    else:
        late = f" (gan.start={gan.get('start')} is after the last step)" if gan.get("weight") else ""
        lines.append("- GAN: off" + late)
    kind = regularizer.get("kind")
    if kind == "kl":
        kl = regularizer.get("kl", {})
        lines.append(f"- KL weight {kl.get('weight')} ({kl.get('schedule')} schedule"
                     + (f", free bits {kl.get('free_bits')}" if kl.get("free_bits") else "") + ")")
    elif kind == "none":
        lines.append("- latent regulariser: none (deterministic AutoencoderTiny latents)")
    elif kind == "vq":
        vq = regularizer.get("vq", {})
        lines.append(f"- VQ codebook loss weight {vq.get('weight')}, commitment β {vq.get('beta')}"
                     + (f", EMA codebook (decay {vq.get('ema_decay')})" if vq.get("ema_decay") else ""))
    if reconstruction.get("reduction"):
        lines.append(f"- reduction: {reconstruction['reduction']}")
    return lines


def render_model_card(model: Autoencoder, recipe: Dict, steps: int, metrics: Dict[str, float],
                      notes: Iterable[str] = (), name: str = "model", license_id: str = "other") -> str:
    """The model card (``README.md``): Hub front matter, then how to load it, the architecture, the
    training objective and data, and the validation metrics. ``name`` is what ``from_pretrained`` is
    given in the example: the folder's name, or the Hub repository it goes to."""
    cls = type(model).__name__
    model_cfg, data, train_cfg = recipe.get("model", {}), recipe.get("data", {}), recipe.get("train", {})
    front = yaml.safe_dump(card_metadata(model, recipe, license_id), sort_keys=False, allow_unicode=True)
    lines = [
        "---", front.rstrip("\n"), "---", "",
        f"# {name.rsplit('/', 1)[-1]}", "",
        f"A stock `diffusers.{cls}` trained with latent_vae: load it with plain diffusers, no custom code.", "",
        "```python", f"from diffusers import {cls}", f'vae = {cls}.from_pretrained("{name}")', "```", "",
        "## Architecture", "",
    ]
    pretrained = public_name(model_cfg.get("pretrained"))
    if pretrained:
        trainable = "decoder only (encoder frozen)" if model_cfg.get("trainable") == "decoder" else "all weights"
        lines.append(f"- fine-tuned from `{pretrained}`" + (f" (subfolder `{model_cfg['subfolder']}`)"
                                                             if model_cfg.get("subfolder") else "")
                     + f", trained: {trainable}")
    elif model_cfg.get("preset"):
        lines.append(f"- preset `{model_cfg['preset']}`" + (", started as a low-pass autoencoder (`model.init=lowpass`)"
                                                             if model_cfg.get("init") == "lowpass" else ""))
    lines += architecture_lines(model)
    if recipe:
        data_name = public_name(data.get("path")) or f"the {SAMPLE_PHOTOS_NAME}"
        lines += ["", "## Training", "", f"- steps: {steps}, batch size {train_cfg.get('batch_size')} per process, "
                  f"learning rate {train_cfg.get('learning_rate')} per sample ({train_cfg.get('lr_scaling')} scaling)",
                  f"- data: `{data_name}`, {data.get('resolution')} px crops", *loss_lines(recipe),
                  "- the full resolved recipe is `config.yaml` in the run directory"]
    lines += ["", "## Validation", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    else:
        lines.append("No validation metrics were recorded.")
    notes = list(notes)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", f"Written {time.strftime('%Y-%m-%d')}."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, model: Autoencoder, recipe: Dict, steps: int,
                     metrics: Dict[str, float], notes: Iterable[str] = (), repo_id: Optional[str] = None) -> Path:
    """``<folder>/README.md`` (atomically), naming ``repo_id`` in its example when it goes to the Hub."""
    folder = Path(folder)
    license_id = recipe.get("export", {}).get("license") or "other"
    card = render_model_card(model, recipe, steps, metrics, notes, repo_id or folder.name, license_id)
    return atomic_write(folder / "README.md", lambda tmp: tmp.write_text(card, encoding="utf-8"))
