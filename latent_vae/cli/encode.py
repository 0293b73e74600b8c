"""latent-vae encode"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_tiling_arguments

HELP = "encode an image folder or dataset to latents (datasets, parquet or webdataset), resumable, multi-GPU"
DESCRIPTION = """\
Encode every image of a folder or Hugging Face dataset with a diffusers AutoencoderKL or
VQModel, and write a dataset that datasets.load_from_disk(OUTPUT_DIR) reads: per row the
stable id, the latent (posterior mean by default), its shape, the preprocessing record
(original size, resized size, crop top-left, target size, upscaled) and the other columns
of the source dataset (captions, labels); VQ models add the token ids.

examples:
  latent-vae encode --model runs/kl-f8/model --data /my/images --output-dir latents/ --resolution 256
  latent-vae encode --model stabilityai/sd-vae-ft-mse --data my_org/my_dataset --image-column image \\
      --output-dir latents/ --dtype fp16 --layout diffusers
  latent-vae encode --model runs/kl-f8/model --data /my/images --output-dir latents/ \\
      --resolution 1024 --buckets sdxl --latent sample --seed 0
  accelerate launch -m latent_vae encode --model runs/kl-f8/model --data /my/images --output-dir latents/
  torchrun --nproc_per_node 8 -m latent_vae encode --model runs/kl-f8/model \\
      --shards '/data/train-{000000..009999}.tar' --format parquet --output-dir latents/ --shard-slice 3/16

Killed or pre-empted? Run the same command again: finished shards are kept, the rest is
redone, and the result has exactly one row per readable input. Unreadable inputs are listed
in OUTPUT_DIR/failures.jsonl; the last line printed gives read / encoded / failed.
Latents are stored unscaled: multiply by scaling_factor (after subtracting shift_factor) when
training a diffusion model; `latent-vae stats` computes both. --layout diffusers also writes
them scaled as `model_input`, with `original_sizes` and `crop_top_lefts`: the columns diffusers'
SDXL training script reads. See docs/ENCODING.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to encode")
    what.add_argument("--model", required=True,
                      help="diffusers model folder or hub id (AutoencoderKL, VQModel or AutoencoderTiny)")
    what.add_argument("--subfolder", help="model subfolder, e.g. vae for a full pipeline repository")
    what.add_argument("--data", help="image folder (recursive), save_to_disk dataset, or hub dataset name "
                      "(default: the scikit-image and matplotlib sample photos)")
    what.add_argument("--shards", nargs="+", metavar="PATTERN",
                      help="webdataset tar or parquet shards instead of --data: brace patterns "
                      "(data-{000000..000999}.tar), globs, folders, paths or URLs; one input shard becomes one output "
                      "shard")
    what.add_argument("--streaming", action="store_true",
                      help="read --data (a hub dataset or local data folder) as a streaming 🤗 dataset, shard by shard")
    what.add_argument("--shard-slice", metavar="I/N",
                      help="this job takes shards I, I+N, I+2N ... of the list (0 <= I < N): nodes encode into one "
                      "--output-dir without coordinating; the job finishing last completes it")
    what.add_argument("--max-samples", type=int,
                      help="sharded inputs: encode N samples in all, the first N/S of each of the S shards")
    what.add_argument("--key-column", help="parquet/streaming: the column holding each sample's key (default: "
                      "__key__, else the row number)")
    what.add_argument("--image-key", help="tar shards: the member extension holding the image (default: the first of "
                      "png, jpg, jpeg, webp, tif, tiff, bmp present)")
    what.add_argument("--image-column", default="image", help="image column of a dataset (default: image)")
    what.add_argument("--split", default="train", help="dataset split (default: train)")
    what.add_argument("--output-dir", type=Path, required=True, help="where the latent dataset is written")

    prep = parser.add_argument_group("preprocessing (recorded per row)")
    prep.add_argument("--resolution", type=int, default=256,
                      help="square crop size, or with --buckets the bucket area resolution² (default: 256)")
    prep.add_argument("--buckets", choices=("none", "sdxl"), default="none",
                      help="sdxl: SDXL's 40 aspect-ratio buckets scaled to --resolution; none: square crops")
    prep.add_argument("--patch-size", type=int, default=2,
                      help="the denoiser's patch size in latent pixels: crop and bucket sides are multiples of it × "
                      "the VAE factor (2: DiT, SD3, FLUX and UNets; 1: any side the VAE takes) (default: 2)")
    prep.add_argument("--no-upscale", dest="upscale", action="store_false",
                      help="skip (and list) images smaller than their crop instead of upscaling them")

    out = parser.add_argument_group("stored latents")
    out.add_argument("--latent", choices=("mean", "mean_logvar", "sample"), default="mean",
                     help="mean: posterior mean; mean_logvar: also the log-variance; sample: a posterior "
                     "sample with its per-row seed (default: mean)")
    out.add_argument("--seed", type=int, default=0, help="base seed of --latent sample (default: 0)")
    out.add_argument("--dtype", default="fp32",
                     help="storage: fp32 or fp16 (2 bytes; a latent beyond ±65504 is listed as a failure). bf16 is "
                     "refused: Arrow has no bfloat16 (default: fp32)")
    out.add_argument("--layout", choices=("default", "diffusers"), default="default",
                     help="default: the unscaled latent; diffusers: also model_input (scaled as the model's pipeline "
                     "expects), original_sizes and crop_top_lefts, as diffusers' SDXL training script reads them "
                     "(default: default)")
    out.add_argument("--format", dest="output_format", choices=("datasets", "parquet", "webdataset"),
                     default="datasets",
                     help="datasets: one save_to_disk folder; parquet: data/train-*.parquet shards; webdataset: "
                     "data/train-*.tar shards (<key>.latent.npy, <key>.json) (default: datasets)")
    out.add_argument("--push-to-hub", metavar="REPO",
                     help="upload the finished latent set and its dataset card to this Hugging Face dataset repository")
    out.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repository as private")
    out.add_argument("--shard-size", type=int, default=256,
                     help="images per shard: the unit of resume, held in memory until written (default: 256)")
    out.add_argument("--overwrite", action="store_true", help="replace an earlier encode in --output-dir")
    out.add_argument("--keep-shards", action="store_true", help="keep shards/ after the merge")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--batch-size", type=int,
                       help="images per batch (default: 16 on CUDA, 1 on CPU, where larger batches are slower)")
    speed.add_argument("--num-workers", type=int,
                       help="DataLoader worker processes (default: CPU cores - 1, at most 4)")
    speed.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="encoder autocast; auto: bf16 on CUDA, fp32 on CPU; fp32 keeps the encoder in fp32; "
                       "fp16 batches that overflow are redone in fp32 (default: auto)")
    speed.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the encoder (falls back when unavailable)")
    speed.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    add_tiling_arguments(speed, "encoding")
    speed.add_argument("--device", help="e.g. cuda:1 or cpu (default: the process's Accelerate device)")


def run(args: argparse.Namespace) -> int:
    from ..encode.run import encode_dataset

    speed = {"num_workers": args.num_workers} if args.num_workers is not None else {}
    summary = encode_dataset(
        args.model, args.data, args.output_dir, subfolder=args.subfolder, image_column=args.image_column,
        split=args.split, resolution=args.resolution, buckets=args.buckets, patch_size=args.patch_size,
        upscale=args.upscale, latent=args.latent, seed=args.seed, dtype=args.dtype, layout=args.layout,
        shards=args.shards, streaming=args.streaming, shard_slice=args.shard_slice, max_samples=args.max_samples,
        key_column=args.key_column, image_key=args.image_key, output_format=args.output_format,
        push_to_hub=args.push_to_hub, hub_private=args.hub_private,
        shard_size=args.shard_size, overwrite=args.overwrite,
        keep_shards=args.keep_shards, batch_size=args.batch_size, **speed,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        compile_backend=args.compile_backend, tiled=args.tiled,
        tile_size=args.tile_size, tile_overlap=args.tile_overlap, device=args.device,
    )
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    if summary.pending_shards:
        print(f"slice {args.shard_slice} done: read {summary.read}, encoded {summary.encoded}, failed "
              f"{summary.failed}; {summary.pending_shards} shards of other slices remain, and the slice finishing "
              "last completes the encode")
        return 0
    if summary.resumed:
        print(f"resumed: {summary.resumed} inputs were already done by an earlier run")
    if summary.fp32_retries:
        print(f"fp16 overflow: {summary.fp32_retries} batches recomputed in fp32")
    how = {"datasets": "datasets.load_from_disk", "parquet": "parquet shards in data/",
           "webdataset": "webdataset tar shards in data/"}[args.output_format]
    print(f"latents: {summary.output_dir} ({how}), {summary.images_per_second:.1f} images/s")
    if args.push_to_hub:
        print(f"uploaded to https://huggingface.co/datasets/{args.push_to_hub}")
    failures = f" (listed in {summary.failures_path})" if summary.failed else ""
    print(f"read {summary.read}, encoded {summary.encoded}, failed {summary.failed}{failures}")
    return 0
