"""latent-vae export"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a diffusers model as one .safetensors in the original layout (A1111, ComfyUI); push it to the Hub"
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

--push-to-hub OWNER/NAME uploads the model folder (config.json, weights, model card with Hub
metadata) to that Hub repository, and the single file beside it when --output is given. It needs
a Hub login (`hf auth login` or HF_TOKEN), checked before anything is written.

examples:
  latent-vae export --model runs/kl-f8/model --format ldm --output my_vae.safetensors
  latent-vae export --model runs/kl-f8/model --push-to-hub my-user/my-vae
  latent-vae export --model runs/kl-f8/model --output my_vae.safetensors --push-to-hub my-user/my-vae
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
    parser.add_argument("--output", type=Path, help="the .safetensors file to write (required without --push-to-hub)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep them as stored)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME",
                        help="upload the model folder and its card (and --output) to this Hub repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import ConfigError
    from ..interop.hub import check_repo_id, hub_api, push_model_folder
    from ..interop.single_file import describe, export_single_file
    from ..models.loading import load_autoencoder

    if args.output is None and not args.push_to_hub:
        raise ConfigError("give --output FILE.safetensors, --push-to-hub OWNER/NAME, or both")
    if args.output is not None and args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    folder = Path(args.model) / (args.subfolder or "")
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
        if not folder.is_dir():
            raise ConfigError(f"--push-to-hub uploads a local model folder; {args.model} is not one")
        hub_api()  # the login is checked before anything is written
    model = load_autoencoder(args.model, subfolder=args.subfolder)
    path = None
    if args.output is not None:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
        path = export_single_file(model, args.output, dtype=dtype)
        print(f"wrote {path} ({describe(model)}; {path.stat().st_size / 2**20:.1f} MiB)")
    if args.push_to_hub:
        url = push_model_folder(folder, args.push_to_hub, private=args.private, single_file=path)
        print(f"pushed {folder} to {url}; load it with diffusers {type(model).__name__}.from_pretrained"
              f'("{args.push_to_hub}")')
    return 0
