"""ETEGRec: item tokenizer and generative recommender trained end to end (issue 10, in progress).

METHODS.md section 6; the paper (../shared/papers/etegrec.txt, eqs. 14-16); a reading of the
official code with file references: experiments/etegrec_toys_cpu/official_code_reading.md.
This module holds the method's alignment losses so far; the alternating training, the configs
and the registry entry follow (the method is not selectable yet).

Sequence-item alignment (SIA, eq. 15): the per-level code distributions of the target item's
CF embedding through the tokenizer, P_z, and of the pooled encoder state through the residual
quantizer, P_zE, are pulled together by a symmetric KL, KL(P_z || P_zE) + KL(P_zE || P_z),
summed over levels (the paper; the official code averages over levels: `level_reduction`).
The distributions are softmax(-||r - e||^2) at each level (the paper's eq. 6); the official code
uses softmax(+||r - e||^2), `logit_sign="code"`. Between levels the quantizer hands on the hard
residual without gradient (`ResidualQuantizer`, as the official code), so only level 1 sends
gradient into the pooled state and the tokenizer's encoder.

Preference-semantic alignment (PSA, eq. 16): symmetric InfoNCE, with cosine similarity at
temperature 0.07, between the tokenizer's reconstruction of the target and the decoder's start
state (both 256-d after the adapters); the two directions are summed, each averaged over the
rows taken part. Negatives are the other rows taken part: the official code keeps the first row
of each distinct target item of the batch (`first_occurrence`), so that an item is never its
own negative.

Which rows take part is the caller's `mask` (bool [B]): real samples, or their first
occurrences per target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genrec_jax.tokenizers.quantizer import ResidualQuantizer

LOGIT_SIGNS = ("distance", "code")
LEVEL_REDUCTIONS = ("sum", "mean")


def first_occurrence(items: jax.Array) -> jax.Array:
  """bool [B]: True at the first row of each distinct item of items int [B] (-1 = filler
  rows, never True). O(B^2) comparisons, fine for batches of a few thousand."""
  same = items[:, None] == items[None, :]
  earlier = jnp.tril(same, k=-1).any(axis=1)
  return ~earlier & (items >= 0)


def level_log_probs(quantizer: ResidualQuantizer, latents: jax.Array,
                    logit_sign: str = "distance") -> jax.Array:
  """Per-level code log-distributions [B, L, K] of latents [B, d] through the residual
  quantizer: log softmax(-||r_l - e||^2) ("distance", the paper) or log softmax(+||r_l - e||^2)
  ("code", the official code's sign)."""
  if logit_sign not in LOGIT_SIGNS:
    raise ValueError(f"etegrec.sia_logit_sign must be one of {LOGIT_SIGNS}, got {logit_sign!r}")
  return quantizer(latents, temperature=1.0 if logit_sign == "distance" else -1.0).log_probs


def sia_loss(target_log_probs: jax.Array, sequence_log_probs: jax.Array, mask: jax.Array,
             level_reduction: str = "sum") -> jax.Array:
  """Symmetric KL between code distributions, averaged over the masked rows.

  target_log_probs, sequence_log_probs: [B, L, K] log-distributions (`level_log_probs` of the
  target's CF embedding through the tokenizer, and of z_E); mask: bool [B]. Per row,
  sum over levels (or mean, `level_reduction="mean"`) of KL(p_t || p_s) + KL(p_s || p_t).
  Gradients reach both sides (neither is a fixed target). Returns a scalar (0 with no rows).
  """
  if level_reduction not in LEVEL_REDUCTIONS:
    raise ValueError(f"etegrec.sia_level_reduction must be one of {LEVEL_REDUCTIONS}, got "
                     f"{level_reduction!r}")
  p_t, p_s = jnp.exp(target_log_probs), jnp.exp(sequence_log_probs)
  difference = target_log_probs - sequence_log_probs
  symmetric = jnp.sum((p_t - p_s) * difference, axis=-1)  # KL(t||s) + KL(s||t), [B, L]
  per_row = symmetric.sum(-1) if level_reduction == "sum" else symmetric.mean(-1)
  weight = mask.astype(per_row.dtype)
  return jnp.sum(per_row * weight) / jnp.maximum(weight.sum(), 1.0)


def psa_loss(reconstruction: jax.Array, preference: jax.Array, mask: jax.Array,
             temperature: float = 0.07) -> jax.Array:
  """Symmetric InfoNCE between reconstructions [B, D] and preferences [B, D] over masked rows.

  Row i's positive is row i of the other side; its negatives are the other masked rows. With
  s = cosine similarity / temperature: -mean_i log softmax_j(s(z_i, h_j))[i] - mean_i log
  softmax_j(s(h_i, z_j))[i], i and j over the masked rows. Returns a scalar (0 with no rows).
  """
  def normalise(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)

  logits = normalise(reconstruction) @ normalise(preference).T / temperature  # [B, B]
  keep = mask[:, None] & mask[None, :]
  logits = jnp.where(keep, logits, -jnp.inf)
  count = jnp.maximum(mask.sum(), 1)

  def direction(scores):
    log_probs = jax.nn.log_softmax(jnp.where(mask[:, None], scores, 0.0), axis=-1)
    return -jnp.sum(jnp.where(mask, jnp.diagonal(log_probs), 0.0)) / count

  return direction(logits) + direction(logits.T)
