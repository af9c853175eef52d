"""Batched, jit-compiled beam search over fixed-length identifiers.

The decoder knows nothing of the model (in the spirit of t5x/decoding.py): the caller supplies
`log_probs_fn(prefix) -> log-probabilities of the next token`. Each step reads the trie arrays
(gathers), so the whole search compiles into one XLA program.

Constrained mode (default, DACT/LETTER protocol) masks every symbol that leaves the trie, so only
valid identifiers come out and the search is exact up to the beam width: with a beam at least as
large as the number of valid prefixes at every depth it scores every identifier exactly.
Unconstrained mode (ETEGRec/UniGRec protocol) keeps the top beams over all symbols; beams that
spell no identifier map to item -1 (a miss).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from genrec_jax.decoding.trie import Trie

NEG_INF = -1e30


def beam_search(log_probs_fn: Callable[[jax.Array], jax.Array], batch_size: int,
                trie: Trie, offsets: tuple[int, ...], level_sizes: tuple[int, ...],
                beam_size: int, *, constrained: bool = True
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Finds the top `beam_size` identifiers per example.

  Args:
    log_probs_fn: maps decoder prefixes int32 [batch_size * beam_size, s] (s = 1..depth, the
      first column the start token 0, rows grouped by example) to next-token log-probabilities
      [batch_size * beam_size, vocab].
    batch_size: number of examples B.
    trie: dense trie of valid identifiers.
    offsets: token id of symbol 0 at each identifier position (static).
    level_sizes: symbols per position (static).
    beam_size: beams kept per example.
    constrained: restrict beams to trie prefixes.

  Returns:
    items: int32 [B, beam] item index of each beam in score order (-1 = invalid / empty beam),
    tokens: int32 [B, beam, depth] token ids of each beam,
    scores: float32 [B, beam] sequence log-probabilities (NEG_INF for empty beams).
  """
  depth = len(level_sizes)
  scores = jnp.full((batch_size, beam_size), NEG_INF).at[:, 0].set(0.0)
  nodes = jnp.zeros((batch_size, beam_size), jnp.int32)
  tokens = jnp.zeros((batch_size, beam_size, 0), jnp.int32)
  for pos in range(depth):
    prefix = jnp.concatenate(
        [jnp.zeros((batch_size, beam_size, 1), jnp.int32), tokens], axis=-1)
    logp = log_probs_fn(prefix.reshape(batch_size * beam_size, pos + 1))
    size = level_sizes[pos]
    logp = logp[:, offsets[pos]:offsets[pos] + size].reshape(batch_size, beam_size, size)
    child = trie.children[jnp.maximum(nodes, 0)][..., :size]  # [B, beam, size]
    child = jnp.where(nodes[..., None] >= 0, child, -1)
    candidate = scores[..., None] + logp
    if constrained:
      candidate = jnp.where(child >= 0, candidate, NEG_INF)
    candidate = jnp.where(scores[..., None] <= NEG_INF / 2, NEG_INF, candidate)
    scores, flat = jax.lax.top_k(candidate.reshape(batch_size, -1), beam_size)
    parent, symbol = flat // size, flat % size
    nodes = jnp.take_along_axis(child.reshape(batch_size, -1), flat, axis=1)
    tokens = jnp.concatenate([
        jnp.take_along_axis(tokens, parent[..., None], axis=1),
        (symbol + offsets[pos])[..., None].astype(jnp.int32)], axis=-1)
  items = jnp.where((nodes >= 0) & (scores > NEG_INF / 2),
                    trie.leaf_item[jnp.maximum(nodes, 0)], -1)
  return items, tokens, scores
