"""Run configuration: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides.

The dataclass defaults are a small CPU-sized KL run (``tiny-kl-f4`` on the embedded sample photos);
a run without ``--config`` adds ``QUICKSTART`` to them (``configs/quickstart.yaml`` holds the same
values). Recipes in ``configs/`` override the defaults; every field is documented in README.md
("Configuration reference").
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, check_choice, check_finite, check_positive
from .presets import REGULARIZER_KINDS, check_preset, check_student_preset, preset_kind

# A run without --config (the bare `latent-vae train`, or one with overrides only): the defaults plus these.
# tiny-kl-f4's GroupNorm keeps it tinted within a CPU demo's budget, where the norm-free TAESD design started
# as a low-pass autoencoder returns colours right; at half the KL run's learning rate, after a short warm-up,
# training keeps them and adds detail (docs/BENCHMARKS.md, "Quickstart").
QUICKSTART = ("model.preset=tiny-taesd-f4", "model.init=lowpass", "regularizer.kind=none",
              "train.max_steps=400", "train.learning_rate=1.25e-4", "train.lr_warmup_steps=40")
# The quickstart's model lines, which overrides naming a model of their own replace.
MODEL_KEYS = ("model.preset", "model.pretrained", "model.init", "regularizer.kind")


def quickstart_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides of a run without ``--config``: ``QUICKSTART`` then ``overrides``, without the
    quickstart's model lines when ``overrides`` name a model (``latent-vae train model.pretrained=...``
    fine-tunes that model with its own regulariser, not the quickstart's AutoencoderTiny settings)."""
    own_model = any(entry.split("=", 1)[0].strip() in MODEL_KEYS for entry in overrides)
    base = [entry for entry in QUICKSTART if not (own_model and entry.split("=", 1)[0] in MODEL_KEYS)]
    return [*base, *overrides]


@dataclass
class ModelConfig:
    preset: str = "tiny-kl-f4"
    pretrained: Optional[str] = None
    subfolder: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)
    trainable: str = "all"
    gradient_checkpointing: bool = False
    # lowpass (AutoencoderTiny presets): start as "average each latent cell's pixels, repeat them back",
    # every cell's colour within 1 % from step 0 (``models.init``); default: the class's own random initialisation.
    init: str = "default"
    # A recipe made for one class of model (the SD decoder fine-tunes: AutoencoderKL) refuses another.
    pretrained_class: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("model.trainable", self.trainable, ("all", "decoder"))
        check_choice("model.init", self.init, ("default", "lowpass"))
        if self.pretrained_class is not None:
            check_choice("model.pretrained_class", self.pretrained_class, ("AutoencoderKL", "VQModel"))
        if not self.pretrained:
            check_preset(self.preset)
        elif self.init != "default":
            raise ConfigError(f"model.init={self.init} initialises a preset trained from scratch; model.pretrained="
                              f"{self.pretrained} starts from its own weights: set model.init=default")


@dataclass
class DataConfig:
    path: Optional[str] = None
    image_column: str = "image"
    split: str = "train"
    resolution: int = 64
    resize: Optional[int] = 128
    crop: str = "random"
    hflip: bool = True
    val_path: Optional[str] = None
    val_split: Optional[str] = None
    val_images: int = 16
    val_crops: int = 4
    # 0: the quickstart's photos are decoded once and kept (TrainDataset), so both CPU cores compute;
    # recipes for real data set their own worker count.
    num_workers: int = 0
    pin_memory: bool = True
    prefetch_factor: int = 4
    verify: bool = True
    # Sharded streams (data/streams.py, docs/SCALE.md): tar/parquet shards, or data.path streamed.
    shards: Any = None  # a pattern (brace range, glob, folder, path, URL) or a list of them
    streaming: bool = False  # read data.path as a 🤗 dataset with streaming=True
    shuffle_buffer: int = 1000  # samples shuffled together (one block); 0 or 1 = shard order
    shuffle_shards: bool = True  # a new shard order every epoch
    key_column: Optional[str] = None  # parquet/datasets: the column of sample keys (default __key__, else row)

    def __post_init__(self) -> None:
        self._check_stream_keys()
        check_choice("data.crop", self.crop, ("random", "center"))
        check_positive("data.resolution", self.resolution)
        check_positive("data.val_images", self.val_images, allow_zero=True)
        check_positive("data.val_crops", self.val_crops)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        check_positive("data.prefetch_factor", self.prefetch_factor)
        if self.resize is not None:
            check_positive("data.resize", self.resize, allow_zero=True)
        if self.resolution % 8:
            raise ConfigError(f"data.resolution={self.resolution} must be a multiple of 8")

    def _check_stream_keys(self) -> None:
        check_positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        patterns = [self.shards] if isinstance(self.shards, str) else self.shards
        if self.shards is not None and (not isinstance(patterns, list) or not patterns
                                        or not all(isinstance(p, str) and p for p in patterns)):
            raise ConfigError(f"data.shards={self.shards!r} must be a shard pattern or a list of them, e.g. "
                              "data.shards=/data/train-{000000..000099}.tar")
        if self.shards is not None and (self.path is not None or self.streaming):
            raise ConfigError("data.shards and data.path are two inputs: give one (data.streaming applies to "
                              "data.path)")
        if self.streaming and self.path is None:
            raise ConfigError("data.streaming=true reads data.path as a streaming 🤗 dataset: set data.path "
                              "(a hub dataset name or a local data folder)")

    @property
    def is_stream(self) -> bool:
        """Training reads a sharded stream (``data.shards`` or ``data.streaming``), not a map-style source."""
        return self.shards is not None or self.streaming


@dataclass
class ReconstructionConfig:
    """Pixel and perceptual reconstruction terms and the NLL log-variance (``losses/reconstruction.py``).

    ``reduction`` is the convention of every term of the objective, regulariser included:
    ``sum`` over C·H·W then the batch mean (latent-diffusion), ``mean`` over all elements (taming).
    """

    pixel_loss: str = "l2"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_net: str = "vgg"
    perceptual_weights: Optional[str] = None
    perceptual_if_unavailable: str = "error"
    reduction: str = "sum"
    learn_logvar: bool = False
    logvar_init: float = 0.0

    def __post_init__(self) -> None:
        check_choice("reconstruction.pixel_loss", self.pixel_loss, ("l1", "l2"))
        check_choice("reconstruction.perceptual_net", self.perceptual_net, ("vgg", "alex"))
        check_choice("reconstruction.perceptual_if_unavailable", self.perceptual_if_unavailable, ("error", "disable"))
        check_choice("reconstruction.reduction", self.reduction, ("sum", "mean"))
        for name in ("pixel_weight", "perceptual_weight"):
            check_positive(f"reconstruction.{name}", getattr(self, name), allow_zero=True)
        check_finite("reconstruction.logvar_init", self.logvar_init)


@dataclass
class GANConfig:
    """The PatchGAN discriminator and the adversarial terms (``losses/gan.py``)."""

    start: int = 100_000
    weight: float = 0.5
    loss: str = "hinge"
    layers: int = 3
    channels: int = 64
    norm: str = "group"
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1.0e4
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99

    def __post_init__(self) -> None:
        check_choice("gan.loss", self.loss, ("hinge", "vanilla"))
        check_choice("gan.norm", self.norm, ("group", "sync_batch", "none"))
        for name in ("start", "weight", "lecam_weight"):
            check_positive(f"gan.{name}", getattr(self, name), allow_zero=True)
        check_positive("gan.layers", self.layers)
        check_positive("gan.channels", self.channels)
        check_positive("gan.adaptive_weight_max", self.adaptive_weight_max)
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ConfigError(f"gan.lecam_decay={self.lecam_decay} must be in [0, 1)")


@dataclass
class KLConfig:
    """KL(q(z|x) ‖ N(0, I)) of an AutoencoderKL (``losses/kl.py``)."""

    weight: float = 1.0e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    cycle_steps: int = 10000
    cycle_ratio: float = 0.5
    free_bits: float = 0.0

    def __post_init__(self) -> None:
        check_choice("regularizer.kl.schedule", self.schedule, ("constant", "linear", "cyclical"))
        check_positive("regularizer.kl.cycle_steps", self.cycle_steps)
        if not 0.0 < self.cycle_ratio <= 1.0:
            raise ConfigError(f"regularizer.kl.cycle_ratio={self.cycle_ratio} must be in (0, 1]")
        if self.schedule == "linear" and self.warmup_steps <= 0:
            raise ConfigError("regularizer.kl.schedule=linear needs regularizer.kl.warmup_steps > 0")
        for name in ("weight", "free_bits", "warmup_steps"):
            check_positive(f"regularizer.kl.{name}", getattr(self, name), allow_zero=True)


@dataclass
class VQConfig:
    """Codebook loss and codebook maintenance of a VQModel (``losses/vq.py``)."""

    weight: float = 1.0
    beta: float = 0.25
    legacy_beta: bool = False
    ema_decay: Optional[float] = None
    ema_epsilon: float = 1.0e-5
    dead_after: int = 1000
    restart_dead: bool = False
    restart_buffer: int = 4096
    l2_normalize: bool = False

    def __post_init__(self) -> None:
        for name in ("weight", "beta"):
            check_positive(f"regularizer.vq.{name}", getattr(self, name), allow_zero=True)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"regularizer.vq.ema_decay={self.ema_decay} must be in (0, 1) or null")
        check_positive("regularizer.vq.dead_after", self.dead_after)
        check_positive("regularizer.vq.restart_buffer", self.restart_buffer)
        check_positive("regularizer.vq.ema_epsilon", self.ema_epsilon)


# EQ-VAE's scale factors (zelaki/eqvae ldm/models/autoencoder.py): s/32 for s = 8 … 31.
EQ_VAE_SCALES = [s / 32 for s in range(8, 32)]
LATENT_ROTATIONS = ("rot90", "rot180", "rot270", "hflip")


@dataclass
class ScaleEquivarianceConfig:
    """Skorokhodov et al. 2025: decode downscaled latents, match the equally downscaled image
    (``losses/equivariance.py``). Off at weight 0."""

    weight: float = 0.0
    factors: List[float] = field(default_factory=lambda: [0.5, 0.25])

    def __post_init__(self) -> None:
        check_positive("regularizer.scale_equivariance.weight", self.weight, allow_zero=True)
        _check_scales("regularizer.scale_equivariance.factors", self.factors, allow_empty=self.weight == 0)


@dataclass
class EQVAEConfig:
    """EQ-VAE (Kouzelis et al. 2025): with ``probability`` per step, decode a scaled and/or rotated
    latent and match the same transform of the image (``losses/equivariance.py``). Off at weight 0."""

    weight: float = 0.0
    probability: float = 0.5
    scales: List[float] = field(default_factory=lambda: list(EQ_VAE_SCALES))
    rotations: List[str] = field(default_factory=lambda: ["rot90", "rot180", "rot270"])

    def __post_init__(self) -> None:
        check_positive("regularizer.eq_vae.weight", self.weight, allow_zero=True)
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"regularizer.eq_vae.probability={self.probability} must be in [0, 1]")
        _check_scales("regularizer.eq_vae.scales", self.scales, allow_empty=True)
        for rotation in self.rotations:
            check_choice("regularizer.eq_vae.rotations", rotation, LATENT_ROTATIONS)
        if self.weight > 0 and not (self.scales or self.rotations):
            raise ConfigError("regularizer.eq_vae needs scales or rotations to draw from (or weight=0)")


@dataclass
class VFLossConfig:
    """VA-VAE's vision-foundation alignment loss (Yao et al. 2025, ``losses/vf.py``). Off at weight 0.
    ``backbone``: a transformers ``AutoModel`` image backbone, hub id or local folder."""

    weight: float = 0.0
    backbone: str = "facebook/dinov2-large"
    image_size: int = 224
    cos_margin: float = 0.5
    distmat_margin: float = 0.25
    cos_weight: float = 1.0
    distmat_weight: float = 1.0
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1.0e8

    def __post_init__(self) -> None:
        for name in ("weight", "cos_margin", "distmat_margin", "cos_weight", "distmat_weight"):
            check_positive(f"regularizer.vf.{name}", getattr(self, name), allow_zero=True)
        check_positive("regularizer.vf.image_size", self.image_size)
        check_positive("regularizer.vf.adaptive_weight_max", self.adaptive_weight_max)


def _check_scales(name: str, scales: List[float], allow_empty: bool) -> None:
    if not scales and not allow_empty:
        raise ConfigError(f"{name} is empty: give downscale factors in (0, 1), e.g. [0.5, 0.25]")
    for scale in scales:
        check_finite(name, scale)
        if not 0.0 < scale < 1.0:
            raise ConfigError(f"{name} holds {scale}: every factor must be in (0, 1) (a downscale)")


@dataclass
class RegularizerConfig:
    """What shapes the latent space: ``kind`` kl (an AutoencoderKL), vq (a VQModel) or none (an
    AutoencoderTiny: deterministic latents), and its settings. Only the section of ``kind`` is used; the
    kind must match the model's class. The diffusability sections (``scale_equivariance``, ``eq_vae``,
    ``vf``) apply to every kind."""

    kind: str = "kl"
    kl: KLConfig = field(default_factory=KLConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    # Diffusability regularisers (KL and VQ alike), added to the objective when their weight is > 0.
    scale_equivariance: ScaleEquivarianceConfig = field(default_factory=ScaleEquivarianceConfig)
    eq_vae: EQVAEConfig = field(default_factory=EQVAEConfig)
    vf: VFLossConfig = field(default_factory=VFLossConfig)

    def __post_init__(self) -> None:
        check_choice("regularizer.kind", self.kind, REGULARIZER_KINDS)


@dataclass
class TrainConfig:
    max_steps: int = 800
    batch_size: int = 8
    grad_accum_steps: int = 1
    learning_rate: float = 2.5e-4
    lr_scaling: str = "linear"
    disc_lr_ratio: float = 1.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    amsgrad: bool = False
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: Optional[float] = None
    mixed_precision: str = "no"
    seed: int = 0
    ema_decay: Optional[float] = 0.999
    export_ema: bool = True
    checkpoint_every: int = 400
    keep_checkpoints: int = 2
    val_every: int = 200
    max_bad_steps: int = 25
    time_limit_minutes: Optional[float] = None
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    fused_optimizer: bool = False
    allow_tf32: bool = True

    def __post_init__(self) -> None:
        check_choice("train.lr_scaling", self.lr_scaling, ("linear", "none"))
        check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        for name in ("max_steps", "batch_size", "grad_accum_steps", "learning_rate",
                     "checkpoint_every", "keep_checkpoints", "val_every", "max_bad_steps"):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("disc_lr_ratio", "weight_decay", "lr_warmup_steps", "seed"):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if self.seed >= 2**63:  # torch.manual_seed's range (beyond: an overflow traceback)
            raise ConfigError(f"train.seed={self.seed} must be below 2**63")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas={self.adam_betas} must be two numbers in [0, 1)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be in (0, 1) or null")
        if self.max_grad_norm is not None:
            check_positive("train.max_grad_norm", self.max_grad_norm)
        if self.time_limit_minutes is not None:
            check_positive("train.time_limit_minutes", self.time_limit_minutes)


@dataclass
class LoggingConfig:
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "latent_vae"
    log_every: int = 10
    image_every: int = 200
    diffusability: bool = False  # validation also logs latent spectrum and equivariance (evaluate/diffusability.py)

    def __post_init__(self) -> None:
        for tracker in self.trackers:
            check_choice("logging.trackers", tracker, ("tensorboard", "wandb"))
        check_positive("logging.log_every", self.log_every)
        check_positive("logging.image_every", self.image_every)


@dataclass
class ExportConfig:
    scaling_factor: Optional[float] = None
    scaling_images: int = 64
    push_to_hub: Optional[str] = None  # OWNER/NAME: the exported folder and its card go to this Hub repository
    hub_private: bool = False
    license: str = "other"  # the model card's license (a Hub license id, e.g. mit, apache-2.0, openrail)

    def __post_init__(self) -> None:
        if self.push_to_hub is not None and "/" not in self.push_to_hub:
            raise ConfigError(f"export.push_to_hub={self.push_to_hub!r} is not a Hub repository id; give OWNER/NAME")
        if self.scaling_factor is not None:
            check_positive("export.scaling_factor", self.scaling_factor)
        check_positive("export.scaling_images", self.scaling_images, allow_zero=True)


@dataclass
class DistillConfig:
    """``latent-vae distill``: a stock ``AutoencoderTiny`` student learns a teacher AutoencoderKL's latent space
    (``distill/``). The student's latents are the teacher pipeline's *scaled* latents, ``(z − shift) · scale``."""

    teacher: Optional[str] = None
    teacher_subfolder: Optional[str] = None
    parts: str = "both"
    student: str = "taesd"
    student_config: Dict[str, Any] = field(default_factory=dict)
    teacher_latents: str = "sample"
    encoder_weight: float = 1.0
    teacher_decode_weight: float = 0.0
    benchmark_images: int = 8

    def __post_init__(self) -> None:
        check_choice("distill.parts", self.parts, ("encoder", "decoder", "both"))
        check_choice("distill.teacher_latents", self.teacher_latents, ("sample", "mode"))
        check_student_preset(self.student)
        for name in ("encoder_weight", "teacher_decode_weight", "benchmark_images"):
            check_positive(f"distill.{name}", getattr(self, name), allow_zero=True)
        if self.parts != "decoder" and self.encoder_weight == 0:
            raise ConfigError(f"distill.parts={self.parts} trains the encoder, whose only loss is "
                              "distill.encoder_weight; set it > 0 or use distill.parts=decoder")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        model = self.model
        if not model.pretrained:  # a pretrained model's class is checked when it is loaded
            kind = preset_kind(model.preset)
            wrong = {}  # key: (its value, the value this preset needs)
            if self.regularizer.kind != kind:
                wrong["regularizer.kind"] = (self.regularizer.kind, kind)
            if model.init == "lowpass" and kind != "none":
                wrong["model.init"] = ("lowpass (AutoencoderTiny presets only)", "default")
            if wrong:
                found = " and ".join(f"{key}={value}" for key, (value, _) in wrong.items())
                fix = " ".join(f"{key}={needed}" for key, (_, needed) in wrong.items())
                raise ConfigError(f"model.preset={model.preset} is {describe_kind(kind)} but {found}; set {fix}")
        if self.regularizer.vf.weight > 0 and self.model.trainable == "decoder":
            raise ConfigError("regularizer.vf aligns the encoder's latents, which model.trainable=decoder freezes: "
                              "set model.trainable=all, or regularizer.vf.weight=0")


def describe_kind(kind: str) -> str:
    return "an AutoencoderTiny (no latent regulariser)" if kind == "none" else f"a {kind.upper()} model"


def check_regularizer_kind(configured: str, model_kind: str, what: str) -> None:
    """KL vs VQ vs none is explicit: ``regularizer.kind`` must name the model's own regulariser."""
    if configured != model_kind:
        raise ConfigError(f"{what} is {describe_kind(model_kind)} but regularizer.kind={configured}; "
                          f"set regularizer.kind={model_kind}")


# Keys of the flat ``loss:``/``quantizer:`` sections before the sections mirrored the loss classes.
MOVED_KEYS = {
    **{f"loss.{k}": f"reconstruction.{k}" for k in (
        "pixel_loss", "pixel_weight", "perceptual_weight", "perceptual_net", "perceptual_weights",
        "perceptual_if_unavailable", "reduction", "learn_logvar", "logvar_init")},
    **{f"loss.disc_{k}": f"gan.{k}" for k in ("weight", "start", "loss", "layers", "channels", "norm")},
    **{f"loss.{k}": f"gan.{k}" for k in ("adaptive_weight", "adaptive_weight_max", "lecam_weight", "lecam_decay")},
    "loss.kl_weight": "regularizer.kl.weight", "loss.kl_schedule": "regularizer.kl.schedule",
    "loss.kl_warmup_steps": "regularizer.kl.warmup_steps", "loss.kl_cycle_steps": "regularizer.kl.cycle_steps",
    "loss.kl_cycle_ratio": "regularizer.kl.cycle_ratio", "loss.free_bits": "regularizer.kl.free_bits",
    "loss.codebook_weight": "regularizer.vq.weight", "loss.commitment_beta": "regularizer.vq.beta",
    "loss.legacy_beta": "regularizer.vq.legacy_beta",
    **{f"quantizer.{k}": f"regularizer.vq.{k}" for k in (
        "ema_decay", "ema_epsilon", "dead_after", "restart_dead", "restart_buffer", "l2_normalize")},
}


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _valid_keys(cls: type, prefix: str = "") -> Dict[str, bool]:
    """Dotted key -> whether it is a free-form mapping (whose sub-keys are not checked)."""
    keys: Dict[str, bool] = {}
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            keys.update(_valid_keys(typ, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = typing.get_origin(typ) is dict
    return keys


VALID_KEYS = _valid_keys(Config)


def _flatten(tree: Any, prefix: str = "") -> List[str]:
    if not isinstance(tree, dict):
        return [prefix]
    if not tree and prefix:
        return [prefix]
    out: List[str] = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if dotted in VALID_KEYS and VALID_KEYS[dotted]:
            out.append(dotted)
        else:
            out.extend(_flatten(value, dotted))
    return out


def _check_keys(tree: dict, source: str) -> None:
    for dotted in _flatten(tree):
        if dotted in VALID_KEYS:
            continue
        if dotted in MOVED_KEYS:
            raise ConfigError(f"config key '{dotted}' in {source} has moved: use '{MOVED_KEYS[dotted]}' "
                              "(see README.md 'Configuration reference')")
        if any(dotted.startswith(k + ".") and free for k, free in VALID_KEYS.items()):
            continue
        close = difflib.get_close_matches(dotted, VALID_KEYS.keys(), n=1, cutoff=0.5)
        if not close:
            leaf = dotted.rsplit(".", 1)[-1]
            close = [k for k in VALID_KEYS if k.endswith("." + leaf)][:1]
        hint = f"; did you mean '{close[0]}'?" if close else "; see README.md 'Configuration reference'"
        raise ConfigError(f"unknown config key '{dotted}' in {source}{hint}")


def resolve_config_path(name_or_path: str) -> Path:
    """A recipe path, or a bare recipe name (``kl-f8``) looked up in the repository's configs/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name_or_path} (give a YAML path or a recipe name from configs/)")


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults <- YAML file <- dotted ``key=value`` overrides, validated and typed."""
    layers = [OmegaConf.structured(Config)]
    if path is not None:
        file = resolve_config_path(str(path))
        with open(file, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{file} must hold a mapping of sections (model:, data:, train: ...)")
        _check_keys(tree, str(file))
        layers.append(OmegaConf.create(tree))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.batch_size=8)")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value.strip() else None
        _check_keys(_nest(key.strip(), parsed), "command-line overrides")
        layers.append(OmegaConf.create(_nest(key.strip(), parsed)))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        expected = _expected_type(key)
        raise ConfigError(
            f"invalid value for '{key}': {reason}"
            + (f"; expected {expected}, e.g. {key}=<{expected}>" if expected else "")
        ) from None


def _nest(dotted: str, value: Any) -> dict:
    tree: Any = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def _expected_type(dotted: str) -> Optional[str]:
    typ: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(typ):
            return None
        typ = typing.get_type_hints(typ).get(part)
    if typ is None:
        return None
    return getattr(typ, "__name__", None) if isinstance(typ, type) else str(typ).replace("typing.", "")


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)
