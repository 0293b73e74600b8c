"""latent-vae import"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert an original-layout single-file VAE (A1111/ComfyUI, latent-diffusion, taming) to a diffusers folder"
DESCRIPTION = """\
Convert a single-file autoencoder checkpoint in the original latent-diffusion layout (what
AUTOMATIC1111 and ComfyUI load as a VAE), a taming-transformers / latent-diffusion VQModel, or
the first stage of a full Stable Diffusion checkpoint (first_stage_model.* keys) into a stock
diffusers AutoencoderKL / VQModel folder.

Only .safetensors files are read directly; .ckpt/.pt files are read with
torch.load(weights_only=True), which refuses any file that holds Python objects beyond tensors
(unpickling those can execute code). Attention weights stored as 1x1 convolutions or as linear
layers are both accepted.

The architecture comes from --config (a diffusers folder or config.json), else from the file's
metadata (files written by `latent-vae export`: exact round trip), else from the tensor shapes
(GroupNorm with 32 groups, as every latent-diffusion model). Single files do not store the
latent scaling factor: give it with --scaling-factor (SD 1.x/2.x: 0.18215, SDXL: 0.13025).

examples:
  latent-vae import --checkpoint some_vae.safetensors --output-dir my_vae/
  latent-vae import --checkpoint sdxl_vae.safetensors --output-dir sdxl_vae/ --scaling-factor 0.13025
  latent-vae import --checkpoint v1-5-pruned.safetensors --output-dir sd15_vae/   # full SD file: its VAE
  latent-vae import --checkpoint vqgan.ckpt --output-dir vqgan/ --config my_vqgan_config.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help=".safetensors (or .ckpt/.pt) single file")
    parser.add_argument("--output-dir", type=Path, required=True, help="diffusers model folder to write")
    parser.add_argument("--config", help="diffusers config (model folder or config.json) describing the architecture")
    parser.add_argument("--scaling-factor", type=float, help="latent scaling factor to store in the config")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output-dir if it is an existing diffusers model folder")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..interop.export import save_diffusers_model, write_model_card
    from ..interop.single_file import describe, import_single_file

    out = args.output_dir
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace a model folder")
        if not (out / "config.json").is_file():
            raise ConfigError(f"{out} is not a diffusers model folder (no config.json); refusing to replace it")
    model, notes = import_single_file(args.checkpoint, config=args.config, scaling_factor=args.scaling_factor)
    save_diffusers_model(model, out)
    write_model_card(out, model, {}, 0, {}, [f"converted from the single file `{args.checkpoint.name}`", *notes])
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out} ({describe(model)}); load it with diffusers {type(model).__name__}.from_pretrained")
    return 0
