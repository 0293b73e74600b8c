"""latent-vae export"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a diffusers model as one .safetensors in the original layout (A1111, ComfyUI)"
DESCRIPTION = """\
Convert a diffusers AutoencoderKL folder into a single .safetensors file with the original
latent-diffusion key names (encoder.down.0.block.0..., mid.attn_1 as 1x1 convolutions,
quant_conv, post_quant_conv, decoder.up in the original order): the file AUTOMATIC1111 and
ComfyUI load as a VAE and diffusers reads with AutoencoderKL.from_single_file. A VQModel is
written in the taming-transformers / latent-diffusion VQModel layout (same keys plus
quantize.embedding.weight).

Tensors are copied unchanged (fp32 stays fp32), so the file reproduces the folder's outputs
bit for bit; --dtype fp16 halves the size at the cost of that exactness. The diffusers config
is kept in the file's metadata (other tools ignore it), so `latent-vae import` restores the
exact model. Scaling factor: single-file loaders assume 0.18215 for SD-style VAEs; a model with
another scaling_factor needs it set in the UI or given to diffusers through config=.

examples:
  latent-vae export --model runs/kl-f8/model --format ldm --output my_vae.safetensors
  latent-vae export --model runs/kl-f8/model --output my_vae.fp16.safetensors --dtype fp16
  python -c "from diffusers import AutoencoderKL; \\
      AutoencoderKL.from_single_file('my_vae.safetensors', config='runs/kl-f8/model')"
"""

DTYPES = ("fp32", "fp16", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers model folder (or hub id)")
    parser.add_argument("--subfolder", help="subfolder of --model holding the autoencoder (e.g. vae)")
    parser.add_argument("--format", choices=("ldm",), default="ldm",
                        help="key layout: ldm = latent-diffusion / taming single file (default)")
    parser.add_argument("--output", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep them as stored)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import ConfigError
    from ..interop.single_file import describe, export_single_file
    from ..models.loading import load_autoencoder

    if args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    model = load_autoencoder(args.model, subfolder=args.subfolder)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    path = export_single_file(model, args.output, dtype=dtype)
    print(f"wrote {path} ({describe(model)}; {path.stat().st_size / 2**20:.1f} MiB)")
    return 0
