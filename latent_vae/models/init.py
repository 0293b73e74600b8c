"""Initialisations a preset can start from (``model.init``), on the stock classes' own modules.

``lowpass`` (AutoencoderTiny): three channels of every layer carry the image's colour through the
network, so that before its first step the model reconstructs each latent cell's mean colour,
repeated back over the cell. A from-scratch model learns brightness and the high-variance colour axis
first and fills the low-variance red–green axis from the training photos' palette, which leaves a
tint for thousands of steps (docs/BENCHMARKS.md, "Quickstart"); started this way, colour is right
from step 0 and training adds the detail. The other channels keep diffusers' random initialisation.

The path through TAESD's layers: the encoder's first convolution copies R, G, B (its input is in
[0, 1], so ReLU keeps them); every residual block's last convolution writes nothing into those
channels, so the block passes them through (``ReLU(0 + x) = x``); each stride-2 convolution averages
2 × 2 pixels; the encoder's last convolution writes colour × ``LATENT_GAIN`` into latent channels 0–2
(small enough for the decoder's ``3 · tanh(z / 3)`` clamp to leave them within 1 %); the decoder's
first convolution undoes the gain, its upsampling repeats the cell, the following convolutions and
its output convolution copy the channels.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from diffusers import AutoencoderTiny
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from ..errors import ConfigError

COLOUR = 3
LATENT_GAIN = 0.5
CENTRE: Dict[Tuple[int, int], float] = {(1, 1): 1.0}
# A 3 × 3, stride-2, padding-1 convolution's output (i, j) sees input rows and columns 2i−1 … 2i+1:
# these taps average the 2 × 2 block at (2i, 2j).
BLOCK_MEAN: Dict[Tuple[int, int], float] = {(1, 1): 0.25, (1, 2): 0.25, (2, 1): 0.25, (2, 2): 0.25}


@torch.no_grad()
def _route_colour(conv: nn.Conv2d, taps: Dict[Tuple[int, int], float], gain: float = 1.0) -> None:
    """Output channels 0–2 of ``conv`` become ``gain`` × (input channel c through ``taps``), no bias."""
    for c in range(COLOUR):
        conv.weight[c].zero_()
        for (row, column), value in taps.items():
            conv.weight[c, c, row, column] = value * gain
        if conv.bias is not None:
            conv.bias[c] = 0.0


def lowpass_init(model: AutoencoderTiny) -> AutoencoderTiny:
    """Start ``model`` as a low-pass autoencoder (module docstring); returns it."""
    config = model.config
    if not isinstance(model, AutoencoderTiny):
        raise ConfigError(f"model.init=lowpass is for AutoencoderTiny presets, not {type(model).__name__}")
    narrowest = min(*config.encoder_block_out_channels, *config.decoder_block_out_channels, config.latent_channels)
    if config.act_fn != "relu" or config.upsample_fn != "nearest":
        # The path relies on ReLU passing the (non-negative) colour unchanged and on upsampling repeating a cell.
        raise ConfigError(f"model.init=lowpass needs act_fn relu and upsample_fn nearest (this model: {config.act_fn}, "
                          f"{config.upsample_fn}); use model.init=default")
    if config.in_channels != COLOUR or config.out_channels != COLOUR or narrowest < COLOUR:
        raise ConfigError("model.init=lowpass needs RGB in and out and at least 3 channels in every layer and the "
                          f"latent (this model: {config.in_channels} in, {config.out_channels} out, narrowest "
                          f"{narrowest}); use model.init=default")
    encoder, decoder = list(model.encoder.layers), list(model.decoder.layers)
    for block in encoder + decoder:
        if isinstance(block, AutoencoderTinyBlock):
            _route_colour(block.conv[-1], {})  # the residual branch leaves the colour channels alone
    encoder_convs = [m for m in encoder if isinstance(m, nn.Conv2d)]
    _route_colour(encoder_convs[0], CENTRE)
    for downsample in encoder_convs[1:-1]:
        _route_colour(downsample, BLOCK_MEAN)
    _route_colour(encoder_convs[-1], CENTRE, LATENT_GAIN)
    decoder_convs = [m for m in decoder if isinstance(m, nn.Conv2d)]
    _route_colour(decoder_convs[0], CENTRE, 1.0 / LATENT_GAIN)
    for conv in decoder_convs[1:]:
        _route_colour(conv, CENTRE)
    return model
