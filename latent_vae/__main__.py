"""``python -m latent_vae`` (and ``accelerate launch -m latent_vae``) run the CLI."""

import sys

from .cli import main

sys.exit(main())
