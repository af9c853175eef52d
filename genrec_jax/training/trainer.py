"""One trainer for every model: a jitted, donated, sharded train step over parameter groups.

A model is an NNX module whose state falls into named parameter groups: its top-level
attributes (for example `tokenizer` and `recommender` of a jointly trained method), variables
picked by a filter (the LoRA adapters spread over a frozen backbone), or the single group
"model" when it trains as one piece. Each group has its own optax optimizer
(learning rate, schedule, weight decay). A train step updates the groups named in `trainable`
and leaves the others frozen: no gradient is computed for them and their optimizer state is
unchanged, which is how alternating training freezes one side for an epoch.

The model interface is the objective `loss_fn(model, batch, key, context) -> (loss, aux)`: a
pure function of the merged module, a batch of device arrays, a dropout key (None = no
dropout) and `context`, device arrays that are read but not trained and may change between
calls without recompiling (the item -> identifier map of a generative recommender, the
known-items mask of a growing catalog, codeword groups, ...). `aux` is a dict of scalars that
the step reports beside the loss and the global gradient norm.

The step is compiled once per batch shape and trainable set, with the parameters and
optimizer state donated and kept in place (`out_shardings`: replicated, or split over the data
axis with `param_sharding="fsdp"`), and batches sharded over the mesh's data axis
(`training.sharding`); `fit` drives it through the shared epoch loop
(`training.loop`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genrec_jax.data.batching import stack_item_batches
from genrec_jax.training import loop
from genrec_jax.training.sharding import (PARAM_SHARDINGS, fsdp_shardings, replicate,
                                          replicated, shard_item_batch, shard_stacked_batch)

MODEL_GROUP = "model"  # the one group of a model trained as one piece

LossFn = Callable[[nnx.Module, dict, "jax.Array | None", dict], tuple[jax.Array, dict]]
Trainable = "tuple[str, ...] | Callable[[int], tuple[str, ...]] | None"


def _in_group(group: str):
  """NNX filter of the variables under the model's top-level attribute `group`."""
  return lambda path, _: bool(path) and path[0] == group


class Trainer:
  """Trains an NNX model on `loss_fn` with one optimizer per parameter group.

  Args:
    model: the module to train (its initial state becomes `init_params`).
    loss_fn: the objective, (model, batch, key, context) -> (scalar loss, aux dict).
    optimizers: one optax transformation (the whole model is the group "model"), or a mapping
      from top-level attribute name to transformation; every variable must belong to a group.
    mesh: the device mesh; parameters and optimizer state are replicated on it.
    written: groups whose variables the objective may assign (statistics gathered while
      training, e.g. how often each identifier is selected): a step keeps the values the
      objective leaves there. They must not be trainable in the same step.
    filters: NNX filters of groups that are not top-level attributes (a variable type such
      as LoRA adapters, a path predicate; `...` for everything left, last). Filters are
      tried in the order of `optimizers`; a variable belongs to the first group that matches.
    param_sharding: "replicated" (every device holds the parameters and optimizer state) or
      "fsdp" (large arrays split over the mesh's data axis, `sharding.fsdp_shardings`).
  """

  def __init__(self, model: nnx.Module, loss_fn: LossFn,
               optimizers: optax.GradientTransformation | Mapping[str, Any], mesh,
               written: tuple[str, ...] = (), filters: Mapping[str, Any] | None = None,
               param_sharding: str = "replicated"):
    if param_sharding not in PARAM_SHARDINGS:
      raise ValueError(f"param_sharding must be one of {PARAM_SHARDINGS}, got "
                       f"{param_sharding!r}")
    self.param_sharding = param_sharding
    if not isinstance(optimizers, Mapping):
      optimizers = {MODEL_GROUP: optimizers}
    self.optimizers = dict(optimizers)
    self.groups = tuple(self.optimizers)
    if set(written) - set(self.groups) or set(filters or {}) - set(self.groups):
      raise ValueError(f"written groups {written} and filtered groups {tuple(filters or {})} "
                       f"must be parameter groups {self.groups}")
    self.written = tuple(written)
    self.loss_fn, self.mesh = loss_fn, mesh
    self.filters = {g: (filters or {}).get(g, _in_group(g)) for g in self.groups}
    if self.groups == (MODEL_GROUP,) and not filters:
      self.graphdef, state = nnx.split(model)
      states = (state,)
    else:
      group_filters = [self.filters[g] for g in self.groups]
      if group_filters[-1] is ...:
        self.graphdef, *states = nnx.split(model, *group_filters)
      else:
        self.graphdef, *states, rest = nnx.split(model, *group_filters, ...)
        if jax.tree.leaves(rest):
          raise ValueError(f"model state outside the parameter groups {self.groups}: "
                           f"{sorted(str(k) for k in rest.keys())}; give every top-level "
                           f"attribute an optimizer")
    # Copies: train steps donate their inputs, and the caller's model must outlive them.
    self.init_params = self.place(jax.tree.map(jnp.copy, dict(zip(self.groups, states))))
    opt_shapes = jax.eval_shape(self._opt_init, self.init_params)
    out_shardings = (self.placement(self.init_params), self.placement(opt_shapes),
                     replicated(mesh))
    self._step = jax.jit(self._train_step, donate_argnums=(0, 1),
                         static_argnames=("trainable",), out_shardings=out_shardings)
    self._steps = jax.jit(self._train_steps, donate_argnums=(0, 1),
                          static_argnames=("trainable",), out_shardings=out_shardings)

  def placement(self, tree):
    """Shardings of parameters or optimizer state (`param_sharding`)."""
    if self.param_sharding == "fsdp":
      return fsdp_shardings(tree, self.mesh)
    return jax.tree.map(lambda _: replicated(self.mesh), tree)

  def place(self, tree):
    """Parameters or optimizer state placed on the mesh (`placement`)."""
    return jax.device_put(tree, self.placement(tree))

  def _opt_init(self, params: Mapping) -> dict:
    return {g: self.optimizers[g].init(params[g]) for g in self.groups}

  def merge(self, params: Mapping) -> nnx.Module:
    """The model with the parameters of every group in `params`."""
    return nnx.merge(self.graphdef, *(params[g] for g in self.groups))

  def init_opt_state(self, params: Mapping) -> dict:
    """Fresh optimizer state of every group, placed as the parameters' (`placement`)."""
    return self.place(self._opt_init(params))

  def check_trainable(self, trainable) -> tuple[str, ...]:
    trainable = self.groups if trainable is None else tuple(trainable)
    unknown = sorted(set(trainable) - set(self.groups))
    if unknown or not trainable:
      raise ValueError(f"trainable groups must be a non-empty subset of {self.groups}, got "
                       f"{trainable}")
    return trainable

  def train_step(self, params, opt_state, batch: dict, key: jax.Array, context: dict | None = None,
                 trainable: tuple[str, ...] | None = None):
    """One update of the `trainable` groups (default all) -> (params, opt_state, metrics).

    `params` and `opt_state` are donated (their buffers are reused): use the returned ones, and
    pass copies of `init_params` if they are needed again. metrics: `loss`,
    `grad_norm` (of the trainable groups) and the objective's aux values, scalars.
    """
    return self._step(params, opt_state, batch, key, context or {},
                      trainable=self.check_trainable(trainable))

  def train_steps(self, params, opt_state, batches: dict, key: jax.Array,
                  context: dict | None = None, trainable: tuple[str, ...] | None = None):
    """K updates in one dispatch (`lax.scan` over stacked batches) -> (params, opt_state,
    metrics).

    batches: the leaves of K batches of one shape stacked on a leading axis [K, B, ...], plus
    `step_ids` int32 [K]: step j updates with the dropout key `fold_in(key, step_ids[j])`, so
    that a step makes the update `train_step` makes with that key; -1 marks a filler step,
    skipped (`lax.cond`: no compute, parameters and optimizer state unchanged), so that every
    dispatch has K steps and one compiled shape. metrics: the real steps' mean of each
    train-step metric and `steps`, their number (the epoch loop weights dispatches by it).
    Donation as `train_step`.
    """
    return self._steps(params, opt_state, batches, key, context or {},
                       trainable=self.check_trainable(trainable))

  def _train_steps(self, params, opt_state, batches, key, context, *, trainable):
    batches = dict(batches)
    step_ids = batches.pop("step_ids")

    def update(state, batch, step_id):
      return self._train_step(*state, batch, jax.random.fold_in(key, step_id), context,
                              trainable=trainable)

    def body(state, xs):
      step_id, batch = xs
      skipped = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype),
                             jax.eval_shape(update, state, batch, step_id)[2])
      *state, metrics = jax.lax.cond(step_id >= 0, update,
                                     lambda state, *_: (*state, skipped),
                                     state, batch, step_id)
      return tuple(state), metrics

    (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), (step_ids, batches))
    real = step_ids >= 0
    count = real.sum()
    means = {k: jnp.sum(jnp.where(real, v, 0.0)) / jnp.maximum(count, 1)
             for k, v in metrics.items()}
    return params, opt_state, {**means, "steps": count}

  def item_update(self, params, opt_state, indices, step_id: int, key: jax.Array | None,
                  context: dict, steps_per_dispatch: int = 1,
                  trainable: tuple[str, ...] | None = None):
    """The update(s) of a tokenizer's item batches: with one step per call, `indices` int [B]
    and the key fold_in(key, step_id) (None: no randomness); with K = steps_per_dispatch > 1,
    a list of up to K consecutive batches, step j keyed by step_id + j (`train_steps`).
    `trainable` as `train_step`."""
    if steps_per_dispatch == 1:
      step_key = None if key is None else jax.random.fold_in(key, step_id)
      return self.train_step(params, opt_state, shard_item_batch(indices, self.mesh), step_key,
                             context, trainable)
    stacked = shard_stacked_batch(stack_item_batches(indices, steps_per_dispatch, step_id),
                                  self.mesh)
    return self.train_steps(params, opt_state, stacked,
                            jax.random.key(0) if key is None else key, context, trainable)

  def lower_step(self, params, opt_state, batch: dict, key: jax.Array,
                 context: dict | None = None, trainable: tuple[str, ...] | None = None):
    """The train step lowered for these inputs' shapes (`jax.stages.Lowered`): ahead-of-time
    compilation and cost analysis (benchmarks); `.compile()(params, opt_state, batch, key,
    context)` runs it."""
    return self._step.lower(params, opt_state, batch, key, context or {},
                            trainable=self.check_trainable(trainable))

  def _train_step(self, params, opt_state, batch, key, context, *, trainable):
    if set(trainable) & set(self.written):
      raise ValueError(f"groups {self.written} are written by the objective and cannot be "
                       f"trained")

    def objective(trained):
      # The written groups' variables are rebuilt here (an identity tree map) so that the
      # objective may assign them: NNX refuses assignments to variables of an outer trace.
      model = self.merge({**params, **{g: jax.tree.map(lambda x: x, params[g])
                                       for g in self.written}, **trained})
      loss, aux = self.loss_fn(model, batch, key, context)
      return loss, (aux, {g: nnx.state(model, self.filters[g]) for g in self.written})

    (loss, (aux, written)), grads = jax.value_and_grad(objective, has_aux=True)(
        {g: params[g] for g in trainable})
    params, opt_state = {**params, **written}, dict(opt_state)
    for g in trainable:
      updates, opt_state[g] = self.optimizers[g].update(grads[g], opt_state[g], params[g])
      params[g] = optax.apply_updates(params[g], updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm, **aux}

  def fit(self, *, name: str, epoch_batches, evaluate, loop_cfg: loop.LoopConfig,
          checkpoint_dir: str, params=None, context: dict | None = None,
          trainable: Trainable = None, after_epoch=None, interrupt_after_epoch=None):
    """Trains from `params` (default: the initial ones) through the epoch loop.

    Args:
      name: stage name for logs.
      epoch_batches: epoch -> iterable of (sharded batch, number of real samples); a batch
        with `step_ids` is a stack of batches, run in one dispatch (`train_steps`).
      evaluate: params -> validation metrics (model selection, `loop_cfg.select_metric`).
      loop_cfg: epochs, evaluation period, patience, seed.
      checkpoint_dir: this stage's checkpoints (an interrupted fit resumes there).
      params: starting parameters (fine-tuning) or None.
      context: the objective's non-trained device inputs for this fit (replicated).
      trainable: the groups updated (default all), or a function epoch -> groups (alternating
        training: each epoch updates its own groups, the others stay frozen).
      after_epoch, interrupt_after_epoch: as `loop.fit` (a per-epoch refresh of the
        parameters; a simulated crash for tests).

    Returns:
      (best params, loop state), as `loop.fit`.
    """
    params = self.init_params if params is None else params
    context = replicate(context or {}, self.mesh)
    schedule = trainable if callable(trainable) else (lambda _: trainable)
    # Groups no epoch of this fit updates stay out of its checkpoints (`loop.fit`); a
    # per-epoch refresh (`after_epoch`) may rewrite any group.
    updated = (set(self.groups) if callable(trainable) or trainable is None
               or after_epoch is not None else set(trainable) | set(self.written))
    constant = tuple(g for g in self.groups if g not in updated)

    def step(p, o, batch, key, epoch):
      update = self.train_steps if "step_ids" in batch else self.train_step
      return update(p, o, batch, key, context, schedule(epoch))

    return loop.fit(name=name, params=params, opt_state=self.init_opt_state(params),
                    train_step=step, epoch_batches=epoch_batches, evaluate=evaluate,
                    cfg=loop_cfg, checkpoint_dir=checkpoint_dir,
                    after_epoch=after_epoch, interrupt_after_epoch=interrupt_after_epoch,
                    constant=constant)
