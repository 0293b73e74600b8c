"""LPIPS with explicit, offline-safe loading of its ImageNet backbone.

The ``lpips`` package ships its calibrated linear heads but downloads the VGG16/AlexNet
backbone from torchvision at first use. Here the backbone comes from, in order: a local
file given by the user, the torch hub cache, a download. When none works the error says
how to fix it; a random backbone is never used silently.
"""

from __future__ import annotations

from typing import Dict, Optional

import lpips
import torch
from torch import nn

from ..errors import PerceptualWeightsUnavailable
from ..weights import pretrained_weights

BACKBONE_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}


def _backbone_state(net: str, weights_path: Optional[str]) -> Dict[str, torch.Tensor]:
    return pretrained_weights(
        BACKBONE_URLS[net], weights_path, PerceptualWeightsUnavailable, f"LPIPS ({net})",
        "it (training: reconstruction.perceptual_weights={path}; eval/score: --lpips-weights {path}); or train "
        "without the perceptual loss: reconstruction.perceptual_weight=0")


def _load_backbone(model: lpips.LPIPS, state: Dict[str, torch.Tensor], net: str) -> None:
    """Copy torchvision ``features.<i>.*`` tensors into lpips' ``net.slice<k>.<i>.*`` modules."""
    state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
    targets = {}
    for slice_name, block in model.net.named_children():
        for index, _ in block.named_children():
            for pname, param in block.get_submodule(index).named_parameters(recurse=False):
                targets[f"{index}.{pname}"] = param
    missing = [k for k in targets if k not in state]
    if missing:
        raise PerceptualWeightsUnavailable(
            f"the given weights are not a torchvision {net} backbone (missing {missing[:3]}...)"
        )
    with torch.no_grad():
        for key, param in targets.items():
            if state[key].shape != param.shape:
                raise PerceptualWeightsUnavailable(
                    f"backbone tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(state[key])


def build_lpips(net: str = "vgg", weights_path: Optional[str] = None) -> lpips.LPIPS:
    """A frozen LPIPS network with real backbone weights, or PerceptualWeightsUnavailable."""
    if net not in BACKBONE_URLS:
        raise ValueError(f"LPIPS backbone must be one of {sorted(BACKBONE_URLS)}, got {net!r}")
    state = _backbone_state(net, weights_path)
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _load_backbone(model, state, net)
    return model.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """Per-image LPIPS distance, shape (B, 1, 1, 1), for images in [-1, 1]."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.network.eval()  # dropout in the linear heads stays off
        return self

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return self.network(inputs.contiguous(), reconstructions.contiguous())
