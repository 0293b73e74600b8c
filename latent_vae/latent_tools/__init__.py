"""Tools for looking into a trained tokenizer's latent space.

- ``interpolation``: linear and spherical paths between the latents of images (``latent-vae interpolate``)
- ``sampling``: decoding samples of the prior or of a Gaussian fitted to encoded latents (``latent-vae sample``)
- ``visualization``: latent channels, PCA-to-RGB and per-channel histograms (``latent-vae visualize``)
- ``scoring``: per-image anomaly scores and threshold calibration (``latent-vae score``)
- ``common``: what they share — devices, inputs as batches, decoding latents, tables of results

Their command-line options live in ``latent_vae.cli`` (``cli/_args.py`` holds the shared ones).

See docs/LATENT_TOOLS.md for the conventions (latent spaces, slerp norms, score definitions).
"""
