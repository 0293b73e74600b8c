"""Stock diffusers autoencoders: presets built, models loaded, and what they compute."""
