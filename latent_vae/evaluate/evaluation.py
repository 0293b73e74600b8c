"""Reconstruction quality of an autoencoder over an image set.

Per image: PSNR and SSIM (``evaluate.metrics``: [0, 1] images, 11×11 Gaussian SSIM window,
data_range 1), LPIPS with the AlexNet and/or VGG backbone, and for KL models the KL of the
posterior (nats per latent element). Over the set (``evaluate.statistics``): rFID (torchmetrics'
Fréchet distance between features of the originals and of their reconstructions), codebook usage
and perplexity (VQ), and the posterior-collapse monitor (KL): per-channel KL and active units,
channels whose posterior mean varies across inputs by more than ``ACTIVE_UNIT_THRESHOLD`` (the
exact streaming equivalent of ``losses.kl.channel_activity`` over the whole set).

Images are resized (shorter side) to the resolution and centre-cropped; reconstructions use the
posterior mean unless ``sample`` is set (then each image's noise comes from its own seed, so the
result does not depend on batching or on the number of processes). Under ``accelerate launch``
or ``torchrun`` every process evaluates a shard and the per-image results are gathered: the
results equal a single-process run's up to float rounding (a different batch composition changes
the summation order inside the convolutions; ~1e-7 relative). Unreadable inputs are skipped and
listed with their reason.

Networks with pretrained weights (LPIPS backbones, InceptionV3: ``evaluate.networks``) are never
replaced by random ones. The outputs (JSON, CSV, grid) are written by ``evaluate.report``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..data.images import image_grid
from ..data.sources import Failure, ImageSource
from ..distributed import process_state
from ..errors import ConfigError, DataError
from ..losses.kl import gaussian_kl
from ..models.stock import Autoencoder, encoder_latents, is_tiny, is_vq, latents_to_indices, posterior
from ..models.tiling import tiling
from ..runtime import autocast, configure_cpu_threads
from ..seeding import derive_seed, seeded_normal
from .dataset import eval_loader, load_eval_images
from .diffusability import DiffusabilityStatistics, model_statistics, summary_metrics
from .metrics import psnr_per_image, ssim_per_image
from .networks import MetricNetworks, build_metric_networks
from .options import EvalOptions
from .report import EvalResult
from .statistics import SetStatistics

logger = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct_batch(model: Autoencoder, images: torch.Tensor, indices: Sequence[int],
                      sample: bool = False, seed: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Stock diffusers reconstruction plus what the set-level statistics need.

    KL: decode the posterior mean (``sample``: mean + std·noise, noise seeded per image index);
    returns the per-image, per-channel KL and the posterior mean. VQ: decode(encode(x).latents)
    (diffusers quantises inside decode); returns the code index of every latent position.
    """
    if is_vq(model):
        latents = encoder_latents(model, images)
        return model.decode(latents).sample, {"codes": latents_to_indices(model, latents).flatten()}
    if is_tiny(model):  # an AutoencoderTiny: deterministic latents, no posterior, no codebook
        return model.decode(encoder_latents(model, images)).sample, {}
    distribution = posterior(model, images)
    latents = distribution.mode()
    if sample:
        seeds = [derive_seed(seed, i) for i in indices]
        noise = seeded_normal(seeds, latents.shape[1:], latents.device, latents.dtype)
        latents = distribution.mean + distribution.std * noise
    mean = distribution.mean.float()
    kl = gaussian_kl(mean, distribution.logvar.float())
    return model.decode(latents).sample, {"kl_per_channel": kl.mean(dim=(2, 3)), "posterior_mean": mean}


def _scores(images: torch.Tensor, recon: torch.Tensor, lpips_nets: Dict[str, nn.Module],
            extras: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-image scores of a batch, each a (B,) tensor."""
    scores = {"psnr": psnr_per_image(recon, images), "ssim": ssim_per_image(recon, images)}
    for name, net in lpips_nets.items():
        scores[f"lpips_{name}"] = net(images, recon).flatten()
    if "kl_per_channel" in extras:
        scores["kl"] = extras["kl_per_channel"].mean(dim=1)
    return scores


def _evaluate_shard(model: Autoencoder, source: ImageSource, shard: Sequence[int], options: EvalOptions,
                    lpips_nets: Dict[str, nn.Module], statistics: SetStatistics, device: torch.device,
                    show_progress: bool, diffusability: Optional[DiffusabilityStatistics] = None
                    ) -> Tuple[List[Dict[str, Any]], List[Failure]]:
    """This process's per-image rows and read failures; the set statistics are updated on the way."""
    from tqdm.auto import tqdm

    rows: List[Dict[str, Any]] = []
    read_failures: List[Failure] = []
    progress = tqdm(total=len(shard), desc="eval", unit="img", dynamic_ncols=True, disable=not show_progress)
    with tiling(model, options.tiled, options.tile_size, options.tile_overlap), torch.no_grad():
        for batch in eval_loader(source, shard, options, device):
            read_failures += batch["failures"]
            progress.update(len(batch["indices"]) + len(batch["failures"]))
            if batch["pixel_values"] is None:
                continue
            images = batch["pixel_values"].to(device)
            with autocast(device, options.precision):
                recon, extras = reconstruct_batch(model, images, batch["indices"], options.sample, options.seed)
            if recon.shape != images.shape:
                raise ConfigError(f"reconstructions of shape {tuple(recon.shape[2:])} for images of "
                                  f"{tuple(images.shape[2:])}: diffusers' tiling misbehaves with tiles this small "
                                  "relative to the image; use a larger --tile-size")
            recon = recon.float()
            statistics.update(images, recon, extras)
            scores = _scores(images, recon, lpips_nets, extras)
            if diffusability is not None:
                with autocast(device, options.precision):
                    scores.update(diffusability.update(images))
            for i, index in enumerate(batch["indices"]):
                row = {"index": index, "key": source.key(index), "upscaled": batch["upscaled"][i]}
                row.update({name: float(values[i]) for name, values in scores.items()})
                if "kl_per_channel" in extras:
                    row["kl_per_channel"] = extras["kl_per_channel"][i].tolist()
                rows.append(row)
    progress.close()
    return rows, read_failures


def _settings(options: EvalOptions, lpips_nets: Dict[str, nn.Module], networks: MetricNetworks) -> Dict[str, Any]:
    return {"resolution": options.resolution, "sample": options.sample, "seed": options.seed,
            "tiled": options.tiled, "tile_size": options.tile_size, "tile_overlap": options.tile_overlap,
            "precision": options.precision, "lpips": sorted(lpips_nets),
            "fid_extractor": type(networks.fid_extractor).__name__ if networks.fid_extractor else None}


def evaluate(model: Autoencoder, source: ImageSource, options: Optional[EvalOptions] = None,
             networks: Optional[MetricNetworks] = None, failures: Sequence[Failure] = ()) -> EvalResult:
    """Evaluate ``model`` on every image of ``source`` (sharded over processes when launched so).

    ``networks`` defaults to ``build_metric_networks(options)``; ``failures`` are inputs already
    known to be unusable (from ``open_source``), reported with those found while reading.
    """
    from accelerate.utils import gather_object

    options = options or EvalOptions()
    networks = networks if networks is not None else build_metric_networks(options)
    state = process_state()
    device = state.device
    if options.limit is not None:
        source = source.subset(range(min(options.limit, len(source))))
    if len(source) < state.num_processes:
        raise DataError(f"{len(source)} images for {state.num_processes} processes: use fewer processes")
    configure_cpu_threads(device, options.num_workers)
    model.to(device).eval()
    lpips_nets = {name: net.to(device) for name, net in networks.lpips.items()}
    statistics = SetStatistics(model, options, networks, device)
    shard = range(state.process_index, len(source), state.num_processes)
    diffusability = model_statistics(model, device) if options.diffusability else None
    rows, read_failures = _evaluate_shard(model, source, shard, options, lpips_nets, statistics, device,
                                          options.progress and state.is_main_process, diffusability)

    rows = sorted(gather_object(rows), key=lambda r: r["index"])
    metrics = {name: float(np.mean([r[name] for r in rows])) if rows else None
               for name in ("psnr", "ssim", *(f"lpips_{n}" for n in lpips_nets))}
    result = EvalResult(
        model_class=type(model).__name__, metrics=metrics, per_image=rows,
        failures=list(failures) + sorted(gather_object(read_failures), key=lambda f: f.key),
        upscaled=sum(r["upscaled"] for r in rows), settings=_settings(options, lpips_nets, networks),
    )
    statistics.finish(result)
    if diffusability is not None:
        result.diffusability = diffusability.result()
        result.metrics.update(summary_metrics(result.diffusability))
    if result.upscaled:
        result.warnings.append(f"{result.upscaled} images were smaller than {options.resolution}px and upscaled")
    if state.is_main_process:
        for warning in result.warnings:
            logger.warning(warning)
        if options.grid_images > 0 and rows:
            result.grid = _grid(model, source, [r["index"] for r in rows[: options.grid_images]], options)
    return result


def _grid(model: Autoencoder, source: ImageSource, indices: List[int], options: EvalOptions) -> np.ndarray:
    """Inputs above their reconstructions, HWC uint8."""
    images = load_eval_images(source, indices, options.resolution)
    device = next(model.parameters()).device
    with tiling(model, options.tiled, options.tile_size, options.tile_overlap), autocast(device, options.precision):
        recon, _ = reconstruct_batch(model, images.to(device), indices, options.sample, options.seed)
    return np.array(image_grid(torch.cat([images, recon.float().cpu()]), columns=len(indices)))
