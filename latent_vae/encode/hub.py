"""A finished latent set on the Hugging Face Hub: its dataset card (model, preprocessing, latent
storage, counts and statistics) and the upload of its parquet or webdataset shards."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import DataError
from ..interop.export import public_name
from ..interop.hub import check_repo_id, hub_api
from .decode import load_latent_dataset
from .stats import latent_statistics

# A shard of a `datasets` output converted for upload: the Hub's own push_to_hub target size.
UPLOAD_SHARD_BYTES = 500 << 20


def _data_name(data: Dict[str, Any]) -> str:
    """What was encoded, without local paths: a shard count, a hub dataset id, a folder's name."""
    if "shards" in data:  # a hub dataset read as a stream keeps its id; shard files their count only
        hub_id = data["streaming"] and not Path(data["source"]).expanduser().exists()
        return f"{data['shards']} shards" + (f" of {data['source']}" if hub_id else "")
    return public_name(data["source"]) or "unknown"


def _statistics(output_dir: Path, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``latent_stats.json`` when ``latent-vae stats`` wrote it, else computed now (not for
    webdataset shards, which stats does not read)."""
    saved = output_dir / "latent_stats.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    if config["identity"]["output_format"] == "webdataset":
        return None
    dataset, config = load_latent_dataset(output_dir)
    return latent_statistics(dataset, config["identity"]["latent"]["dtype"]).to_json() if len(dataset) else None


def dataset_card(output_dir: Path, data_files: str) -> str:
    """README.md of the latent set: YAML front matter the Hub reads, then what the rows are."""
    config = json.loads((output_dir / "encode_config.json").read_text())
    summary = json.loads((output_dir / "summary.json").read_text())
    identity = config["identity"]
    latent, prep = identity["latent"], identity["preprocessing"]
    stats = _statistics(output_dir, config)
    scaling = latent.get("diffusion_scaling")
    lines = [
        "---",
        "tags:", "- latent-diffusion", "- latents", "- latent-vae",
        "configs:", "- config_name: default", "  data_files:", "  - split: train", f"    path: {data_files}",
        "---", "",
        f"# Latents of {_data_name(identity['data'])}", "",
        f"Encoded with `latent-vae encode` by the {identity['model']['class']} "
        f"`{public_name(config.get('model_path')) or 'unknown'}` (weights SHA-256 `{identity['model']['weights_sha256']}`).", "",
        "| | |", "| --- | --- |",
        f"| rows | {summary['encoded']} of {summary['read']} inputs ({summary['failed']} unreadable, listed in "
        "`failures.jsonl` of the encode) |",
        f"| preprocessing | resize to cover, centre crop: {prep['resolution']}² "
        f"{'(SDXL aspect-ratio buckets)' if prep['buckets'] == 'sdxl' else 'square'}, sides multiples of "
        f"{prep.get('patch_size', 1)} × the VAE factor {config['downsample_factor']}; upscaling "
        f"{'allowed, marked per row' if prep['upscale'] else 'off'} |",
        f"| latent | {latent['mode']} of the posterior, unscaled, {latent['dtype']}, "
        f"{config['latent_channels']} channels; encoder autocast {latent['precision']} |",
        f"| layout | {latent['layout']}" + (f": `model_input` = {scaling['formula']} with "
                                            f"{json.dumps({k: v for k, v in scaling.items() if k != 'formula'})} |"
                                            if scaling else " |"),
    ]
    if stats:
        lines += [f"| latent statistics | mean {stats['mean']:.6g}, std {stats['std']:.6g}: scaling_factor "
                  f"{stats['scaling_factor']:.6g}; per channel mean {[round(v, 5) for v in stats['channel_mean']]}, "
                  f"std {[round(v, 5) for v in stats['channel_std']]} |"]
    lines += ["", "Each row: `id`, `index`, `latent` (C, h, w), the preprocessing record (`original_size`, "
              "`resized_size`, `crop_top_left`, `target_size`, `upscaled`) and the source's other columns. "
              "See latent_vae's docs/ENCODING.md.", ""]
    return "\n".join(lines)


def check_push_target(repo: str) -> None:
    """``--push-to-hub REPO`` is a repository id and the user is logged in: checked before encoding,
    not after hours of it (the model upload's checks, ``interop.hub``)."""
    check_repo_id(repo)
    hub_api()


def push_latent_set(output_dir: Path, repo: str, private: bool = False) -> None:
    """Create the dataset repository if needed and upload the shards (a ``datasets`` output as
    parquet shards) with the dataset card as README.md."""
    output_dir = Path(output_dir)
    output_format = json.loads((output_dir / "encode_config.json").read_text())["identity"]["output_format"]
    api, _ = hub_api()
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as staging:
            folder = output_dir if output_format != "datasets" else Path(staging)
            if output_format == "datasets":
                _write_parquet_shards(output_dir, folder / "data")
            pattern = "data/*.tar" if output_format == "webdataset" else "data/*.parquet"
            (folder / "README.md").write_text(dataset_card(output_dir, pattern))
            api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                              allow_patterns=["data/*", "README.md"],
                              commit_message="latent set from latent-vae encode")
    except OSError as err:  # HTTP errors, no network and offline mode are OSErrors in huggingface_hub
        raise DataError(f"uploading {output_dir} to the Hub repository {repo} failed ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); the latents are complete: rerun the same "
                        "command to retry the upload") from None


def _write_parquet_shards(output_dir: Path, data_dir: Path) -> None:
    dataset, _ = load_latent_dataset(output_dir)
    count = max(1, math.ceil(dataset.data.nbytes / UPLOAD_SHARD_BYTES))
    data_dir.mkdir(parents=True)
    for i in range(count):
        dataset.shard(count, i, contiguous=True).to_parquet(str(data_dir / f"train-{i:05d}-of-{count:05d}.parquet"))
