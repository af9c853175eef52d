"""Training and evaluation of the generative recommender (T5 over identifier tokens).

A sample is (history of items, next item). Items become identifier tokens through an
`IdentifierTable`; the encoder reads the flattened history tokens (left-padded), the decoder
predicts the target's L + 1 tokens after the start token 0 (cross-entropy, METHODS.md section 3).
Ranking is jit-compiled trie-constrained beam search (`genrec_jax.decoding`).

Training runs through the shared `Trainer` (one jitted, donated step; parameters replicated
and batches sharded over the mesh's `data` axis), one batch per call or, with
`steps_per_dispatch` K > 1, K batches of one length bucket per call (`Trainer.train_steps`).
Batches carry item indices; the identifier map is an input of the compiled steps
(`identifier_inputs`), looked up on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from genrec_jax.data.batching import sample_batches
from genrec_jax.data.splits import SampleSet
from genrec_jax.decoding.beam_search import beam_search, distinct_items
from genrec_jax.decoding.trie import SparseTrie, Trie, search_trie, trie_capacity
from genrec_jax.evaluation.metrics import metrics_from_ranks, target_ranks
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.tokenizers.identifiers import IdentifierTable
from genrec_jax.training import loop
from genrec_jax.training.optim import make_optimizer
from genrec_jax.training.sharding import (check_batch_size, replicate, shard_batch,
                                          sharded_training_batches)
from genrec_jax.training.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class GRMTrainConfig:
  """Optimisation and decoding settings of the generative recommender."""

  learning_rate: float = 1e-4
  weight_decay: float = 0.01
  warmup_steps: int = 0
  decay_steps: int = 0  # > 0: cosine decay to 0 over this many updates after the warm-up
  grad_clip: float = 0.0
  loss_reduction: str = "mean"
  batch_grouping: str = "length"
  batch_size: int = 256
  steps_per_dispatch: int = 1  # updates per compiled call (`data.batching.sample_dispatches`)
  eval_batch_size: int = 256
  beam_size: int = 20
  constrained: bool = True
  level_softmax: tuple[int, ...] = ()  # the identifier's level sizes: one softmax per
  #   position over its own tokens (ETEGRec's per-position tables), in training and decoding;
  #   () = one softmax over the whole vocabulary (TIGER)
  length_buckets: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 13, 16, 20)
  loop: loop.LoopConfig = loop.LoopConfig(epochs=200, patience=15)


def optimizer(cfg: GRMTrainConfig) -> optax.GradientTransformation:
  """The recommender's optimizer (`make_optimizer` with cfg's settings)."""
  return make_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip,
                        cfg.decay_steps)


def identifier_inputs(history: jax.Array, item_tokens: jax.Array) -> jax.Array:
  """Encoder tokens int32 [B, slots * D] of item histories int [B, slots] (-1 = padding, token
  0) through the identifier map item_tokens int32 [num_items, D]; runs inside the step."""
  tokens = jnp.where(history[..., None] >= 0, item_tokens[jnp.maximum(history, 0)], 0)
  return tokens.reshape(history.shape[0], -1)


def soft_identifier_inputs(model: T5, probs: jax.Array, history: jax.Array,
                           offsets: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Encoder input vectors of soft identifiers (UniGRec): probs [B, H, L, K] are the L code
  distributions of each history item (history int [B, H], -1 = padding); item h becomes L
  positions, level l's vector probs[b, h, l] @ the K token rows from offsets[l]
  (`T5.soft_embeddings`; a one-hot distribution gives exactly that token's embedding).
  Returns (vectors [B, H * L, d_model], zero at padding, and mask bool [B, H * L])."""
  b, h, levels, _ = probs.shape
  vectors = jnp.stack([model.soft_embeddings(probs[:, :, level], offsets[level])
                       for level in range(levels)], axis=2)  # [B, H, L, d_model]
  mask = jnp.repeat(history >= 0, levels, axis=1)
  return vectors.reshape(b, h * levels, -1) * mask[..., None], mask


def chosen_identifiers(token_sets: jax.Array, count: jax.Array, items: jax.Array,
                       choice: jax.Array) -> jax.Array:
  """Tokens int32 [..., D] of the identifier each example picks for its item, for items that
  own several identifiers (one-to-many tables; PIT picks one per training example).

  token_sets int32 [num_items, m, D] and count int32 [num_items] are
  `IdentifierTable.item_token_sets`; items int [...] (-1 = padding: tokens 0); choice int [...]
  >= 0, taken modulo the item's count (so a uniform random integer picks uniformly among the
  item's identifiers). Runs inside the step.
  """
  safe = jnp.maximum(items, 0)
  tokens = token_sets[safe, choice % jnp.maximum(count[safe], 1)]
  return jnp.where(items[..., None] >= 0, tokens, 0)


LOSS_REDUCTIONS = ("mean", "sum")


def target_tokens(target: jax.Array, item_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Teacher forcing of target items int [B] (-1 = filler row: tokens 0) through the
  identifier map int32 [num_items, D]: (target tokens [B, D], decoder inputs [B, D], the start
  token 0 then the first D - 1 target tokens)."""
  targets = jnp.where(target[:, None] >= 0, item_tokens[jnp.maximum(target, 0)], 0)
  return targets, jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))


def level_logits(logits: jax.Array, level_sizes: tuple[int, ...]) -> jax.Array:
  """Logits [..., D, V] of the D identifier positions with every token outside position j's
  own range (`IdentifierTable.offsets`) set to -1e30, so that a softmax over them is one per
  level: position j's decoder state against table j alone (ETEGRec)."""
  sizes = np.asarray(level_sizes)
  offsets = 1 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
  vocab = np.arange(logits.shape[-1])
  inside = (vocab[None, :] >= offsets[:, None]) & (vocab[None, :] < (offsets + sizes)[:, None])
  return jnp.where(inside, logits, -1e30)


def identifier_nll(logits: jax.Array, targets: jax.Array, reduction: str = "mean",
                   level_sizes: tuple[int, ...] = ()) -> jax.Array:
  """Per-sample cross-entropy [B] of target tokens [B, D] under logits [B, D, V], averaged
  ("mean": the reference code's token-level CE) or summed ("sum") over the D tokens; with
  `level_sizes`, one softmax per position over its own tokens (`level_logits`)."""
  if reduction not in LOSS_REDUCTIONS:
    raise ValueError(f"grm.loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
  if level_sizes:
    logits = level_logits(logits, level_sizes)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return nll.mean(-1) if reduction == "mean" else nll.sum(-1)


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
  """sum(values * weight) / sum(weight) over rows (0 for no weight): the batch mean over real
  samples, filler rows having weight 0."""
  return jnp.sum(values * weight) / jnp.maximum(weight.sum(), 1.0)


def grm_loss(model: T5, batch: dict, key: jax.Array | None, context: dict,
             reduction: str = "mean", level_sizes: tuple[int, ...] = ()
             ) -> tuple[jax.Array, dict]:
  """Cross-entropy of the target's D tokens (`identifier_nll`), averaged over real samples.

  batch: `history` int32 [B, slots] (-1 = padding), `target` int32 [B] item indices (-1 =
  filler row), `weight` float [B] (0 = filler row); context: `item_tokens` int32
  [num_items, D], the identifier map. Returns (loss, {}).
  """
  item_tokens = context["item_tokens"]
  targets, decoder_inputs = target_tokens(batch["target"], item_tokens)
  logits = model(identifier_inputs(batch["history"], item_tokens), decoder_inputs, key)
  nll = identifier_nll(logits, targets, reduction, level_sizes)
  return weighted_mean(nll, batch["weight"]), {}


def beam_rank(model: T5, encoded: jax.Array, mask: jax.Array, trie: Trie | SparseTrie, *,
              offsets, level_sizes, beam_size, constrained, level_softmax
              ) -> tuple[jax.Array, jax.Array]:
  """Beam search of the T5 decoder over encoder states [B, T, d_model] (mask bool [B, T]),
  whatever the encoder read (identifier tokens, soft identifiers): (items int32 [B, beam],
  scores [B, beam]), each item at most once (`distinct_items`). Traced inside a caller's jit."""
  memory = model.decoder_memory(encoded)  # once per user, shared by beams and steps

  def step_fn(last_tokens, cache):
    logits, cache = model.decode_step(memory, mask, last_tokens, cache)
    return jax.nn.log_softmax(logits, axis=-1), cache

  items, _, scores = beam_search(step_fn, model.init_cache(encoded.shape[0]), encoded.shape[0],
                                 trie, offsets, level_sizes, beam_size,
                                 constrained=constrained, level_softmax=level_softmax)
  return distinct_items(items, scores)  # an item with several identifiers counts once


def ranking_options(table: IdentifierTable, cfg: GRMTrainConfig, beam_size: int | None = None,
                    constrained: bool | None = None) -> dict:
  """The static arguments of a compiled ranking step (`beam_rank`) for `table`: its offsets
  and level sizes, and the beam size and constraint (default: cfg's)."""
  return dict(offsets=tuple(int(o) for o in table.offsets),
              level_sizes=tuple(table.level_sizes), beam_size=beam_size or cfg.beam_size,
              constrained=cfg.constrained if constrained is None else constrained,
              level_softmax=bool(cfg.level_softmax))


def device_trie(table: IdentifierTable, num_items: int, mesh) -> Trie | SparseTrie:
  """The table's trie on every device, dense or sparse by size (`search_trie`); one trie shape
  per catalog size, so that every table of a run reuses the compiled search."""
  capacity = trie_capacity(table.level_sizes, max(num_items, len(table.codes)))
  return replicate(jax.tree.map(jnp.asarray, search_trie(table, capacity)), mesh)


def rank_samples(rank_batch, samples: SampleSet, batch_size: int,
                 length_buckets: tuple[int, ...], beam_size: int, mesh) -> np.ndarray:
  """Rankings int32 [S, beam_size] (-1 = none) of every sample: `rank_batch(history)` maps a
  sharded history batch int32 [B, slots] to ranked items [B, beam_size] on the device.

  One search runs at a time: the next batch is prepared on the host while the current one
  runs, and dispatched once it has finished. Two searches in flight at once can deadlock on a
  host split into several CPU devices (their collectives, the all-gathers of the beam
  reordering, wait for device threads that the other search holds)."""
  out = np.full((len(samples), beam_size), -1, np.int32)
  running = None

  def collect(idx, items):
    out[idx[idx >= 0]] = np.asarray(jax.device_get(items))[idx >= 0]

  for batch, idx in sample_batches(samples, batch_size, length_buckets):
    history = shard_batch({"history": batch["history"]}, mesh)["history"]
    if running is not None:
      collect(*running)
    running = (idx, rank_batch(history))
  if running is not None:
    collect(*running)
  return out


def beam_metrics(ranked: np.ndarray, samples: SampleSet, seconds: float) -> dict[str, float]:
  """Recall/NDCG@{5,10,20} of rankings [S, beam] against the samples' targets, logged with the
  evaluation speed."""
  logging.info("[grm] evaluated %d users in %.1fs (%.0f users/s)", len(samples), seconds,
               len(samples) / max(seconds, 1e-9))
  return metrics_from_ranks(target_ranks(ranked, samples.target))


class GRMTrainer:
  """Trains a T5 recommender for one identifier table and ranks items with beam search.

  The identifier map (item -> tokens) is an input of the compiled train and ranking steps, so
  batches hold item indices and a new table (a later period, a re-trained tokenizer) reuses
  the compiled steps.
  """

  def __init__(self, model_cfg: T5Config, cfg: GRMTrainConfig, mesh, seed: int = 0):
    self.model_cfg = model_cfg
    self._start(cfg, mesh, Trainer(
        T5(model_cfg, rngs=nnx.Rngs(seed)),
        functools.partial(grm_loss, reduction=cfg.loss_reduction,
                          level_sizes=tuple(cfg.level_softmax)),
        optimizer(cfg), mesh))

  def _start(self, cfg: GRMTrainConfig, mesh, trainer: Trainer,
             trainable: tuple[str, ...] | None = None) -> None:
    """Set-up shared by the recommenders' trainers: checks, the `Trainer`, the groups a fit
    updates (None: all) and the compiled ranking step (`_rank_batch`)."""
    if cfg.loss_reduction not in LOSS_REDUCTIONS:
      raise ValueError(f"grm.loss_reduction must be one of {LOSS_REDUCTIONS}, got "
                       f"{cfg.loss_reduction!r}")
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh)
    self.cfg, self.mesh, self.trainer, self.trainable = cfg, mesh, trainer, trainable
    self.init_params = trainer.init_params
    self._rank = jax.jit(self._rank_batch, static_argnames=(
        "offsets", "level_sizes", "beam_size", "constrained", "level_softmax"))

  def _rank_batch(self, params, history, item_tokens, trie: Trie | SparseTrie, **static):
    model = self.trainer.merge(params)
    encoded, mask = model.encode(identifier_inputs(history, item_tokens))
    return beam_rank(model, encoded, mask, trie, **static)

  def lower_rank(self, params, history: jax.Array, item_tokens: jax.Array,
                 trie: Trie | SparseTrie, table: IdentifierTable, beam_size: int | None = None):
    """The ranking step lowered for this batch shape (`jax.stages.Lowered`, benchmarks):
    `.compile()(params, history, item_tokens, trie)` returns (items, scores) as `rank`."""
    return self._rank.lower(params, history, item_tokens, trie,
                            **self._rank_static(table, beam_size))

  def _rank_static(self, table: IdentifierTable, beam_size: int | None,
                   constrained: bool | None = None) -> dict:
    return ranking_options(table, self.cfg, beam_size, constrained)

  def item_tokens(self, table: IdentifierTable, num_items: int) -> jax.Array:
    """The identifier map int32 [num_items, D] on every device."""
    return replicate(jnp.asarray(table.item_tokens(num_items)), self.mesh)

  def train(self, table: IdentifierTable, num_items: int, train: SampleSet, valid: SampleSet,
            checkpoint_dir: str, params=None, loop_cfg: loop.LoopConfig | None = None,
            context: dict | None = None):
    """Trains from `params` (default: fresh init) and returns (best params, loop state).
    `context` adds device inputs of the objective to the identifier map (PESO's previous
    adapters)."""
    if len(train) == 0:
      raise ValueError("the recommender's training set is empty")
    loop_cfg = loop_cfg or self.cfg.loop

    def epoch_batches(epoch):
      return sharded_training_batches(
          train, self.cfg.batch_size, self.cfg.length_buckets, self.mesh, seed=loop_cfg.seed,
          epoch=epoch, grouping=self.cfg.batch_grouping,
          steps_per_dispatch=self.cfg.steps_per_dispatch)

    return self.trainer.fit(name="grm", epoch_batches=epoch_batches,
                            evaluate=lambda p: self.evaluate(p, table, num_items, valid),
                            loop_cfg=loop_cfg, checkpoint_dir=checkpoint_dir, params=params,
                            context={"item_tokens": self.item_tokens(table, num_items),
                                     **(context or {})},
                            trainable=self.trainable)

  def rank(self, params, table: IdentifierTable, num_items: int, samples: SampleSet,
           beam_size: int | None = None, constrained: bool | None = None) -> np.ndarray:
    """Top-`beam_size` items int32 [S, beam] for every sample, in score order (-1 = none);
    each item at most once (its best identifier's rank) when items own several identifiers.
    `constrained` overrides `cfg.constrained` (trie-constrained or free beams)."""
    return self._rank_with(
        lambda history, item_tokens, trie, static: self._rank(
            params, history, item_tokens, trie, **static)[0],
        table, num_items, samples, beam_size, constrained)

  def _rank_with(self, rank_batch, table: IdentifierTable, num_items: int, samples: SampleSet,
                 beam_size: int | None, constrained: bool | None = None) -> np.ndarray:
    """`rank` through a compiled batch ranking `rank_batch(history, item_tokens, trie,
    static) -> items [B, beam]` (the model's own, or a mixture of models)."""
    static = self._rank_static(table, beam_size, constrained)
    item_tokens = self.item_tokens(table, num_items)
    trie = device_trie(table, num_items, self.mesh)
    return rank_samples(lambda history: rank_batch(history, item_tokens, trie, static),
                        samples, self.cfg.eval_batch_size, self.cfg.length_buckets,
                        static["beam_size"], self.mesh)

  def evaluate(self, params, table: IdentifierTable, num_items: int, samples: SampleSet,
               constrained: bool | None = None) -> dict[str, float]:
    """Recall/NDCG@{5,10,20} of beam-search rankings against the samples' targets
    (`constrained` as in `rank`)."""
    t0 = time.time()
    ranked = self.rank(params, table, num_items, samples, constrained=constrained)
    return beam_metrics(ranked, samples, time.time() - t0)
