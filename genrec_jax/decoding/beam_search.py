"""Batched, jit-compiled beam search over fixed-length identifiers.

The search knows nothing of the model (in the spirit of t5x/decoding.py): the caller supplies
`step_fn(last_tokens, state) -> (next-token log-probabilities, state)`, where `state` is any
pytree whose leaves have the decoder rows on axis 0 (a self-attention key/value cache, or simply
the prefix so far). The search runs the first step on one row per example (every beam holds only
the start token), then repeats the state over the beams and, after each top-k, reorders it by
parent beam. Each step reads the trie arrays (gathers), so the whole search compiles into one
XLA program.

Constrained mode (default, DACT/LETTER protocol) masks every symbol that leaves the trie, so only
valid identifiers come out and the search is exact up to the beam width: with a beam at least as
large as the number of valid prefixes at every depth it scores every identifier exactly.
Unconstrained mode (ETEGRec/UniGRec protocol) keeps the top beams over all symbols; beams that
spell no identifier map to item -1 (a miss).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from genrec_jax.decoding.trie import SparseTrie, Trie

NEG_INF = -1e30


StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def beam_search(step_fn: StepFn, init_state: Any, batch_size: int, trie: Trie | SparseTrie,
                offsets: tuple[int, ...], level_sizes: tuple[int, ...], beam_size: int, *,
                constrained: bool = True, level_softmax: bool = False, start_token: int = 0
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Finds the top `beam_size` identifiers per example.

  Args:
    step_fn: maps the newest decoder token of every row, int32 [R, 1], and the decoding state
      to next-token log-probabilities [R, vocab] and the updated state. R = batch_size at the
      first step (the start token), then batch_size * beam_size (rows grouped by example).
    init_state: the state before the start token; leaves have batch_size rows on axis 0.
    batch_size: number of examples B.
    trie: prefix trie of valid identifiers, dense or sparse (`decoding.trie.search_trie`).
    offsets: token id of symbol 0 at each identifier position (static).
    level_sizes: symbols per position (static).
    beam_size: beams kept per example.
    constrained: restrict beams to trie prefixes.
    level_softmax: renormalise each step's log-probabilities over its position's symbols (a
      model trained with one softmax per identifier position, ETEGRec's per-level tables);
      False scores the symbols by the model's log-probabilities over its whole vocabulary.
    start_token: the decoder's first input token.

  Returns:
    items: int32 [B, beam] item index of each beam in score order (-1 = invalid / empty beam),
    tokens: int32 [B, beam, depth] token ids of each beam,
    scores: float32 [B, beam] sequence log-probabilities (NEG_INF for empty beams).
  """
  depth = len(level_sizes)
  logp, state = step_fn(jnp.full((batch_size, 1), start_token, jnp.int32), init_state)
  logp = jnp.repeat(logp[:, None], beam_size, axis=1)  # [B, beam, vocab]
  state = jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), state)
  scores = jnp.full((batch_size, beam_size), NEG_INF).at[:, 0].set(0.0)
  nodes = jnp.zeros((batch_size, beam_size), jnp.int32)
  tokens = jnp.zeros((batch_size, beam_size, 0), jnp.int32)
  for pos in range(depth):
    if pos > 0:
      logp, state = step_fn(tokens[..., -1].reshape(-1, 1), state)
      logp = logp.reshape(batch_size, beam_size, -1)
    size = level_sizes[pos]
    logp = logp[..., offsets[pos]:offsets[pos] + size]
    if level_softmax:
      logp = jax.nn.log_softmax(logp, axis=-1)
    child = trie.child_rows(nodes, size)  # [B, beam, size]
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
    if pos + 1 < depth:
      rows = (jnp.arange(batch_size)[:, None] * beam_size + parent).reshape(-1)
      state = jax.tree.map(lambda x: x[rows], state)
  items = jnp.where((nodes >= 0) & (scores > NEG_INF / 2),
                    trie.leaf_item[jnp.maximum(nodes, 0)], -1)
  return items, tokens, scores


def distinct_items(items: jax.Array, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One entry per item in a ranking where an item may own several identifiers.

  items int32 [B, N] and scores [B, N] in score order (-1 = no item), as `beam_search`
  returns them. An item keeps its first, best-scoring entry; repeats and -1 entries move to
  the end as (-1, NEG_INF), the order of the kept entries unchanged. With one identifier per
  item the ranking is returned as it is.
  """
  n = items.shape[1]
  earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)  # earlier[j, i]: i comes before j
  repeat = ((items[:, :, None] == items[:, None, :]) & earlier[None]).any(-1) | (items < 0)
  order = jnp.argsort(repeat, axis=1, stable=True)  # kept entries first, in score order
  return (jnp.take_along_axis(jnp.where(repeat, -1, items), order, axis=1),
          jnp.take_along_axis(jnp.where(repeat, NEG_INF, scores), order, axis=1))
