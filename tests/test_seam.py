"""Acceptance test of the training core (issue 9): a toy method built only from library pieces.

The toy method's own code (between the markers) is a tokenizer of learnable item vectors with
a soft residual quantizer, a T5 that reads the history as soft identifiers (per-level code
distributions times the level's token rows), two identifiers per item (the target uses the
one the example picks), and a loss. The library supplies everything else: the Trainer with two
parameter groups and alternating freezes, the epoch loop with checkpoints and resume, batching,
the one-to-many identifier table, the trie, beam search and distinct-item ranking.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genrec_jax.data.batching import sample_batches
from genrec_jax.data.splits import SampleSet
from genrec_jax.decoding.beam_search import beam_search, distinct_items
from genrec_jax.decoding.trie import build_trie
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.tokenizers.identifiers import IdentifierTable, assign_dedup
from genrec_jax.tokenizers.quantizer import ResidualQuantizer
from genrec_jax.training.grm import chosen_identifiers
from genrec_jax.training.loop import LoopConfig
from genrec_jax.training.sharding import make_mesh, shard_batch
from genrec_jax.training.trainer import Trainer
from tests.conftest import interrupt_then_resume

NUM_ITEMS, LEVELS, K, DIM = 12, 2, 4, 6

# ---- the toy method's own code -----------------------------------------------------------


class Tokenizer(nnx.Module):
  def __init__(self, rngs):
    self.vectors = nnx.Param(jax.random.normal(rngs.params(), (NUM_ITEMS, DIM)))
    self.quantizer = ResidualQuantizer(LEVELS, K, DIM, rngs=rngs)

  def soft_codes(self, items):
    """Per-level code distributions [..., L, K] of items [...] (soft quantizer, T = 0.5)."""
    out = self.quantizer(self.vectors[...][items.reshape(-1)], soft=True, temperature=0.5)
    return jnp.exp(out.log_probs).reshape(*items.shape, LEVELS, K)


class ToyMethod(nnx.Module):
  def __init__(self, vocab_size, rngs):
    self.tokenizer = Tokenizer(rngs)
    self.recommender = T5(T5Config(vocab_size=vocab_size, d_model=16, d_ff=32, num_heads=2,
                                   d_kv=8, num_encoder_layers=1, num_decoder_layers=1,
                                   dropout_rate=0.0), rngs=rngs)

  def encode(self, history, offsets):
    """Soft identifiers of history [B, H] (-1 = pad): L soft positions per item, encoded."""
    probs = self.tokenizer.soft_codes(jnp.maximum(history, 0))  # [B, H, L, K]
    vectors = jnp.stack([self.recommender.soft_embeddings(probs[:, :, level], offsets[level])
                         for level in range(LEVELS)], axis=2)  # [B, H, L, d_model]
    mask = jnp.repeat(history >= 0, LEVELS, axis=1)
    return self.recommender.encode(None, embeddings=vectors.reshape(*mask.shape, -1), mask=mask)


def toy_loss(model, batch, key, context):
  """Cross-entropy of the identifier each example picks (`choice`) among its item's two."""
  encoded, mask = model.encode(batch["history"], context["offsets"])
  targets = chosen_identifiers(context["token_sets"], context["count"], batch["target"],
                               batch["choice"])  # [B, L + 1]
  logits = model.recommender.decode(encoded, mask, jnp.pad(targets[:, :-1], ((0, 0), (1, 0))))
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)
  return jnp.sum(nll * batch["weight"]) / batch["weight"].sum(), {}


def toy_rank(model, history, trie, table, beam):
  encoded, mask = model.encode(history, tuple(table.offsets.tolist()))
  memory = model.recommender.decoder_memory(encoded)

  def step(last, cache):
    logits, cache = model.recommender.decode_step(memory, mask, last, cache)
    return jax.nn.log_softmax(logits, -1), cache
  items, _, scores = beam_search(step, model.recommender.init_cache(history.shape[0]),
                                 history.shape[0], trie, tuple(table.offsets.tolist()),
                                 table.level_sizes, beam)
  return distinct_items(items, scores)

# ---- end of the toy method ----------------------------------------------------------------


def _table():
  owners = np.repeat(np.arange(NUM_ITEMS), 2).astype(np.int32)  # two identifiers per item
  codes = np.random.default_rng(0).integers(0, K, (len(owners), LEVELS))
  return IdentifierTable(assign_dedup(codes, 2 * NUM_ITEMS).astype(np.int32), owners,
                         (K,) * LEVELS + (2 * NUM_ITEMS,))


def _samples():
  rng = np.random.default_rng(1)
  start = rng.integers(0, NUM_ITEMS, 64)
  chain = (start[:, None] + np.arange(5)[None, :]) % NUM_ITEMS  # item i is followed by i + 1
  history = np.where(np.arange(4)[None, :] >= rng.integers(0, 3, 64)[:, None], chain[:, :4], -1)
  return SampleSet(history=history.astype(np.int32), target=chain[:, 4].astype(np.int32),
                   user=np.arange(64, dtype=np.int32))


def _setup():
  mesh, table = make_mesh(), _table()
  trainer = Trainer(ToyMethod(table.vocab_size, nnx.Rngs(0)), toy_loss,
                    {"tokenizer": optax.adam(1e-2), "recommender": optax.adam(3e-3)}, mesh)
  samples = _samples()

  def epoch_batches(epoch):
    for batch, idx in sample_batches(samples, 16, (2, 4), seed=0, epoch=epoch):
      batch["choice"] = (np.maximum(idx, 0) % 2).astype(np.int32)  # each example's identifier
      yield shard_batch(batch, mesh), int((idx >= 0).sum())

  token_sets, count = table.item_token_sets(NUM_ITEMS)
  context = {"token_sets": jnp.asarray(token_sets), "count": jnp.asarray(count),
             "offsets": jnp.asarray(table.offsets[:LEVELS])}
  return trainer, table, samples, epoch_batches, context


def _fit(trainer, epoch_batches, context, directory, epochs):
  alternate = lambda epoch: ("tokenizer",) if epoch % 2 == 0 else ("recommender",)
  return trainer.fit(name="toy", epoch_batches=epoch_batches, evaluate=lambda p: {"ndcg@10": 0.0},
                     loop_cfg=LoopConfig(epochs=epochs, eval_every=epochs), params=None,
                     checkpoint_dir=directory, context=context, trainable=alternate)[0]


def _leaves(params, group):
  return [np.asarray(x) for x in jax.tree.leaves(params[group])]


def test_toy_method_trains_alternating_groups_resumes_and_ranks(tmp_path, monkeypatch):
  trainer, table, samples, epoch_batches, context = _setup()
  start = trainer.init_params
  first = _fit(trainer, epoch_batches, context, str(tmp_path / "one"), 1)
  # Epoch 0 trains the tokenizer through the soft identifiers; the recommender stays frozen.
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(first, "recommender"),
                                                  _leaves(start, "recommender")))
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(first, "tokenizer"),
                                                      _leaves(start, "tokenizer")))

  straight = _fit(trainer, epoch_batches, context, str(tmp_path / "straight"), 4)
  resumed = interrupt_then_resume(
      monkeypatch, lambda: _fit(trainer, epoch_batches, context, str(tmp_path / "resumed"), 4),
      "toy", epoch=1)
  for group in trainer.groups:
    for a, b in zip(_leaves(resumed, group), _leaves(straight, group)):
      np.testing.assert_array_equal(a, b)

  trie = jax.tree.map(jnp.asarray, build_trie(table))
  items, _ = jax.jit(lambda p, h: toy_rank(trainer.merge(p), h, trie, table, beam=24))(
      straight, jnp.asarray(samples.history[:8]))
  for row in np.asarray(items):  # every item once, though each owns two identifiers
    assert sorted(row[row >= 0].tolist()) == list(range(NUM_ITEMS))
    assert (row[NUM_ITEMS:] == -1).all()
