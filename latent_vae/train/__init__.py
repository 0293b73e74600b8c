"""Training: the trainable module, state, step, guard, loop and run I/O."""
