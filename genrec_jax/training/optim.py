"""Optimizers shared by the trainers."""

from __future__ import annotations

import optax


def make_optimizer(learning_rate: float, weight_decay: float, warmup_steps: int,
                   grad_clip: float, decay_steps: int = 0) -> optax.GradientTransformation:
  """AdamW after a linear warm-up of `warmup_steps` (0 = none), then at a constant rate
  (`decay_steps` = 0) or along a cosine decay to 0 over `decay_steps` updates (ETEGRec), with
  global-norm gradient clipping at `grad_clip` (0 = none). Steps count this optimizer's own
  updates (a group frozen for an epoch does not advance its schedule)."""
  if warmup_steps < 0 or grad_clip < 0 or decay_steps < 0:
    raise ValueError(f"warmup_steps, grad_clip and decay_steps must be >= 0 (0 = off), got "
                     f"{warmup_steps}, {grad_clip}, {decay_steps}")
  schedule = (learning_rate if decay_steps == 0
              else optax.cosine_decay_schedule(learning_rate, decay_steps))
  if warmup_steps > 0:
    after = optax.constant_schedule(schedule) if decay_steps == 0 else schedule
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps])
  adamw = optax.adamw(schedule, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip > 0 else adamw
