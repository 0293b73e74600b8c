"""Train an autoencoder; launch with `accelerate launch` for any number of GPUs or nodes.

    accelerate launch train_scripts/train_autoencoder.py --config configs/kl-f8.yaml --output-dir runs/kl-f8

Takes exactly the arguments of `latent-vae train` (see `latent-vae train --help`).
"""

import sys

from latent_vae.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
