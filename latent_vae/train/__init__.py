"""Training: ``loop.train()`` runs it; ``state`` (what is trained and checkpointed), ``step`` (one
G + D update), ``guard`` (the processes' skip/stop verdict), ``run_io`` (checkpoints, validation,
previews, export), ``monitor`` (logs and metrics), ``trainable``, ``checkpoint`` (the files), ``ema``."""
