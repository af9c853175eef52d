"""Training and evaluation of SASRec (CF embeddings and discriminative baseline).

Each user's training sequence is one example; every position predicts the next item with a
full-softmax cross-entropy over the catalog ("ce", the strong baseline) or a binary
cross-entropy against one sampled negative ("bce", the original SASRec / LETTER recipe).
Evaluation ranks the full catalog with the last position's hidden state.

In the continual protocol the catalog grows: `known_items` (bool [num_items]) restricts the
softmax, the sampled negatives and the ranking to the items seen so far, so an item of a later
period is never a negative before it exists; `reset_item_rows` gives the items new in a period
freshly initialised rows (METHODS.md section 4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genrec_jax.data.batching import sample_batches
from genrec_jax.data.splits import SampleSet
from genrec_jax.evaluation.metrics import metrics_from_ranks, target_ranks
from genrec_jax.recommenders.sasrec import SASRec, SASRecConfig
from genrec_jax.training import loop
from genrec_jax.training.optim import make_optimizer
from genrec_jax.training.sharding import (check_batch_size, replicate, shard_batch,
                                          sharded_training_batches)
from genrec_jax.training.trainer import MODEL_GROUP, Trainer


@dataclasses.dataclass(frozen=True)
class SASRecTrainConfig:
  """Optimisation settings of SASRec."""

  loss: str = "ce"  # "ce" (full softmax) or "bce" (one sampled negative)
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  warmup_steps: int = 0
  grad_clip: float = 5.0
  batch_size: int = 128
  eval_batch_size: int = 512
  length_buckets: tuple[int, ...] = (5, 10, 20, 50)
  steps_per_dispatch: int = 1  # updates per compiled call (`Trainer.train_steps`)
  loop: loop.LoopConfig = loop.LoopConfig(epochs=200, patience=10)


LOSSES = ("ce", "bce")


def sasrec_loss(model: SASRec, batch: dict, key: jax.Array | None, context: dict,
                loss: str = "ce") -> tuple[jax.Array, dict]:
  """Next-item loss averaged over the positions with a target.

  batch: `history` int32 [B, slots] items (-1 = padding), `target` int32 [B, slots] the next
  item at every position (-1 = none); context: `known` bool [num_items], the items that exist
  (the others get no softmax mass and are never sampled as negatives). "ce": full softmax over
  the known items; "bce": the target against one uniformly sampled known item. Returns
  (loss, {}).
  """
  known = context["known"]
  drop_key, neg_key = (None, None) if key is None else jax.random.split(key)
  hidden = model(batch["history"] + 1, drop_key)  # model ids: item + 1, 0 = padding
  targets = batch["target"]
  valid = targets >= 0
  safe = jnp.maximum(targets, 0)
  if loss == "ce":
    logits = jnp.where(known, model.logits(hidden), -jnp.inf)  # unknown items: no mass
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  else:
    table = model.item_embeddings()
    known_ids = jnp.nonzero(known, size=known.shape[0])[0]  # known items first
    negatives = known_ids[jax.random.randint(neg_key, targets.shape, 0, known.sum())]
    pos = jnp.sum(hidden * table[safe], -1)
    neg = jnp.sum(hidden * table[negatives], -1)
    nll = -jax.nn.log_sigmoid(pos) - jax.nn.log_sigmoid(-neg)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1), {}


class SASRecTrainer:
  """Trains SASRec on training windows and ranks items for evaluation samples."""

  def __init__(self, model_cfg: SASRecConfig, cfg: SASRecTrainConfig, mesh, seed: int = 0):
    if cfg.loss not in LOSSES:
      raise ValueError(f"SASRec loss must be one of {LOSSES}, got {cfg.loss!r}")
    if max(cfg.length_buckets) != model_cfg.max_len:
      raise ValueError(f"the largest SASRec length bucket {max(cfg.length_buckets)} must equal "
                       f"max_len {model_cfg.max_len}")
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh)
    self.model_cfg, self.cfg, self.mesh = model_cfg, cfg, mesh
    self.trainer = Trainer(SASRec(model_cfg, rngs=nnx.Rngs(seed)),
                           functools.partial(sasrec_loss, loss=cfg.loss),
                           make_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps,
                                          cfg.grad_clip), mesh)
    self.init_params = self.trainer.init_params
    self._top_items = jax.jit(self._top, static_argnames=("k",))

  def _known(self, known_items: np.ndarray | None) -> np.ndarray:
    """bool [num_items] mask of the items that exist (default: all)."""
    if known_items is None:
      return np.ones(self.model_cfg.num_items, bool)
    known_items = np.asarray(known_items, bool)
    if known_items.shape != (self.model_cfg.num_items,) or not known_items.any():
      raise ValueError(f"known_items must be a non-empty bool mask of shape "
                       f"[{self.model_cfg.num_items}], got {known_items.shape}")
    return known_items

  def _top(self, params, history, known, *, k):
    model = self.trainer.merge(params)
    logits = model.logits(model(history + 1)[:, -1])
    return jax.lax.top_k(jnp.where(known, logits, -jnp.inf), k)[1]

  def train(self, windows: SampleSet, valid: SampleSet, checkpoint_dir: str, params=None,
            loop_cfg: loop.LoopConfig | None = None, known_items: np.ndarray | None = None):
    """Trains from `params` (default fresh) on windows; returns (best params, loop state).

    known_items: bool [num_items], the items that exist now (default all): the others are
    left out of the softmax, the negatives and the validation ranking; a training target
    outside them is an error.
    """
    loop_cfg = loop_cfg or self.cfg.loop
    known = self._known(known_items)
    targets = windows.target[windows.target >= 0]
    if targets.size and not known[targets].all():
      raise ValueError(f"{int((~known[targets]).sum())} SASRec training targets are items "
                       f"outside known_items; mark every item of the training data as known")

    def epoch_batches(epoch):
      return sharded_training_batches(
          windows, self.cfg.batch_size, self.cfg.length_buckets, self.mesh, seed=loop_cfg.seed,
          epoch=epoch, steps_per_dispatch=self.cfg.steps_per_dispatch)

    return self.trainer.fit(name="sasrec", epoch_batches=epoch_batches,
                            evaluate=lambda p: self.evaluate(p, valid, known_items),
                            loop_cfg=loop_cfg, checkpoint_dir=checkpoint_dir, params=params,
                            context={"known": jnp.asarray(known)})

  def reset_item_rows(self, params, items: np.ndarray, seed: int):
    """`params` with the embedding rows of `items` (int [M]) set to a fresh initialisation
    (drawn from `seed`): items that appear for the first time start untrained."""
    _, fresh = nnx.split(SASRec(self.model_cfg, rngs=nnx.Rngs(seed)))
    rows = jnp.asarray(items, jnp.int32) + 1  # row 0 is padding
    params = jax.tree.map(lambda leaf: leaf, params)  # new containers: the caller's stay as is
    table = params[MODEL_GROUP]["item_embed"]["embedding"]
    table[...] = table[...].at[rows].set(fresh["item_embed"]["embedding"][...][rows])
    return params

  def grow_item_table(self, params):
    """Parameters of a SASRec with fewer items, extended to this trainer's item count: the old
    items keep their rows, new items get this trainer's fresh initial rows (a new period's
    new items); every other parameter is kept."""
    def grow(old, fresh):
      if old.shape == fresh.shape:
        return old
      if old.shape[1:] != fresh.shape[1:] or old.shape[0] > fresh.shape[0]:
        raise ValueError(f"cannot grow a parameter of shape {old.shape} to {fresh.shape}")
      return fresh.at[:old.shape[0]].set(old)
    return jax.tree.map(grow, params, self.init_params)

  def rank(self, params, samples: SampleSet, k: int = 20,
           known_items: np.ndarray | None = None) -> np.ndarray:
    """Top-k item indices int32 [S, k] over the catalog (the known items, default all) for
    each sample's history."""
    known = replicate(jnp.asarray(self._known(known_items)), self.mesh)
    out = np.zeros((len(samples), k), np.int32)
    for batch, idx in sample_batches(samples, self.cfg.eval_batch_size,
                                     self.cfg.length_buckets):
      history = shard_batch({"history": batch["history"]}, self.mesh)["history"]
      top = self._top_items(params, history, known, k=k)
      out[idx[idx >= 0]] = np.asarray(jax.device_get(top))[idx >= 0]
    return out

  def evaluate(self, params, samples: SampleSet, known_items: np.ndarray | None = None
               ) -> dict[str, float]:
    ranked = self.rank(params, samples, known_items=known_items)
    return metrics_from_ranks(target_ranks(ranked, samples.target))

  def item_embeddings(self, params) -> np.ndarray:
    """CF embeddings [num_items, hidden_dim] of trained parameters."""
    return np.asarray(jax.device_get(self.trainer.merge(params).item_embeddings()))
