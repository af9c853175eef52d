"""Training and evaluation of the generative recommender (T5 over identifier tokens).

A sample is (history of items, next item). Items become identifier tokens through an
`IdentifierTable`; the encoder reads the flattened history tokens (left-padded), the decoder
predicts the target's L + 1 tokens after the start token 0 (cross-entropy, METHODS.md section 3).
Ranking is jit-compiled trie-constrained beam search (`genrec_jax.decoding`).

Hot loops are pure functions over NNX state (`nnx.split` once, `nnx.merge` inside `jax.jit`),
with parameters replicated and batches sharded over the mesh's `data` axis.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from genrec_jax.data.batching import bucketed_batches
from genrec_jax.data.splits import SampleSet
from genrec_jax.decoding.beam_search import beam_search
from genrec_jax.decoding.trie import Trie, build_trie, trie_capacity
from genrec_jax.evaluation.metrics import metrics_from_ranks, target_ranks
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.tokenizers.identifiers import IdentifierTable
from genrec_jax.training import loop
from genrec_jax.training.optim import make_optimizer
from genrec_jax.training.sharding import (check_batch_size, replicate, shard_batch)


@dataclasses.dataclass(frozen=True)
class GRMTrainConfig:
  """Optimisation and decoding settings of the generative recommender."""

  learning_rate: float = 1e-4
  weight_decay: float = 0.01
  warmup_steps: int = 0
  grad_clip: float = 0.0
  loss_reduction: str = "mean"
  batch_grouping: str = "length"
  batch_size: int = 256
  eval_batch_size: int = 256
  beam_size: int = 20
  constrained: bool = True
  length_buckets: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 13, 16, 20)
  loop: loop.LoopConfig = loop.LoopConfig(epochs=200, patience=15)


def history_tokens(history: np.ndarray, item_tokens: np.ndarray) -> np.ndarray:
  """Item histories int [S, H] (-1 = pad) -> tokens int32 [S, H * D] (0 = pad)."""
  tokens = np.where(history[..., None] >= 0, item_tokens[np.maximum(history, 0)], 0)
  return tokens.reshape(history.shape[0], -1).astype(np.int32)


def sample_batches(samples: SampleSet, item_tokens: np.ndarray, batch_size: int,
                   buckets: tuple[int, ...], *, seed: int | None = None, epoch: int = 0,
                   grouping: str = "length"):
  """Yields (numpy batch, indices) with `inputs` [B, slots * D], `targets` [B, D], `weight` [B]."""
  depth = item_tokens.shape[1]
  for slots, idx in bucketed_batches(samples.lengths, batch_size, buckets, seed=seed,
                                     epoch=epoch, grouping=grouping):
    safe = np.maximum(idx, 0)
    history = samples.history[safe][:, samples.history.shape[1] - slots:]
    batch = {"inputs": history_tokens(history, item_tokens),
             "targets": item_tokens[samples.target[safe]],
             "weight": (idx >= 0).astype(np.float32)}
    batch["inputs"][idx < 0] = 0
    batch["targets"][idx < 0] = 0
    assert batch["inputs"].shape[1] == slots * depth
    yield batch, idx


LOSS_REDUCTIONS = ("mean", "sum")


def grm_loss(model: T5, batch: dict, key: jax.Array | None, reduction: str = "mean"
             ) -> jax.Array:
  """Cross-entropy of the target's D tokens, per sample averaged ("mean": the reference
  code's token-level CE) or summed ("sum") over tokens, then averaged over real samples.

  batch: `inputs` int32 [B, T], `targets` int32 [B, D], `weight` float [B] (0 = padding).
  """
  if reduction not in LOSS_REDUCTIONS:
    raise ValueError(f"grm.loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
  targets = batch["targets"]
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  logits = model(batch["inputs"], decoder_inputs, key)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  nll = nll.mean(-1) if reduction == "mean" else nll.sum(-1)
  return jnp.sum(nll * batch["weight"]) / jnp.maximum(batch["weight"].sum(), 1.0)


class GRMTrainer:
  """Trains a T5 recommender for one identifier table and ranks items with beam search."""

  def __init__(self, model_cfg: T5Config, cfg: GRMTrainConfig, mesh, seed: int = 0):
    self.model_cfg, self.cfg, self.mesh = model_cfg, cfg, mesh
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh)
    model = T5(model_cfg, rngs=nnx.Rngs(seed))
    self.graphdef, params = nnx.split(model)
    self.init_params = replicate(params, mesh)
    self.optimizer = make_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                                    cfg.grad_clip)
    self._train_step = jax.jit(self._step, donate_argnums=(0, 1))
    self._rank = jax.jit(self._rank_batch, static_argnames=("offsets", "level_sizes",
                                                            "beam_size", "constrained"))

  def init_opt_state(self, params):
    return replicate(self.optimizer.init(params), self.mesh)

  def _step(self, params, opt_state, batch, key):
    def loss_fn(p):
      return grm_loss(nnx.merge(self.graphdef, p), batch, key, self.cfg.loss_reduction)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def _rank_batch(self, params, inputs, trie: Trie, *, offsets, level_sizes, beam_size,
                  constrained):
    model = nnx.merge(self.graphdef, params)
    encoded, mask = model.encode(inputs)
    memory = model.decoder_memory(encoded)  # once per user, shared by beams and steps

    def step_fn(last_tokens, cache):
      logits, cache = model.decode_step(memory, mask, last_tokens, cache)
      return jax.nn.log_softmax(logits, axis=-1), cache

    items, _, scores = beam_search(step_fn, model.init_cache(inputs.shape[0]), inputs.shape[0],
                                   trie, offsets, level_sizes, beam_size,
                                   constrained=constrained)
    return items, scores

  def train(self, table: IdentifierTable, num_items: int, train: SampleSet, valid: SampleSet,
            checkpoint_dir: str, params=None, loop_cfg: loop.LoopConfig | None = None):
    """Trains from `params` (default: fresh init) and returns (best params, loop state)."""
    if len(train) == 0:
      raise ValueError("the recommender's training set is empty")
    loop_cfg = loop_cfg or self.cfg.loop
    item_tokens = table.item_tokens(num_items)
    params = self.init_params if params is None else params
    opt_state = self.init_opt_state(params)

    def epoch_batches(epoch):
      for batch, idx in sample_batches(train, item_tokens, self.cfg.batch_size,
                                       self.cfg.length_buckets, seed=loop_cfg.seed, epoch=epoch,
                                       grouping=self.cfg.batch_grouping):
        yield shard_batch(batch, self.mesh), int((idx >= 0).sum())

    return loop.fit(name="grm", params=params, opt_state=opt_state, train_step=self._train_step,
                    epoch_batches=epoch_batches,
                    evaluate=lambda p: self.evaluate(p, table, num_items, valid),
                    cfg=loop_cfg, checkpoint_dir=checkpoint_dir, mesh=self.mesh)

  def rank(self, params, table: IdentifierTable, num_items: int, samples: SampleSet,
           beam_size: int | None = None) -> np.ndarray:
    """Top-`beam_size` items int32 [S, beam] for every sample, in score order (-1 = none)."""
    beam_size = beam_size or self.cfg.beam_size
    item_tokens = table.item_tokens(num_items)
    # One trie shape per catalog size: every table of a run reuses the compiled search.
    capacity = trie_capacity(table.level_sizes, max(num_items, len(table.codes)))
    trie = replicate(jax.tree.map(jnp.asarray, build_trie(table, capacity)), self.mesh)
    out = np.full((len(samples), beam_size), -1, np.int32)
    for batch, idx in sample_batches(samples, item_tokens, self.cfg.eval_batch_size,
                                     self.cfg.length_buckets):
      items, _ = self._rank(params, shard_batch({"inputs": batch["inputs"]}, self.mesh)["inputs"],
                            trie, offsets=tuple(int(o) for o in table.offsets),
                            level_sizes=tuple(table.level_sizes), beam_size=beam_size,
                            constrained=self.cfg.constrained)
      items = np.asarray(jax.device_get(items))
      out[idx[idx >= 0]] = items[idx >= 0]
    return out

  def evaluate(self, params, table: IdentifierTable, num_items: int, samples: SampleSet
               ) -> dict[str, float]:
    """Recall/NDCG@{5,10,20} of beam-search rankings against the samples' targets."""
    t0 = time.time()
    ranked = self.rank(params, table, num_items, samples)
    metrics = metrics_from_ranks(target_ranks(ranked, samples.target))
    logging.info("[grm] evaluated %d users in %.1fs (%.0f users/s)", len(samples),
                 time.time() - t0, len(samples) / max(time.time() - t0, 1e-9))
    return metrics
