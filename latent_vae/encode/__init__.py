"""Encoding datasets to latents, decoding them back, latent statistics.

- ``options``: ``EncodeOptions``, everything ``encode_dataset`` can be told, and its checks
- ``preprocess``: resize + centre crop or SDXL buckets, recorded per row; the DataLoader inputs
- ``encoder``: ``LatentEncoder``, images -> latents exactly as stock diffusers computes them
- ``storage``: storage dtypes, the output columns, the shards of a run
- ``identity``: what defines an encode's output; fresh, resumable or complete output directories
- ``run``: ``encode_dataset`` (the output layout, resume and multi-process rules are in its docstring)
- ``decode``: reading an encode output back, decoding it to PNG previews
- ``stats``: latent statistics and the scale fields of a model config

See docs/ENCODING.md.
"""
