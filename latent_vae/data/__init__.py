"""Images in: decoding, sources (folders, datasets), crops and training datasets."""
