"""What a run shows of its model: the fixed validation crops and their loader, validation metrics,
reconstruction previews and image grids (files under ``samples/`` and the trackers), and a fine-tune's
latent drift.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..config import Config
from ..data.datasets import TrainDataset, ValidationDataset, collate
from ..data.images import image_grid
from ..distributed import all_reduce_sum_
from ..evaluate.compare import latent_drift
from ..evaluate.diffusability import model_statistics, summary_metrics
from ..evaluate.metrics import psnr_per_image, ssim_per_image
from ..models.stock import Autoencoder, reconstruct

logger = logging.getLogger("latent_vae")


def validation_loader(source, cfg: Config, accelerator):
    dataset = ValidationDataset(source, cfg.data, cfg.data.val_crops)
    shard = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    workers = min(cfg.data.num_workers, 2)
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=cfg.train.batch_size, collate_fn=collate,
        num_workers=workers, persistent_workers=workers > 0,
    )


def preview_batch(val_loader, train_dataset, accelerator, count: int = 8) -> torch.Tensor:
    """Fixed images for the reconstruction grids: the first ``count`` validation crops of the whole
    validation set, gathered from every process's shard (or the first training crops)."""
    device = accelerator.device
    if val_loader is not None:
        images = []
        for batch in val_loader:
            if batch["pixel_values"] is not None:
                images.append(batch["pixel_values"])
            if sum(len(i) for i in images) >= count:
                break
        gathered = _gather_in_dataset_order(images, count, accelerator)
        if gathered is not None:
            return gathered
    crops = TrainDataset(train_dataset.sample_source(count), train_dataset.cfg)
    items = [crops[(i % len(crops), i)]["pixel_values"] for i in range(count)]
    return torch.stack(items).to(device)


def _gather_in_dataset_order(images: List[torch.Tensor], count: int, accelerator) -> Optional[torch.Tensor]:
    """This process's first validation crops, gathered from all processes back into dataset order:
    process r holds items r, r + P, r + 2P... (``validation_loader``). Every process sends ``count``
    crops (zero-padded) and how many are real. None when no process has any."""
    device, processes = accelerator.device, accelerator.num_processes
    local = torch.cat(images)[:count].to(device) if images else torch.zeros((0, 3, 1, 1), device=device)
    held = len(local)
    # a process whose shard is empty still takes part; the crop size is then learnt from the others
    sizes = accelerator.gather(torch.tensor([held, *local.shape[2:]], device=device)).view(processes, 3)
    if not sizes[:, 0].any():
        return None
    resolution = tuple(int(v) for v in sizes[sizes[:, 0].argmax(), 1:])
    padded = torch.zeros((count, 3, *resolution), device=device)
    padded[:held] = local
    everyone = accelerator.gather(padded)
    held_by = sizes[:, 0].tolist()
    order = [rank * count + k for k in range(count) for rank in range(processes) if k < held_by[rank]]
    return everyone[order[:count]]


@torch.no_grad()
def log_preview(preview: torch.Tensor, vae: Autoencoder, accelerator, output_dir: Path, step: int) -> None:
    """Inputs (top row) above their reconstructions: ``samples/reconstructions-<step>.png`` and the trackers."""
    if not accelerator.is_main_process:
        return
    with accelerator.autocast():
        recon = reconstruct(vae, preview)
    log_grid(image_grid(torch.cat([preview, recon]), columns=len(preview)), "reconstructions", accelerator,
             output_dir, step)


def log_grid(grid, name: str, accelerator, output_dir: Path, step: int) -> None:
    """An image grid as ``samples/<name>-<step>.png`` and as image ``name`` on the trackers (main process)."""
    samples = output_dir / "samples"
    samples.mkdir(exist_ok=True)
    grid.save(samples / f"{name}-{step:08d}.png")
    pixels = np.asarray(grid)  # HWC uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, pixels, step, dataformats="HWC")
        else:
            tracker.log_images({name: [pixels]}, step=step)


@torch.no_grad()
def validate(vae: Autoencoder, loader, accelerator, step: int, diffusability: bool = False) -> Dict[str, float]:
    """Mean PSNR/SSIM of reconstructions (posterior mean) over the validation set, all processes;
    logged as ``val/<metric>`` at ``step``. ``diffusability`` (``logging.diffusability``) adds the
    latent high-frequency fraction and the equivariance PSNRs (``evaluate.diffusability``)."""
    was_training = vae.training
    vae.eval()
    statistics = model_statistics(vae, accelerator.device) if diffusability else None
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        if batch["pixel_values"] is None:
            continue
        images = batch["pixel_values"].to(accelerator.device)
        with accelerator.autocast():
            recon = reconstruct(vae, images)
            if statistics is not None:
                statistics.update(images)
        sums += torch.stack([psnr_per_image(recon, images).sum(), ssim_per_image(recon, images).sum(),
                             torch.tensor(float(len(images)), device=images.device)]).double()
    vae.train(was_training)
    all_reduce_sum_(sums)
    count = max(sums[2].item(), 1.0)
    metrics = {"psnr": sums[0].item() / count, "ssim": sums[1].item() / count}
    if statistics is not None:
        metrics.update(summary_metrics(statistics.result()))
    accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    logger.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def report_latent_drift(initial_vae: Autoencoder, vae: Autoencoder, val_loader, accelerator, cfg: Config,
                        step: int) -> Dict[str, Any]:
    """How far a fine-tune moved the latents of the validation images from the starting model's."""
    drift = latent_drift(initial_vae.to(accelerator.device), vae,
                         (b["pixel_values"] for b in val_loader if b["pixel_values"] is not None))
    accelerator.log({"val/latent_drift": drift["relative_l2"],
                     "val/scaled_latent_drift": drift["scaled_relative_l2"]}, step=step)
    logger.info("latent drift against the starting model (%s): relative L2 %.3g, scaled %.3g%s",
                cfg.model.pretrained, drift["relative_l2"], drift["scaled_relative_l2"],
                " (encoder frozen)" if cfg.model.trainable == "decoder" else "")
    return drift
