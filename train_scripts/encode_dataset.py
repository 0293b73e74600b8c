"""Encode a dataset to latents; launch with `accelerate launch` (or torchrun) for several GPUs.

    accelerate launch train_scripts/encode_dataset.py --model runs/kl-f8/model --data /my/images --output-dir latents/

Takes exactly the arguments of `latent-vae encode` (see `latent-vae encode --help`).
"""

import sys

from latent_vae.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
