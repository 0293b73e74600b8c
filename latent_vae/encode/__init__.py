"""Encoding datasets to latents, decoding them back, latent statistics."""
