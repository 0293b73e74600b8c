"""latent_vae: train KL and VQ image tokenizers for latent diffusion, shipped as stock diffusers models."""

__version__ = "0.1.0"
