"""Training: ``loop.train()`` runs it; ``state`` (what is trained and checkpointed), ``step`` (one
G + D update), ``guard`` (the processes' skip/stop verdict), ``run_io`` (run folder, checkpoints,
training loader, export), ``validation`` (validation metrics, previews, grids), ``monitor`` (logs and
metrics), ``trainable``, ``checkpoint`` (the files), ``ema``."""
