"""Per-image anomaly scores: how badly the tokenizer reconstructs an image, and (KL models) how
far its posterior is from the prior. An autoencoder trained on one kind of image reconstructs
that kind well and others worse, so high scores flag inputs unlike the training data.

Scores, per image, after the resize + centre crop to ``--resolution`` (as ``eval``), on the
reconstruction and posterior ``eval`` uses (``evaluate.evaluation.reconstruct_batch``):

- ``mse``, ``l1``: mean squared / absolute pixel error on [0, 1] (reconstruction clamped), the
  reconstruction being the stock one (KL: decoded posterior mean; VQ: quantised).
- ``lpips``: LPIPS distance (backbone ``--lpips-net``, real ImageNet weights only), when available.
- ``kl`` (KL models): KL(q(z|x) ‖ N(0, I)) in nats, averaged over the latent elements (C·h·w),
  as ``eval``'s ``kl``.

Threshold calibration: the ``percentile`` of one score over a reference set of normal images;
an input is flagged when its score is strictly above the threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.sources import Failure, ImageSource
from ..errors import ConfigError, PerceptualWeightsUnavailable, check_choice, check_positive, with_article
from ..evaluate.evaluation import reconstruct_batch
from ..evaluate.metrics import to_unit_range
from ..losses.perceptual import build_lpips
from ..models.stock import Autoencoder, is_tiny, is_vq
from .common import check_resolution, iter_batches, write_csv, write_failures

SCORES = ("mse", "l1", "lpips", "kl")


def load_lpips(net: str = "alex", weights_path: Optional[str] = None,
               disabled: bool = False) -> Tuple[Optional[torch.nn.Module], Optional[str]]:
    """(LPIPS network, None), or (None, why it is skipped) when its backbone weights are neither
    cached nor downloadable. A weights file given explicitly must work: its failure is an error."""
    if disabled:
        return None, "LPIPS disabled (--no-lpips)"
    try:
        return build_lpips(net, weights_path), None
    except PerceptualWeightsUnavailable as err:
        if weights_path:
            raise
        return None, f"LPIPS skipped: {err}"


@torch.no_grad()
def score_batch(model: Autoencoder, pixels: torch.Tensor,
                lpips_net: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Images (B, 3, R, R) in [-1, 1] -> {score name: (B,) values on the CPU} (module docstring)."""
    pixels = pixels.to(model.device)
    reconstructions, extras = reconstruct_batch(model, pixels, range(pixels.shape[0]))
    error = to_unit_range(reconstructions) - to_unit_range(pixels)
    scores = {"mse": error.pow(2).flatten(1).mean(dim=1), "l1": error.abs().flatten(1).mean(dim=1)}
    if lpips_net is not None:
        scores["lpips"] = lpips_net(reconstructions.clamp(-1, 1), pixels).flatten()
    if "kl_per_channel" in extras:  # every channel has h·w elements: the channel mean is the element mean
        scores["kl"] = extras["kl_per_channel"].mean(dim=1)
    return {name: values.float().cpu() for name, values in scores.items()}


@dataclass
class ScoreTable:
    keys: List[str] = field(default_factory=list)
    scores: Dict[str, List[float]] = field(default_factory=dict)
    failures: List[Failure] = field(default_factory=list)

    def rows(self) -> List[Dict[str, object]]:
        return [{"key": key, **{name: values[i] for name, values in self.scores.items()}}
                for i, key in enumerate(self.keys)]


def score_images(model: Autoencoder, source: ImageSource, resolution: int,
                 lpips_net: Optional[torch.nn.Module] = None, batch_size: int = 8,
                 desc: Optional[str] = "score") -> ScoreTable:
    """Scores of every readable image of ``source``; unreadable ones listed in ``failures``."""
    table = ScoreTable()
    if lpips_net is not None:
        lpips_net = lpips_net.to(model.device)
    for batch in iter_batches(source, resolution, batch_size, desc):
        table.failures += batch.failures
        if batch.pixels is None:
            continue
        table.keys += batch.keys
        for name, values in score_batch(model, batch.pixels, lpips_net).items():
            table.scores.setdefault(name, []).extend(values.tolist())
    return table


def _check_percentile(percentile: float) -> None:
    check_positive("--percentile", percentile)
    if percentile > 100:
        raise ConfigError(f"--percentile={percentile!r} must be in (0, 100]")


def calibrate_threshold(values: List[float], percentile: float) -> float:
    """The ``percentile`` (0–100, linear interpolation between order statistics) of ``values``."""
    _check_percentile(percentile)
    if not values:
        raise ConfigError("threshold calibration needs at least one readable reference image")
    return float(np.percentile(np.asarray(values, dtype=np.float64), percentile))


@dataclass
class ScoreReport:
    table: ScoreTable
    score: str
    threshold: Optional[float]
    exceeding: List[str]  # keys of inputs scoring above the threshold, highest first
    reference: Optional[ScoreTable]
    percentile: Optional[float]
    lpips_note: Optional[str]
    files: Dict[str, Path]

    def summary(self) -> Dict[str, object]:
        scored = len(self.table.keys)
        flagged = self.threshold is not None
        return {
            "score": self.score,
            "threshold": self.threshold,
            "threshold_source": (f"percentile {self.percentile} of {len(self.reference.keys)} reference images"
                                 if self.reference is not None else
                                 "given" if flagged else None),
            "inputs_scored": scored,
            "inputs_unreadable": len(self.table.failures),
            "reference_unreadable": None if self.reference is None else len(self.reference.failures),
            "exceeding": len(self.exceeding) if flagged else None,
            "exceeding_fraction": (len(self.exceeding) / max(scored, 1)) if flagged else None,
            "lpips": self.lpips_note or "computed",
            "columns": list(self.table.scores),
        }


def write_scores(model: Autoencoder, source: ImageSource, output_dir: str | Path, resolution: int,
                 reference: Optional[ImageSource] = None, score: str = "mse", percentile: float = 99.0,
                 threshold: Optional[float] = None, lpips_net: Optional[torch.nn.Module] = None,
                 lpips_note: Optional[str] = None, batch_size: int = 8,
                 known_failures: Sequence[Failure] = (),
                 reference_known_failures: Sequence[Failure] = ()) -> ScoreReport:
    """Score ``source``; calibrate a threshold on ``reference`` (or take ``threshold``); write
    ``scores.csv`` (with an ``anomalous`` 0/1 column when there is a threshold),
    ``reference_scores.csv``, ``summary.json`` and ``unreadable.csv`` / ``reference_unreadable.csv``
    (the ``known_failures`` — e.g. from ``open_inputs`` — and inputs that failed to decode)."""
    check_choice("--score", score, SCORES)
    if score == "kl" and (is_vq(model) or is_tiny(model)):
        raise ConfigError(f"--score kl needs a KL model (AutoencoderKL); {with_article(type(model).__name__)} has no "
                          "posterior: use mse, l1 or lpips")
    if score == "lpips" and lpips_net is None:
        raise ConfigError(f"--score lpips needs LPIPS ({lpips_note or 'not loaded'}); pass --lpips-weights "
                          "or choose --score mse")
    if reference is not None and threshold is not None:
        raise ConfigError("give either --reference (calibrate the threshold) or --threshold, not both")
    if reference is not None:
        _check_percentile(percentile)
    check_resolution(model, resolution)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files: Dict[str, Path] = {}
    reference_table = None
    if reference is not None:
        reference_table = score_images(model, reference, resolution, lpips_net, batch_size, desc="reference")
        reference_table.failures[:0] = reference_known_failures
        files["reference_scores"] = write_csv(reference_table.rows(), output_dir / "reference_scores.csv")
        if write_failures(reference_table.failures, output_dir / "reference_unreadable.csv"):
            files["reference_unreadable"] = output_dir / "reference_unreadable.csv"
        threshold = calibrate_threshold(reference_table.scores.get(score, []), percentile)
    table = score_images(model, source, resolution, lpips_net, batch_size)
    table.failures[:0] = known_failures

    rows = table.rows()
    exceeding: List[str] = []
    if threshold is not None:
        for row in rows:
            row["anomalous"] = int(row[score] > threshold)
        exceeding = [row["key"] for row in sorted(rows, key=lambda r: -r[score]) if row["anomalous"]]
    files["scores"] = write_csv(rows, output_dir / "scores.csv")
    if write_failures(table.failures, output_dir / "unreadable.csv"):
        files["unreadable"] = output_dir / "unreadable.csv"
    report = ScoreReport(table, score, threshold, exceeding, reference_table,
                         percentile if reference is not None else None, lpips_note, files)
    files["summary"] = output_dir / "summary.json"
    files["summary"].write_text(json.dumps(report.summary(), indent=2) + "\n")
    return report
