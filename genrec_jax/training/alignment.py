"""Losses that align a generative recommender with its item tokenizer or a collaborative
teacher, shared by the methods that train them together (ETEGRec's SIA and PSA, UniGRec's
token- and representation-level distillation).

Both methods compare code distributions through the tokenizer's residual quantizer
(`level_log_probs` + `symmetric_kl`) and pull two views of the batch's target items together
with a symmetric InfoNCE (`symmetric_info_nce`), each over the first row of every distinct
target of the batch (`first_occurrence`), so that an item is never its own negative.
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


def masked_mean(states: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the real positions: states [B, T, d], mask bool [B, T] -> [B, d]."""
  weight = mask.astype(states.dtype)[..., None]
  return jnp.sum(states * weight, axis=1) / jnp.maximum(weight.sum(axis=1), 1.0)


def level_log_probs(quantizer: ResidualQuantizer, latents: jax.Array,
                    logit_sign: str = "distance") -> jax.Array:
  """Per-level code log-distributions [B, L, K] of latents [B, d] through the residual
  quantizer (hard residuals between levels): log softmax(-||r_l - e||^2) ("distance", the
  papers' form) or log softmax(+||r_l - e||^2) ("code", the sign of the ETEGRec and UniGRec
  official code)."""
  if logit_sign not in LOGIT_SIGNS:
    raise ValueError(f"logit_sign must be one of {LOGIT_SIGNS}, got {logit_sign!r}")
  return quantizer(latents, temperature=1.0 if logit_sign == "distance" else -1.0).log_probs


def symmetric_kl(log_p: jax.Array, log_q: jax.Array, mask: jax.Array,
                 level_reduction: str = "sum") -> jax.Array:
  """Symmetric KL between code distributions, averaged over the masked rows.

  log_p, log_q: [B, L, K] log-distributions (`level_log_probs`); mask: bool [B]. Per row,
  the sum over levels (or mean, `level_reduction="mean"`) of KL(p || q) + KL(q || p).
  Gradients reach both sides (neither is a fixed target). Returns a scalar (0 with no rows).
  """
  if level_reduction not in LEVEL_REDUCTIONS:
    raise ValueError(f"level_reduction must be one of {LEVEL_REDUCTIONS}, got "
                     f"{level_reduction!r}")
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  symmetric = jnp.sum((p - q) * (log_p - log_q), axis=-1)  # KL(p||q) + KL(q||p), [B, L]
  per_row = symmetric.sum(-1) if level_reduction == "sum" else symmetric.mean(-1)
  weight = mask.astype(per_row.dtype)
  return jnp.sum(per_row * weight) / jnp.maximum(weight.sum(), 1.0)


def symmetric_info_nce(a: jax.Array, b: jax.Array, mask: jax.Array,
                       temperature: float = 0.07) -> jax.Array:
  """Symmetric InfoNCE between rows a [B, D] and b [B, D] over the masked rows.

  Row i's positive is row i of the other side; its negatives are the other masked rows. With
  s = cosine similarity / temperature: -mean_i log softmax_j(s(a_i, b_j))[i] - mean_i log
  softmax_j(s(b_i, a_j))[i], i and j over the masked rows (the two directions summed, as both
  official codes). Returns a scalar (0 with no rows).
  """
  def normalise(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)

  logits = normalise(a) @ normalise(b).T / temperature  # [B, B]
  keep = mask[:, None] & mask[None, :]
  logits = jnp.where(keep, logits, -jnp.inf)
  count = jnp.maximum(mask.sum(), 1)

  def direction(scores):
    log_probs = jax.nn.log_softmax(jnp.where(mask[:, None], scores, 0.0), axis=-1)
    return -jnp.sum(jnp.where(mask, jnp.diagonal(log_probs), 0.0)) / count

  return direction(logits) + direction(logits.T)
