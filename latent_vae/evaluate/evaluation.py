"""Reconstruction quality of an autoencoder over an image set.

Per image: PSNR and SSIM (``latent_vae.metrics``: [0, 1] images, 11×11 Gaussian SSIM window,
data_range 1), LPIPS with the AlexNet and/or VGG backbone, and for KL models the KL of the
posterior (nats per latent element). Over the set: rFID (torchmetrics' Fréchet distance between
features of the originals and of their reconstructions), codebook usage and perplexity (VQ), and
the posterior-collapse monitor (KL): per-channel KL and active units, channels whose posterior
mean varies across inputs by more than ``ACTIVE_UNIT_THRESHOLD`` (the exact streaming
equivalent of ``regularizers.channel_activity`` over the whole set).

Images are resized (shorter side) to the resolution and centre-cropped; reconstructions use the
posterior mean unless ``sample`` is set (then each image's noise comes from its own seed, so the
result does not depend on batching or on the number of processes). Under ``accelerate launch``
or ``torchrun`` every process evaluates a shard and the per-image results are gathered: the
results equal a single-process run's up to float rounding (a different batch composition changes
the summation order inside the convolutions; ~1e-7 relative). Unreadable inputs are skipped and
listed with their reason.

Networks with pretrained weights (LPIPS backbones, InceptionV3) are never replaced by random
ones: without the weights the error says which file to pass. Any ``nn.Module`` mapping images
to feature vectors can replace InceptionV3 (``MetricNetworks(fid_extractor=...)``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..data.sources import Failure, ImageSource
from ..data.transforms import crop_image, to_tensor
from ..distributed import all_gather_cat, all_reduce_sum_
from ..errors import ConfigError, DataError, ImageReadError, InceptionWeightsUnavailable, PerceptualWeightsUnavailable
from ..losses.kl import ACTIVE_UNIT_THRESHOLD
from ..losses.perceptual import build_lpips
from ..losses.vq import codebook_statistics
from ..models.stock import Autoencoder, downsample_factor, is_vq, latent_channels, latents_to_indices
from ..models.tiling import tiling
from ..runtime import autocast
from ..seeding import derive_seed, seeded_normal
from ..weights import pretrained_weights
from .metrics import psnr_per_image, ssim_per_image, to_unit_range

logger = logging.getLogger(__name__)

# The weights torch-fidelity (and so torchmetrics' FrechetInceptionDistance) downloads.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
FID_FEATURE_SIZES = (64, 192, 768, 2048)
PRECISIONS = ("fp32", "bf16", "fp16")

PROTOCOL = {
    "psnr": "per image on [0,1] (reconstruction clamped), 10*log10(1/MSE), averaged over images",
    "ssim": "per image, 11x11 Gaussian window (sigma 1.5), data_range 1, K1 0.01, K2 0.03 (torchmetrics), "
            "averaged over channels and images",
    "lpips": "per image, lpips 0.1 linear heads on the named ImageNet backbone, inputs in [-1,1]",
    "rfid": "Frechet distance between InceptionV3 features (torch-fidelity weights, TF1-compatible bilinear "
            "resize to 299) of the uint8 originals and reconstructions of the same images "
            "(torchmetrics); depends on the number of images: compare only equal protocols",
    "kl": "0.5*(mu^2+sigma^2-1-log sigma^2) per latent element (nats), averaged",
    "active_units": f"latent channels whose posterior-mean variance across images, averaged over positions, "
                    f"exceeds {ACTIVE_UNIT_THRESHOLD}",
}


@dataclass
class EvalOptions:
    resolution: int = 256
    batch_size: int = 8
    num_workers: int = 2
    sample: bool = False              # decode a posterior sample instead of the mean (KL)
    seed: int = 0                     # for ``sample``: image i uses derive_seed(seed, i)
    limit: Optional[int] = None       # evaluate the first N images only
    tiled: bool = False               # diffusers' tiled encode/decode (AutoencoderKL)
    tile_size: Optional[int] = None   # tile size in pixels (default: 512)
    tile_overlap: float = 0.25        # fraction of a tile shared with its neighbour (blended)
    precision: str = "fp32"           # autocast dtype of the model's forward; metrics in fp32
    lpips: Tuple[str, ...] = ("alex", "vgg")
    lpips_weights: Dict[str, str] = field(default_factory=dict)  # backbone -> local weights file
    fid: bool = True
    fid_weights: Optional[str] = None  # local InceptionV3 weights file
    fid_features: int = 2048
    grid_images: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"--resolution {self.resolution}: give a positive multiple of 8")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if not 0.0 < self.tile_overlap < 1.0:
            raise ConfigError(f"--tile-overlap {self.tile_overlap}: give a fraction between 0 and 1")
        if self.fid_features not in FID_FEATURE_SIZES:
            raise ConfigError(f"--fid-features {self.fid_features}: choose one of {FID_FEATURE_SIZES}")
        unknown = set(self.lpips) - {"alex", "vgg"}
        if unknown:
            raise ConfigError(f"--lpips {' '.join(sorted(unknown))}: the backbones are alex and vgg")


@dataclass
class MetricNetworks:
    """Networks with pretrained weights used by the metrics; build once, share between evaluations.

    ``fid_extractor`` maps a batch of images (uint8 in [0, 255], or float in [0, 1] when
    ``fid_float_input``) of shape (B, 3, H, W) to features (B, D).
    """

    lpips: Dict[str, nn.Module] = field(default_factory=dict)
    fid_extractor: Optional[nn.Module] = None
    fid_float_input: bool = False


@dataclass
class EvalResult:
    model_class: str
    metrics: Dict[str, Optional[float]]
    per_image: List[Dict[str, Any]]
    failures: List[Failure]
    upscaled: int
    settings: Dict[str, Any]
    latent: Optional[Dict[str, Any]] = None
    codebook: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)
    grid: Optional[np.ndarray] = None  # inputs above reconstructions, HWC uint8 (main process only)

    @property
    def images(self) -> int:
        return len(self.per_image)

    def summary(self) -> Dict[str, Any]:
        """Everything but the per-image rows and the grid: what the JSON file holds."""
        payload = {
            "model_class": self.model_class,
            "images": self.images,
            "metrics": self.metrics,
            "inputs": {"evaluated": self.images, "skipped": len(self.failures), "upscaled": self.upscaled},
            "skipped_inputs": [{"key": f.key, "reason": f.reason} for f in self.failures],
            "settings": self.settings,
            "protocol": PROTOCOL,
            "warnings": self.warnings,
        }
        if self.latent is not None:
            payload["latent"] = self.latent
        if self.codebook is not None:
            payload["codebook"] = self.codebook
        return payload


# --------------------------------------------------------------------------- metric networks


def _inception_state(weights_path: Optional[str]) -> Dict[str, torch.Tensor]:
    """InceptionV3 weights: the given file, else the torch hub cache, else a download."""
    return pretrained_weights(INCEPTION_URL, weights_path, InceptionWeightsUnavailable,
                              "rFID (torch-fidelity's InceptionV3)",
                              "--fid-weights {path}; or skip rFID with --no-fid")


def load_inception(weights_path: Optional[str] = None, features: int = 2048) -> nn.Module:
    """torchmetrics' InceptionV3 feature extractor (uint8 images -> pool features), real weights only.

    The weights are read safely (safetensors, or ``torch.load(weights_only=True)``) and handed to
    torch-fidelity as a file holding nothing but those tensors: torch-fidelity itself unpickles
    weight files without restriction.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    if importlib.util.find_spec("torch_fidelity") is None:  # torchmetrics' InceptionV3 lives there
        raise InceptionWeightsUnavailable("rFID with InceptionV3 needs torch-fidelity: pip install "
                                          "'latent_vae[fid]' (or torch-fidelity); or skip rFID with --no-fid")
    state = _inception_state(weights_path)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "inception.pth"
        torch.save(state, clean)
        try:
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(features)],
                                      feature_extractor_weights_path=str(clean), antialias=False)
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys, shapes
            raise InceptionWeightsUnavailable(
                f"{weights_path or 'the cached file'} is not torch-fidelity's InceptionV3 weights "
                f"({str(err).splitlines()[0]}); expected {Path(INCEPTION_URL).name}"
            ) from None


def build_metric_networks(options: EvalOptions, fid_extractor: Optional[nn.Module] = None,
                          fid_float_input: bool = False) -> MetricNetworks:
    """LPIPS backbones and the rFID feature extractor the options ask for; fails before any work."""
    lpips_nets = {}
    for net in options.lpips:
        try:
            lpips_nets[net] = build_lpips(net, options.lpips_weights.get(net))
        except PerceptualWeightsUnavailable as err:
            raise PerceptualWeightsUnavailable(f"{err} For eval: --lpips {'vgg' if net == 'alex' else 'alex'} "
                                               "keeps only the other backbone; --no-lpips skips LPIPS.") from None
    if options.fid and fid_extractor is None:
        fid_extractor = load_inception(options.fid_weights, options.fid_features)
    return MetricNetworks(lpips_nets, fid_extractor if options.fid else None, fid_float_input)


# --------------------------------------------------------------------------- data


class EvalDataset(torch.utils.data.Dataset):
    """Images of a source, resized (shorter side) and centre-cropped; failures reported, not raised."""

    def __init__(self, source: ImageSource, indices: Sequence[int], resolution: int):
        self.source, self.indices, self.resolution = source, list(indices), resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Dict[str, Any]:
        index = self.indices[position]
        item: Dict[str, Any] = {"index": index, "pixel_values": None, "failure": None, "upscaled": False}
        try:
            image = self.source.read(index)
        except ImageReadError as err:
            item["failure"] = Failure(self.source.key(index), str(err))
            return item
        item["upscaled"] = min(image.size) < self.resolution
        image = crop_image(image, self.resolution, None, "center", False, random.Random(0))
        item["pixel_values"] = to_tensor(image)
        return item


def collate_eval_batch(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    kept = [i for i in items if i["pixel_values"] is not None]
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in kept]) if kept else None,
        "indices": [i["index"] for i in kept],
        "upscaled": [i["upscaled"] for i in kept],
        "failures": [i["failure"] for i in items if i["failure"] is not None],
    }


# --------------------------------------------------------------------------- model passes


class RunningMoments:
    """Mean and summed squared deviation per element over a stream of batches, in float64
    (Chan et al.'s pairwise update: no cancellation, mergeable across processes)."""

    def __init__(self, shape: Sequence[int], device: torch.device):
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += m2 + delta.pow(2) * (self.count * count / total)
        self.count = total

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.double()
        mean = batch.mean(dim=0)
        self._merge(batch.shape[0], mean, (batch - mean).pow(2).sum(dim=0))

    def merged_across_processes(self) -> "RunningMoments":
        counts = all_gather_cat(torch.tensor([self.count], device=self.mean.device))
        means, m2s = all_gather_cat(self.mean[None]), all_gather_cat(self.m2[None])
        merged = RunningMoments(self.mean.shape, self.mean.device)
        for count, mean, m2 in zip(counts.tolist(), means, m2s):
            merged._merge(count, mean, m2)
        return merged

    def variance(self) -> torch.Tensor:
        """Unbiased variance per element (zero with fewer than two samples)."""
        return self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)


@torch.no_grad()
def reconstruct_batch(model: Autoencoder, images: torch.Tensor, indices: Sequence[int],
                      sample: bool = False, seed: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Stock diffusers reconstruction plus what the set-level statistics need.

    KL: decode the posterior mean (``sample``: mean + std·noise, noise seeded per image index);
    returns the per-image, per-channel KL and the posterior mean. VQ: decode(encode(x).latents)
    (diffusers quantises inside decode); returns the code index of every latent position.
    """
    if is_vq(model):
        latents = model.encode(images).latents
        return model.decode(latents).sample, {"codes": latents_to_indices(model, latents).flatten()}
    posterior = model.encode(images).latent_dist
    latents = posterior.mode()
    if sample:
        seeds = [derive_seed(seed, i) for i in indices]
        noise = seeded_normal(seeds, latents.shape[1:], latents.device, latents.dtype)
        latents = posterior.mean + posterior.std * noise
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return model.decode(latents).sample, {"kl_per_channel": kl.mean(dim=(2, 3)), "posterior_mean": mean}


def _fid_images(images: torch.Tensor, float_input: bool) -> torch.Tensor:
    unit = to_unit_range(images)
    return unit if float_input else unit.mul(255).round().to(torch.uint8)


# --------------------------------------------------------------------------- evaluation


def process_state():
    """Accelerate's process state; several processes without CUDA (torchrun on CPUs) use gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


class SetStatistics:
    """What is computed over the whole set rather than per image: the code histogram (VQ), the
    moments of the posterior mean (KL) and the rFID feature statistics, merged across processes."""

    def __init__(self, model: Autoencoder, options: EvalOptions, networks: MetricNetworks, device: torch.device):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.vq, self.float_input = is_vq(model), networks.fid_float_input
        size = options.resolution // downsample_factor(model)
        self.code_counts = torch.zeros(model.config.num_vq_embeddings if self.vq else 0, dtype=torch.long,
                                       device=device)
        self.moments = RunningMoments((latent_channels(model), size, size), device)
        self.fid = None
        if networks.fid_extractor is not None:
            self.fid = FrechetInceptionDistance(feature=networks.fid_extractor, normalize=self.float_input,
                                                input_img_size=(3, options.resolution, options.resolution)).to(device)

    def update(self, images: torch.Tensor, recon: torch.Tensor, extras: Dict[str, torch.Tensor]) -> None:
        if self.vq:
            self.code_counts += torch.bincount(extras["codes"].flatten(), minlength=self.code_counts.numel())
        else:
            self.moments.update(extras["posterior_mean"])
        if self.fid is not None:
            self.fid.update(_fid_images(images, self.float_input), real=True)
            self.fid.update(_fid_images(recon, self.float_input), real=False)

    def finish(self, result: "EvalResult") -> None:
        """Fill rFID, the codebook or the collapse report into ``result`` (collective)."""
        if self.fid is not None:
            enough = result.images >= 2
            result.metrics["rfid"] = float(self.fid.compute()) if enough else None
            if not enough:
                result.warnings.append("rFID needs at least 2 images")
        if self.vq:
            all_reduce_sum_(self.code_counts)
            stats = codebook_statistics(self.code_counts)
            result.codebook = {"usage": float(stats["usage"]), "perplexity": float(stats["perplexity"]),
                               "codes_used": int((self.code_counts > 0).sum()),
                               "codebook_size": self.code_counts.numel()}
        elif result.per_image:
            result.latent = _collapse_report(result.per_image, self.moments.merged_across_processes(),
                                             result.warnings)


def _scores(images: torch.Tensor, recon: torch.Tensor, lpips_nets: Dict[str, nn.Module],
            extras: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-image scores of a batch, each a (B,) tensor."""
    scores = {"psnr": psnr_per_image(recon, images), "ssim": ssim_per_image(recon, images)}
    for name, net in lpips_nets.items():
        scores[f"lpips_{name}"] = net(images, recon).flatten()
    if "kl_per_channel" in extras:
        scores["kl"] = extras["kl_per_channel"].mean(dim=1)
    return scores


def evaluate(model: Autoencoder, source: ImageSource, options: Optional[EvalOptions] = None,
             networks: Optional[MetricNetworks] = None, failures: Sequence[Failure] = ()) -> EvalResult:
    """Evaluate ``model`` on every image of ``source`` (sharded over processes when launched so).

    ``networks`` defaults to ``build_metric_networks(options)``; ``failures`` are inputs already
    known to be unusable (from ``open_source``), reported with those found while reading.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    options = options or EvalOptions()
    networks = networks if networks is not None else build_metric_networks(options)
    state = process_state()
    device = state.device
    if options.limit is not None:
        source = source.subset(range(min(options.limit, len(source))))
    if len(source) < state.num_processes:
        raise DataError(f"{len(source)} images for {state.num_processes} processes: use fewer processes")
    model.to(device).eval()
    lpips_nets = {name: net.to(device) for name, net in networks.lpips.items()}
    statistics = SetStatistics(model, options, networks, device)
    shard = range(state.process_index, len(source), state.num_processes)
    loader = torch.utils.data.DataLoader(
        EvalDataset(source, shard, options.resolution), batch_size=options.batch_size, collate_fn=collate_eval_batch,
        num_workers=options.num_workers, pin_memory=device.type == "cuda",
    )
    rows: List[Dict[str, Any]] = []
    read_failures: List[Failure] = []
    progress = tqdm(total=len(shard), desc="eval", unit="img", dynamic_ncols=True,
                    disable=not (options.progress and state.is_main_process))
    with tiling(model, options.tiled, options.tile_size, options.tile_overlap), torch.no_grad():
        for batch in loader:
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
            for i, index in enumerate(batch["indices"]):
                row = {"index": index, "key": source.key(index), "upscaled": batch["upscaled"][i]}
                row.update({name: float(values[i]) for name, values in scores.items()})
                if "kl_per_channel" in extras:
                    row["kl_per_channel"] = extras["kl_per_channel"][i].tolist()
                rows.append(row)
    progress.close()

    rows = sorted(gather_object(rows), key=lambda r: r["index"])
    metrics = {name: float(np.mean([r[name] for r in rows])) if rows else None
               for name in ("psnr", "ssim", *(f"lpips_{n}" for n in lpips_nets))}
    result = EvalResult(
        model_class=type(model).__name__, metrics=metrics, per_image=rows,
        failures=list(failures) + sorted(gather_object(read_failures), key=lambda f: f.key),
        upscaled=sum(r["upscaled"] for r in rows),
        settings={"resolution": options.resolution, "sample": options.sample, "seed": options.seed,
                  "tiled": options.tiled, "tile_size": options.tile_size, "tile_overlap": options.tile_overlap,
                  "precision": options.precision, "lpips": sorted(lpips_nets),
                  "fid_extractor": type(networks.fid_extractor).__name__ if networks.fid_extractor else None},
    )
    statistics.finish(result)
    if result.upscaled:
        result.warnings.append(f"{result.upscaled} images were smaller than {options.resolution}px and upscaled")
    if state.is_main_process:
        for warning in result.warnings:
            logger.warning(warning)
        if options.grid_images > 0 and rows:
            result.grid = _grid(model, source, [r["index"] for r in rows[: options.grid_images]], options)
    return result


def _collapse_report(rows: List[Dict[str, Any]], moments: RunningMoments, warnings: List[str]) -> Dict[str, Any]:
    """Per-channel KL and active units over the whole set (the posterior-collapse monitor)."""
    kl_per_channel = np.mean([r["kl_per_channel"] for r in rows], axis=0)
    activity = moments.variance().mean(dim=(1, 2)).float().cpu()
    active = int((activity > ACTIVE_UNIT_THRESHOLD).sum())
    channels = activity.numel()
    if len(rows) < 2:
        warnings.append("active units need at least 2 images")
    elif active < channels:
        warnings.append(f"only {active} of {channels} latent channels are active (posterior-mean variance "
                        f"> {ACTIVE_UNIT_THRESHOLD}): posterior collapse in the other channels")
    return {"kl": float(kl_per_channel.mean()), "kl_per_channel": kl_per_channel.tolist(),
            "channel_activity": activity.tolist(), "active_units": active, "channels": channels,
            "active_unit_threshold": ACTIVE_UNIT_THRESHOLD}


def _grid(model: Autoencoder, source: ImageSource, indices: List[int], options: EvalOptions) -> np.ndarray:
    from ..train.loop import image_grid

    dataset = EvalDataset(source, indices, options.resolution)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(len(indices))])
    device = next(model.parameters()).device
    with tiling(model, options.tiled, options.tile_size, options.tile_overlap), autocast(device, options.precision):
        recon, _ = reconstruct_batch(model, images.to(device), indices, options.sample, options.seed)
    return image_grid(images, recon.float().cpu())


# --------------------------------------------------------------------------- outputs


def write_outputs(result: EvalResult, json_path: Optional[str | Path] = None,
                  csv_path: Optional[str | Path] = None, grid_path: Optional[str | Path] = None) -> None:
    """The JSON summary, the per-image CSV and the reconstruction grid PNG (those given)."""
    for path in (json_path, csv_path, grid_path):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result.summary(), indent=2) + "\n")
    if csv_path is not None:
        columns = [k for k in result.per_image[0] if k != "kl_per_channel"] if result.per_image else ["key"]
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(result.per_image)
    if grid_path is not None and result.grid is not None:
        from PIL import Image

        Image.fromarray(result.grid).save(grid_path)


def format_summary(result: EvalResult) -> str:
    """A few human-readable lines for the terminal."""
    lines = [f"{result.images} images ({len(result.failures)} skipped, {result.upscaled} upscaled)"]
    lines.append("  " + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if v is not None))
    if result.latent:
        lines.append(f"  KL {result.latent['kl']:.4f} nats/element, active units "
                     f"{result.latent['active_units']}/{result.latent['channels']}")
    if result.codebook:
        lines.append(f"  codebook usage {result.codebook['usage']:.1%} ({result.codebook['codes_used']}/"
                     f"{result.codebook['codebook_size']}), perplexity {result.codebook['perplexity']:.1f}")
    lines += [f"  skipped {f.key}: {f.reason}" for f in result.failures[:20]]
    if len(result.failures) > 20:
        lines.append(f"  ... and {len(result.failures) - 20} more (see the JSON)")
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)
