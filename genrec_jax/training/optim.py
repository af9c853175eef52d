"""Optimizers shared by the trainers."""

from __future__ import annotations

import optax


def make_optimizer(learning_rate: float, weight_decay: float, warmup_steps: int,
                   grad_clip: float) -> optax.GradientTransformation:
  """AdamW at a constant rate, after a linear warm-up of `warmup_steps` (0 = none), with
  global-norm gradient clipping at `grad_clip` (0 = none)."""
  if warmup_steps < 0 or grad_clip < 0:
    raise ValueError(f"warmup_steps and grad_clip must be >= 0 (0 = off), got {warmup_steps}, "
                     f"{grad_clip}")
  schedule = learning_rate if warmup_steps == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps),
       optax.constant_schedule(learning_rate)], [warmup_steps])
  adamw = optax.adamw(schedule, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip > 0 else adamw
