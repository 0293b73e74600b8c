"""The networks with pretrained weights that the metrics use: LPIPS backbones and InceptionV3 (rFID).

They are never replaced by random ones: without the weights the error says which file to pass.
Any ``nn.Module`` mapping images to feature vectors can replace InceptionV3
(``MetricNetworks(fid_extractor=...)``).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..errors import InceptionWeightsUnavailable, PerceptualWeightsUnavailable
from ..losses.perceptual import BACKBONE_URLS, build_lpips
from ..weights import cached_path, pretrained_weights
from .options import EvalOptions

# The weights torch-fidelity (and so torchmetrics' FrechetInceptionDistance) downloads.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


@dataclass
class MetricNetworks:
    """Networks with pretrained weights used by the metrics; build once, share between evaluations.

    ``fid_extractor`` maps a batch of images (uint8 in [0, 255], or float in [0, 1] when
    ``fid_float_input``) of shape (B, 3, H, W) to features (B, D).
    """

    lpips: Dict[str, nn.Module] = field(default_factory=dict)
    fid_extractor: Optional[nn.Module] = None
    fid_float_input: bool = False


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


def _missing(what: str, url: str, given: Optional[str], flag: str, err: Exception) -> str:
    """One entry of the up-front report: the network, the file it needs, and the flag that takes it
    (``flag``: a template with ``{path}``)."""
    name = Path(url).name
    if given:  # the user's file is unusable: say why (the reason names the file)
        reason = str(err).split(": ", 1)[-1] if str(err).startswith(what) else str(err)
        return f"{what}: {reason} (expected {name}: {flag.format(path='PATH')})"
    if "pip install" in str(err):  # a missing package, not a missing file
        return f"{what}: {str(err).split('; or skip')[0]}"
    return f"{what} needs {name} ({url}), not in {cached_path(url).parent}: {flag.format(path='/path/' + name)}"


def build_metric_networks(options: EvalOptions, fid_extractor: Optional[nn.Module] = None,
                          fid_float_input: bool = False) -> MetricNetworks:
    """LPIPS backbones and the rFID feature extractor the options ask for, before any image is read.

    Every network is tried; the weights that are missing are reported together, each with its file
    and flag, in one error (``InceptionWeightsUnavailable`` when only rFID's are missing)."""
    lpips_nets, missing, fid_missing = {}, [], False
    for net in options.lpips:
        given = options.lpips_weights.get(net)
        try:
            lpips_nets[net] = build_lpips(net, given)
        except PerceptualWeightsUnavailable as err:
            flag = f"--lpips-weights {net}={{path}}"
            missing.append(_missing(f"LPIPS ({net})", BACKBONE_URLS[net], given, flag, err))
    if options.fid and fid_extractor is None:
        try:
            fid_extractor = load_inception(options.fid_weights, options.fid_features)
        except InceptionWeightsUnavailable as err:
            fid_missing = True
            missing.append(_missing("rFID (torch-fidelity's InceptionV3)", INCEPTION_URL, options.fid_weights,
                                    "--fid-weights {path}", err))
    if missing:
        skips = ["--no-lpips (or --lpips naming only the backbones you have)"] if len(missing) > fid_missing else []
        skips += ["--no-fid"] if fid_missing else []
        error = InceptionWeightsUnavailable if fid_missing and len(missing) == 1 else PerceptualWeightsUnavailable
        raise error(f"missing metric weights: {'; '.join(missing)}. Pass each file with its flag (downloaded "
                    f"where there is network), or skip the metric: {' / '.join(skips)}")
    return MetricNetworks(lpips_nets, fid_extractor if options.fid else None, fid_float_input)
