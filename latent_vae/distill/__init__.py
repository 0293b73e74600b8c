"""Distillation of a teacher AutoencoderKL into a stock ``AutoencoderTiny`` (TAESD-style): ``loop.distill()``
runs it on ``train``'s machinery; ``student`` (teacher, student, what a step computes), ``measure``
(quality and speed), ``card`` (the exported model card)."""
