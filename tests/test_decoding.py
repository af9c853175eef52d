"""Beam search against brute-force scoring of every identifier in the catalog."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax.decoding.beam_search import NEG_INF, beam_search, distinct_items
from genrec_jax.decoding.trie import build_trie, trie_capacity
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.tokenizers.identifiers import IdentifierTable, assign_dedup, one_to_one_table
from genrec_jax.training.grm import chosen_identifiers


def _table(num_items=40, k=4, levels=2, seed=0):
  codes = np.random.default_rng(seed).integers(0, k, (num_items, levels))
  return one_to_one_table(assign_dedup(codes, dedup_size=num_items), k, num_items)


def _model(table, seed=0):
  cfg = T5Config(vocab_size=table.vocab_size, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                 num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0)
  return T5(cfg, rngs=nnx.Rngs(seed))


# The model functions under test are compiled as one program each: run eagerly, every
# primitive of the model would compile on its own (a few seconds per new table shape).
@nnx.jit
def _teacher_forced_logp(model, inputs, targets):
  """log P(identifier | input) for every identifier `targets` [M, L] by teacher forcing:
  [B, M]."""
  b, m = inputs.shape[0], targets.shape[0]
  enc, mask = model.encode(inputs)
  enc = jnp.repeat(enc, m, axis=0)
  mask = jnp.repeat(mask, m, axis=0)
  tgt = jnp.tile(targets, (b, 1))
  logits = model.decode(enc, mask, jnp.pad(tgt[:, :-1], ((0, 0), (1, 0))))
  logp = jax.nn.log_softmax(logits, -1)
  return jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0].sum(-1).reshape(b, m)


def _brute_force_scores(model, inputs, table):
  """log P(identifier | input) for every identifier of `table`: [B, M]."""
  return _teacher_forced_logp(model, inputs, jnp.asarray(table.tokens()))


@functools.partial(nnx.jit, static_argnames=("offsets", "level_sizes", "beam", "constrained",
                                             "cached", "level_softmax"))
def _compiled_search(model, inputs, trie, *, offsets, level_sizes, beam, constrained, cached,
                     level_softmax):
  enc, mask = model.encode(inputs)
  memory = model.decoder_memory(enc)
  b = inputs.shape[0]

  def cached_step(last, cache):
    logits, cache = model.decode_step(memory, mask, last, cache)
    return jax.nn.log_softmax(logits, -1), cache

  def prefix_step(last, prefix):
    prefix = jnp.concatenate([prefix, last], axis=1)
    return jax.nn.log_softmax(model.decode(memory, mask, prefix)[:, -1], -1), prefix

  step, state = ((cached_step, model.init_cache(b)) if cached else
                 (prefix_step, jnp.zeros((b, 0), jnp.int32)))
  return beam_search(step, state, b, trie, offsets, level_sizes, beam,
                     constrained=constrained, level_softmax=level_softmax)


def _search(model, inputs, table, beam, constrained=True, cached=True, trie=None,
            level_softmax=False):
  """Beam search driven by the model's K/V cache, or (cached=False) by re-running the decoder
  on the whole prefix, carried as the search state."""
  trie = jax.tree.map(jnp.asarray, trie or build_trie(table))
  return _compiled_search(model, inputs, trie, offsets=tuple(table.offsets.tolist()),
                          level_sizes=tuple(table.level_sizes), beam=beam,
                          constrained=constrained, cached=cached, level_softmax=level_softmax)


def test_beam_as_large_as_catalog_equals_exhaustive_scoring():
  table = _table()
  model = _model(table)
  inputs = jnp.asarray(np.random.default_rng(1).integers(1, table.vocab_size, (3, 9)))
  inputs = inputs.at[:, :3].set(0)  # left padding
  beam = table.codes.shape[0]
  items, tokens, scores = _search(model, inputs, table, beam)
  brute = np.asarray(_brute_force_scores(model, inputs, table))
  for b in range(3):
    order = np.argsort(-brute[b], kind="stable")
    np.testing.assert_allclose(np.asarray(scores[b]), brute[b][order], rtol=1e-4, atol=1e-4)
    assert sorted(np.asarray(items[b]).tolist()) == list(range(beam))
    np.testing.assert_allclose(brute[b][np.asarray(items[b])], np.asarray(scores[b]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(tokens[b]), table.tokens()[np.asarray(items[b])])


def test_cached_search_equals_search_that_reruns_the_prefix():
  table = _table(num_items=200, k=6, levels=3, seed=7)
  model = _model(table, seed=5)
  inputs = jnp.asarray(np.random.default_rng(4).integers(1, table.vocab_size, (5, 8)))
  for constrained in (True, False):
    fast = _search(model, inputs, table, beam=7, constrained=constrained)
    slow = _search(model, inputs, table, beam=7, constrained=constrained, cached=False)
    np.testing.assert_array_equal(np.asarray(fast[0]), np.asarray(slow[0]))
    np.testing.assert_array_equal(np.asarray(fast[1]), np.asarray(slow[1]))
    np.testing.assert_allclose(np.asarray(fast[2]), np.asarray(slow[2]), rtol=1e-5, atol=1e-5)


def test_small_beam_returns_only_valid_items_in_score_order():
  table = _table(num_items=60, k=8, levels=2, seed=3)
  model = _model(table, seed=2)
  inputs = jnp.asarray(np.random.default_rng(2).integers(1, table.vocab_size, (4, 6)))
  items, tokens, scores = _search(model, inputs, table, beam=5)
  items, scores = np.asarray(items), np.asarray(scores)
  assert (items >= 0).all() and (items < 60).all()
  assert (np.diff(scores, axis=1) <= 1e-6).all()
  brute = np.asarray(_brute_force_scores(model, inputs, table))
  np.testing.assert_allclose(np.take_along_axis(brute, items, 1), scores, rtol=1e-4, atol=1e-4)
  for b in range(4):
    assert len(set(items[b].tolist())) == 5


def test_unconstrained_mode_can_leave_the_catalog_and_marks_misses():
  # A catalog with a single identifier: unconstrained beams mostly spell nothing valid.
  table = one_to_one_table(np.array([[1, 2, 0]]), 4, 2)
  model = _model(table)
  inputs = jnp.ones((2, 4), jnp.int32)
  items, tokens, scores = _search(model, inputs, table, beam=6, constrained=False)
  items = np.asarray(items)
  assert (items == -1).sum() >= 2 * 5
  assert set(items[items >= 0].tolist()) <= {0}
  items_c, _, scores_c = _search(model, inputs, table, beam=6, constrained=True)
  assert (np.asarray(items_c)[:, 0] == 0).all() and (np.asarray(items_c)[:, 1:] == -1).all()


def test_trie_accepts_exactly_the_table():
  table = _table(num_items=30, k=3, levels=3, seed=5)
  trie = build_trie(table)
  valid = {tuple(r) for r in table.codes.tolist()}
  for ident in itertools.product(*(range(s) for s in table.level_sizes)):
    node = 0
    for s in ident:
      node = trie.children[node, s] if node >= 0 else -1
    if tuple(ident) in valid:
      assert trie.leaf_item[node] == table.item[table.codes.tolist().index(list(ident))]
    else:
      assert node < 0 or trie.leaf_item[node] < 0


def test_padded_trie_searches_the_same_and_capacity_bounds_every_table():
  table = _table(num_items=60, k=8, levels=2, seed=3)
  capacity = trie_capacity(table.level_sizes, 60)
  assert build_trie(table).children.shape[0] <= capacity
  padded = build_trie(table, capacity)
  assert padded.children.shape[0] == capacity
  assert (padded.children[len(build_trie(table).children):] == -1).all()
  model = _model(table, seed=2)
  inputs = jnp.asarray(np.random.default_rng(2).integers(1, table.vocab_size, (4, 6)))
  plain = _search(model, inputs, table, beam=5)
  np.testing.assert_array_equal(np.asarray(_search(model, inputs, table, beam=5,
                                                   trie=padded)[0]), np.asarray(plain[0]))
  # Worst case: every identifier in its own branch at every depth.
  codes = np.stack([np.arange(9), np.arange(9), np.zeros(9, int)], 1)
  spread = one_to_one_table(codes, 9, 1)
  assert len(build_trie(spread).children) == trie_capacity(spread.level_sizes, 9) == 1 + 9 * 3
  with pytest.raises(ValueError, match="needs 28 nodes"):
    build_trie(spread, 20)


def test_one_to_many_table_maps_identifiers_to_items():
  codes = np.array([[0, 1, 0], [1, 1, 0], [0, 2, 0]])
  table = IdentifierTable(codes, np.array([7, 7, 3], np.int32), (3, 3, 1))
  trie = build_trie(table)
  node = 0
  for s in (1, 1, 0):
    node = trie.children[node, s]
  assert trie.leaf_item[node] == 7


def test_distinct_items_keeps_each_items_first_entry_in_order():
  rng = np.random.default_rng(0)
  items = rng.integers(-1, 6, (50, 12)).astype(np.int32)
  scores = -np.sort(rng.random((50, 12)), axis=1).astype(np.float32)
  got_items, got_scores = (np.asarray(a) for a in distinct_items(jnp.asarray(items),
                                                                  jnp.asarray(scores)))
  for row in range(50):  # reference: a Python scan with a set of seen items
    seen, want_items, want_scores = set(), [], []
    for item, score in zip(items[row], scores[row]):
      if item >= 0 and item not in seen:
        seen.add(item)
        want_items.append(item)
        want_scores.append(score)
    pad = 12 - len(want_items)
    np.testing.assert_array_equal(got_items[row], want_items + [-1] * pad)
    np.testing.assert_array_equal(got_scores[row], np.array(want_scores + [NEG_INF] * pad,
                                                            np.float32))


def test_one_to_many_ranking_lists_each_item_once_at_its_best_identifier():
  """Items own one to three identifiers; a full-width search followed by `distinct_items`
  ranks every item once, by its best identifier's exact log-probability (brute force)."""
  rng = np.random.default_rng(3)
  owners = np.concatenate([np.arange(12), rng.integers(0, 12, 10)]).astype(np.int32)
  codes = assign_dedup(rng.integers(0, 3, (len(owners), 2)), dedup_size=len(owners))
  table = IdentifierTable(codes.astype(np.int32), owners, (3, 3, len(owners)))
  model = _model(table, seed=2)
  inputs = jnp.asarray(rng.integers(1, table.vocab_size, (2, 6)))
  items, _, scores = _search(model, inputs, table, beam=len(owners))
  items, scores = (np.asarray(a) for a in distinct_items(items, scores))
  brute = np.asarray(_brute_force_scores(model, inputs, table))  # [B, identifiers]
  for b in range(2):
    best = np.full(12, -np.inf)
    np.maximum.at(best, owners, brute[b])
    order = np.argsort(-best, kind="stable")
    np.testing.assert_array_equal(items[b, :12], order)
    np.testing.assert_allclose(scores[b, :12], best[order], rtol=1e-4, atol=1e-4)
    assert (items[b, 12:] == -1).all()


def test_item_token_sets_list_every_identifier_of_an_item():
  codes = np.array([[0, 1, 0], [1, 1, 0], [0, 2, 0], [2, 0, 0]])
  table = IdentifierTable(codes, np.array([4, 1, 4, 4], np.int32), (3, 3, 1))
  tokens, count = table.item_token_sets(6)
  np.testing.assert_array_equal(count, [0, 1, 0, 0, 3, 0])
  assert tokens.shape == (6, 3, 3)
  np.testing.assert_array_equal(tokens[4], table.tokens()[[0, 2, 3]])
  np.testing.assert_array_equal(tokens[1, 0], table.tokens()[1])
  assert not tokens[1, 1:].any() and not tokens[[0, 2, 3, 5]].any()
  np.testing.assert_array_equal(table.item_token_sets(6)[0][:, 0], table.item_tokens(6))


def test_chosen_identifiers_pick_each_examples_identifier_modulo_its_items_count():
  codes = np.array([[0, 1, 0], [1, 1, 0], [0, 2, 0], [2, 0, 0]])
  table = IdentifierTable(codes, np.array([4, 1, 4, 4], np.int32), (3, 3, 1))
  token_sets, count = table.item_token_sets(6)
  items = np.array([[4, 4, 4, 4], [1, 1, -1, 4]])
  choice = np.array([[0, 1, 2, 3], [0, 5, 1, 7]])
  got = np.asarray(chosen_identifiers(jnp.asarray(token_sets), jnp.asarray(count),
                                      jnp.asarray(items), jnp.asarray(choice)))
  rows_of = {4: [0, 2, 3], 1: [1]}  # the table rows each item owns, in table order
  for b, r in itertools.product(range(2), range(4)):
    item = items[b, r]
    want = (np.zeros(3) if item < 0 else
            table.tokens()[rows_of[item][choice[b, r] % len(rows_of[item])]])
    np.testing.assert_array_equal(got[b, r], want)


def test_level_softmax_search_scores_each_position_over_its_own_tokens():
  """With `level_softmax` an identifier's score is the sum over positions of the log-softmax of
  the decoder's logits restricted to that position's tokens (per-level tables), computed here
  by teacher forcing in NumPy; a beam as large as the catalog returns every item at that
  score."""
  table = _table()
  model = _model(table)
  inputs = jnp.asarray(np.random.default_rng(2).integers(1, table.vocab_size, (2, 9)))
  beam = table.codes.shape[0]
  items, _, scores = _search(model, inputs, table, beam, level_softmax=True)
  targets = table.tokens()
  teacher_forced = nnx.jit(lambda m, enc, mask, prefix: m.decode(enc, mask, prefix))
  enc, mask = nnx.jit(lambda m, x: m.encode(x))(model, inputs)
  for b in range(2):
    logits = np.asarray(teacher_forced(model, jnp.repeat(enc[b:b + 1], beam, 0),
                                       jnp.repeat(mask[b:b + 1], beam, 0),
                                       jnp.pad(jnp.asarray(targets[:, :-1]), ((0, 0), (1, 0)))))
    expected = np.zeros(beam)
    for pos, (offset, size) in enumerate(zip(table.offsets, table.level_sizes)):
      block = logits[:, pos, offset:offset + size].astype(np.float64)
      block = block - block.max(-1, keepdims=True)
      logp = block - np.log(np.exp(block).sum(-1, keepdims=True))
      expected += logp[np.arange(beam), targets[:, pos] - offset]
    np.testing.assert_allclose(np.asarray(scores[b]), np.sort(expected)[::-1], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(expected[np.asarray(items[b])], np.asarray(scores[b]),
                               rtol=1e-4, atol=1e-4)


def test_sparse_trie_has_the_dense_rows_and_the_same_beams():
  """Random tables with collisions (the dedup digit separates them) and padding: the sparse
  layout expands every node (and -1) to the dense row, and the searches agree exactly."""
  from genrec_jax.decoding.trie import DENSE_TRIE_LIMIT_BYTES, build_sparse_trie, search_trie
  for seed, (num_items, k, levels) in enumerate([(60, 4, 2), (200, 5, 3), (35, 3, 3)]):
    table = _table(num_items=num_items, k=k, levels=levels, seed=seed)
    capacity = trie_capacity(table.level_sizes, num_items + 7)
    dense, sparse = build_trie(table, capacity), build_sparse_trie(table, capacity)
    nodes = jnp.arange(-1, capacity)
    for size in sorted(set(table.level_sizes)):
      np.testing.assert_array_equal(sparse.child_rows(nodes, size),
                                    dense.child_rows(nodes, size))
    np.testing.assert_array_equal(sparse.leaf_item, dense.leaf_item)
    model = _model(table, seed=seed)
    inputs = jnp.asarray(np.random.default_rng(seed).integers(1, table.vocab_size, (3, 5)))
    for constrained in (True, False):
      want = _search(model, inputs, table, beam=7, constrained=constrained, trie=dense)
      got = _search(model, inputs, table, beam=7, constrained=constrained, trie=sparse)
      for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert isinstance(search_trie(table), type(dense))  # small: dense
  big = 1 + DENSE_TRIE_LIMIT_BYTES // (4 * max(table.level_sizes))
  assert isinstance(search_trie(table, big), type(sparse))
  with pytest.raises(ValueError, match="trie kind"):
    search_trie(table, kind="csr")
