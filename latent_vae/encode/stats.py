"""Statistics of an encoded latent set, and the scale fields of a diffusers model config.

Conventions (what a diffusion pipeline does with the VAE's latent ``z``):

- ``scaling_factor`` = 1 / global std and ``shift_factor`` = global mean: SD3/FLUX-style
  pipelines train on ``(z - shift_factor) * scaling_factor`` and decode
  ``z_scaled / scaling_factor + shift_factor``. SD 1.x/2.x and SDXL pipelines read only
  ``scaling_factor`` (``z * scaling_factor``).
- ``latents_mean`` / ``latents_std`` (per channel): SDXL-family pipelines, when both are set,
  use ``(z - latents_mean) * scaling_factor / latents_std``; there ``scaling_factor`` is the
  target std after per-channel normalisation (1.0 for unit variance: ``fields="per-channel"``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Union

import numpy as np

from ..errors import ConfigError, check_choice, with_article
from ..models.checks import read_json_config
from ..runtime import atomic_write_bytes
from .decode import load_latent_dataset, stored_dtype
from .formats import flat_values
from .storage import latent_to_tensor

# No "both": SDXL-family pipelines apply latents_std *and* scaling_factor, so a config holding
# the global scale and the per-channel fields would be scaled twice there.
FIELD_SETS = ("global", "per-channel")


class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64
    (Chan, Golub & LeVeque's parallel form of Welford's algorithm): one pass, no cancellation."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def update(self, values: np.ndarray) -> None:
        """``values``: (channels, n) of one batch."""
        n = values.shape[1]
        if n == 0:
            return
        values = values.astype(np.float64, copy=False)
        batch_mean = values.mean(axis=1)
        batch_m2 = np.square(values - batch_mean[:, None]).sum(axis=1)
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + np.square(delta) * self.count * n / total
        self.count = total


@dataclass
class LatentStatistics:
    """Mean and (sample, n − 1) standard deviation per channel and over all values."""

    rows: int
    values_per_channel: int
    channel_mean: List[float]
    channel_std: List[float]
    mean: float
    std: float

    @property
    def scaling_factor(self) -> float:
        return 1.0 / self.std

    @property
    def shift_factor(self) -> float:
        return self.mean

    def to_json(self) -> Dict[str, Any]:
        return {**asdict(self), "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    @classmethod
    def from_moments(cls, moments: ChannelMoments, rows: int) -> "LatentStatistics":
        n, channels = moments.count, len(moments.mean)
        if n < 2:
            raise ConfigError(f"statistics need at least 2 latent values per channel (got {n})")
        mean = float(moments.mean.mean())  # every channel has the same count
        m2 = float(moments.m2.sum() + n * np.square(moments.mean - mean).sum())
        return cls(rows=rows, values_per_channel=n, channel_mean=moments.mean.tolist(),
                   channel_std=np.sqrt(moments.m2 / (n - 1)).tolist(), mean=mean,
                   std=float(np.sqrt(m2 / (n * channels - 1))))


def _channel_blocks(values: np.ndarray, shapes: List[List[int]]) -> Iterator[np.ndarray]:
    """Flat row-major values of rows with the given (C, h, w) shapes -> (C, n) blocks."""
    channels = shapes[0][0]
    if all(shape == shapes[0] for shape in shapes):
        yield values.reshape(len(shapes), channels, -1).transpose(1, 0, 2).reshape(channels, -1)
        return
    offset = 0
    for shape in shapes:  # aspect-ratio buckets: rows of different sizes
        size = int(np.prod(shape))
        yield values[offset:offset + size].reshape(channels, -1)
        offset += size


def latent_statistics(dataset, dtype: str, column: str = "latent", batch_size: int = 256,
                      progress: bool = False) -> LatentStatistics:
    """Exact statistics of ``column`` over every row of a latent ``datasets.Dataset`` (rows as
    ``encode`` writes them: (C, h, w) arrays in storage ``dtype``, and ``latent_shape``)."""
    from tqdm.auto import tqdm

    if column not in dataset.column_names:
        raise ConfigError(f"the latents have no column '{column}' (columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise ConfigError("the latent dataset holds no rows")
    moments = ChannelMoments(dataset[0]["latent_shape"][0])
    table = dataset.select_columns([column, "latent_shape"]).with_format("arrow")
    for batch in tqdm(table.iter(batch_size=batch_size), total=-(-len(dataset) // batch_size), desc="stats",
                      unit="batch", disable=not progress):
        values = latent_to_tensor(flat_values(batch.column(column)), dtype).double().numpy()
        for block in _channel_blocks(values, batch.column("latent_shape").to_pylist()):
            moments.update(block)
    return LatentStatistics.from_moments(moments, len(dataset))


def compute_latent_statistics(latents_dir: Union[str, Path], column: str = "latent", batch_size: int = 256,
                              progress: bool = True) -> LatentStatistics:
    """``latent_statistics`` of an encode output directory."""
    dataset, config = load_latent_dataset(latents_dir)
    return latent_statistics(dataset, stored_dtype(config), column, batch_size, progress)


# The statistics keys a class's config has, where it lacks some (AutoencoderKL has them all): VQModel only
# scaling_factor (``LDMPipeline`` reads nothing else), AutoencoderTiny no per-channel fields.
CLASS_KEYS = {"VQModel": ("scaling_factor",), "AutoencoderTiny": ("scaling_factor", "shift_factor")}


def check_fields(fields: str, class_name: str, model_dir: Union[str, Path]) -> None:
    """``fields`` must be ones the model's class has: per-channel statistics cannot be written to a
    VQModel or an AutoencoderTiny (``CLASS_KEYS``)."""
    check_choice("--fields", fields, FIELD_SETS)
    if class_name in CLASS_KEYS and fields == "per-channel":
        applied = " and ".join(CLASS_KEYS[class_name])
        raise ConfigError(f"--fields per-channel: {model_dir} is {with_article(class_name)}, whose config has no "
                          f"latents_mean/latents_std (its pipelines apply only {applied}); use --fields global")


def read_model_config(model_dir: Union[str, Path]) -> Dict[str, Any]:
    """The ``config.json`` of the ``--write-to`` folder (checked: bounded, a mapping)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a diffusers model folder (no config.json)")
    return read_json_config(path)


def check_write_target(model_dir: Union[str, Path], fields: str) -> None:
    """Refuse a ``--write-to`` that cannot take ``fields`` before the statistics pass runs."""
    check_fields(fields, read_model_config(model_dir).get("_class_name", "AutoencoderKL"), model_dir)


def config_updates(stats: LatentStatistics, fields: str, class_name: str) -> Dict[str, Any]:
    """The config keys ``fields`` sets (see the module docstring for the conventions)."""
    check_fields(fields, class_name, class_name)
    per_channel = {"latents_mean": stats.channel_mean, "latents_std": stats.channel_std}
    scale = {"scaling_factor": stats.scaling_factor, "shift_factor": stats.shift_factor}
    if fields == "global":
        updates = {**scale, "latents_mean": None, "latents_std": None}
    else:
        updates = {**per_channel, "scaling_factor": 1.0, "shift_factor": None}
    keys = CLASS_KEYS.get(class_name)
    return updates if keys is None else {key: value for key, value in updates.items() if key in keys}


def write_to_model_config(model_dir: Union[str, Path], stats: LatentStatistics,
                          fields: str = "global") -> Dict[str, Any]:
    """Update ``model_dir/config.json`` in place (atomically); returns the keys written."""
    path = Path(model_dir) / "config.json"
    config = read_model_config(model_dir)
    class_name = config.get("_class_name", "AutoencoderKL")
    channels = config.get("latent_channels")
    if class_name == "VQModel":
        channels = config.get("vq_embed_dim") or channels
    if channels is not None and channels != len(stats.channel_mean):
        raise ConfigError(f"the latents have {len(stats.channel_mean)} channels but {model_dir} has {channels}; "
                          "--write-to must be the model that encoded them")
    updates = config_updates(stats, fields, class_name)
    config.update(updates)
    atomic_write_bytes(path, lambda h: h.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode()))
    return updates
