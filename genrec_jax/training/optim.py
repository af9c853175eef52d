"""Optimizers shared by the trainers."""

from __future__ import annotations

import optax


def make_optimizer(learning_rate: float, weight_decay: float, warmup_steps: int,
                   grad_clip: float) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant rate and global-norm gradient clipping."""
  warmup = max(warmup_steps, 1)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup), optax.constant_schedule(learning_rate)],
      [warmup])
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, weight_decay=weight_decay))
