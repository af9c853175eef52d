"""Training loops shared by every trained model: the epoch loop and the step loop.

`fit`, the epoch loop (recommenders, CF models): progress, evaluation, early stopping, resume.
`fit_steps`, the step loop (tokenizers, which train on random item batches for a fixed number
of steps): progress, refresh hooks, optional selection by a validation score. Neither owns
model code; both stop on non-finite metrics.

The epoch loop calls `train_step(params, opt_state, batch, key, epoch)` (a jitted pure
function returning the new state and a dict of scalar metrics with `loss` and `grad_norm`,
and `steps` when the call made several updates; `training.trainer.Trainer` builds it; the
key is fold_in(epoch key, step), or the epoch key for a batch of several updates, which
carries their `step_ids`), stops with an error when an epoch's loss or gradient
norm is not finite, evaluates with `evaluate(params) -> metrics` every `eval_every` epochs,
keeps the best parameters by `select_metric` (model selection on validation: the returned parameters are the
best ones, not the last), stops after `patience` evaluations without improvement, and saves a
checkpoint (params, optimizer state, best params, loop state) after an epoch once
`checkpoint_seconds` have passed since its last save (0: after every epoch). Started again
with the same checkpoint directory it resumes after the last saved epoch and, since batch order
and dropout keys depend only on (seed, epoch, step), reaches the same result. The last epoch's
checkpoint holds the best parameters only: a finished fit needs nothing else, and a save
writes every array (about 2 ms each through Orbax on CPU, so that a small model's per-epoch
saves can cost more than its epochs).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from genrec_jax.training.checkpoint import Checkpoints


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Epoch budget and model-selection rule."""

  epochs: int
  eval_every: int = 1
  patience: int = 10  # evaluations without improvement before stopping
  select_metric: str = "ndcg@10"
  seed: int = 0
  max_train_seconds: float | None = None  # stop (gracefully) once the budget is spent
  checkpoint_seconds: float = 0.0  # least time between saves (0: every epoch); the last
  #   epoch is always saved


def fit(*, name: str, params, opt_state, train_step: Callable,
        epoch_batches: Callable[[int], Iterable[tuple[dict, int]]],
        evaluate: Callable[[Any], dict[str, float]], cfg: LoopConfig, checkpoint_dir: str,
        after_epoch: Callable[[int, Any], tuple[Any, dict]] | None = None,
        interrupt_after_epoch: int | None = None,
        constant: tuple[str, ...] = ()) -> tuple[Any, dict]:
  """Trains and selects the best parameters on validation.

  Args:
    name: stage name for logs.
    params, opt_state: initial state, placed on the devices (replicated or sharded); a
      restored state is placed as they are.
    train_step: (params, opt_state, batch, key, epoch) -> (params, opt_state, metrics), metrics
      a dict of scalars holding at least `loss` and `grad_norm`.
    epoch_batches: epoch -> iterable of (sharded batch, number of real samples).
    evaluate: params -> validation metrics containing `cfg.select_metric`.
    cfg: loop settings.
    checkpoint_dir: where this stage's Orbax checkpoints live.
    after_epoch: (epoch, params) -> (params, stats), called after each epoch's updates and
      before its evaluation and checkpoint: a refresh that a method schedules per epoch (ETEGRec
      recomputes its identifiers after a tokenizer epoch). The returned parameters are trained
      on, evaluated and saved; `stats` (JSON scalars) join the epoch's history record.
    interrupt_after_epoch: testing hook simulating a crash after that epoch's checkpoint
      (that epoch is saved whatever `cfg.checkpoint_seconds`).
    constant: keys of a dict of parameter groups that this fit never changes (a frozen
      backbone): left out of the checkpoints, and a resumed fit takes them from `params`. A
      frozen 1.5 B-parameter LLM would otherwise be written twice per stage.

  Returns:
    (best params, history dict with per-epoch loss/metrics, best epoch and metric, seconds).
  """
  ckpt = Checkpoints(checkpoint_dir, ("params", "opt_state", "best_params"))
  state = {"epoch": -1, "best_metric": -np.inf, "best_epoch": -1, "bad_evals": 0,
           "done": False, "history": [], "train_seconds": 0.0}
  params = jax.tree.map(jnp.copy, params)  # train steps donate their inputs: keep the caller's

  def stored(tree):
    return {k: v for k, v in tree.items() if k not in constant} if constant else tree

  def placed(tree, template):
    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, template))

  def with_constant(tree, copy: bool):
    """`tree` with the constant groups of `params` (copies for best_params: params are
    donated by every train step)."""
    if not constant:
      return tree
    return {**{k: jax.tree.map(jnp.copy, params[k]) if copy else params[k] for k in constant},
            **tree}

  best_params = None  # until the first evaluation
  latest = ckpt.latest_step()
  if latest is not None and "params" not in ckpt.stored_items(latest):  # a finished fit
    items, state = ckpt.restore(latest, {"best_params": stored(params)})
    ckpt.close()
    logging.info("[%s] restored the finished fit from %s", name, checkpoint_dir)
    return with_constant(placed(items["best_params"], stored(params)), copy=False), state
  if latest is not None:
    items, state = ckpt.restore(latest, {"params": stored(params), "opt_state": opt_state,
                                         "best_params": stored(params)})
    best_params = with_constant(placed(items["best_params"], stored(params)), copy=True)
    opt_state = placed(items["opt_state"], opt_state)
    params = with_constant(placed(items["params"], stored(params)), copy=False)
    logging.info("[%s] resumed from %s after epoch %d", name, checkpoint_dir, state["epoch"])
  base_key = jax.random.key(cfg.seed)
  start = last_save = time.time()
  for epoch in range(state["epoch"] + 1, cfg.epochs):
    if state["done"]:
      break
    t0, step_metrics, samples = time.time(), [], 0
    epoch_key = jax.random.fold_in(base_key, epoch)
    for step, (batch, real) in enumerate(epoch_batches(epoch)):
      # a dispatch of several updates folds each update's key from the epoch key itself
      key = epoch_key if "step_ids" in batch else jax.random.fold_in(epoch_key, step)
      params, opt_state, metrics = train_step(params, opt_state, batch, key, epoch)
      step_metrics.append(metrics)
      samples += real
    if not step_metrics:
      raise ValueError(f"[{name}] epoch {epoch + 1} has no training batches")
    means = epoch_means(step_metrics)
    if not all(np.isfinite(v) for v in means.values()):
      raise FloatingPointError(
          f"[{name}] epoch {epoch + 1}: non-finite training metrics {means}; lower the "
          f"learning rate or check the inputs for NaN/inf (the last saved checkpoint is kept)")
    loss = means["loss"]
    seconds = time.time() - t0
    state["train_seconds"] += seconds
    record = {"epoch": epoch, **means, "samples_per_s": samples / max(seconds, 1e-9)}
    if after_epoch is not None:
      params, refresh_stats = after_epoch(epoch, params)
      record.update(refresh_stats)
    over_budget = (cfg.max_train_seconds is not None and
                   state["train_seconds"] >= cfg.max_train_seconds)
    if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1 or over_budget:
      metrics = evaluate(params)
      record["valid"] = metrics
      if metrics[cfg.select_metric] > state["best_metric"]:
        state.update(best_metric=metrics[cfg.select_metric], best_epoch=epoch, bad_evals=0)
        best_params = jax.tree.map(jnp.copy, params)  # params are donated by the next step
      else:
        state["bad_evals"] += 1
        state["done"] = state["bad_evals"] >= cfg.patience
    state["done"] = state["done"] or over_budget or epoch == cfg.epochs - 1
    state["history"].append(record)
    state["epoch"] = epoch
    remaining = (cfg.epochs - epoch - 1) * seconds
    logging.info("[%s] epoch %d/%d loss %.4f  |grad| %.3g  %.0f samples/s  %.1fs  %s  "
                 "ETA <= %.0fs", name, epoch + 1, cfg.epochs, loss, record["grad_norm"],
                 record["samples_per_s"], seconds,
                 _fmt(record.get("valid")), remaining)
    best = {"best_params": stored(params if best_params is None else best_params)}
    if state["done"]:
      ckpt.save(epoch, best, state)
    elif (time.time() - last_save >= cfg.checkpoint_seconds
          or epoch == interrupt_after_epoch):
      ckpt.save(epoch, {"params": stored(params), "opt_state": opt_state, **best}, state)
      last_save = time.time()
    if interrupt_after_epoch is not None and epoch == interrupt_after_epoch:
      ckpt.close()
      raise KeyboardInterrupt(f"simulated interruption after epoch {epoch}")
  if best_params is None:  # never evaluated (or no epoch left to run): the last parameters
    best_params = params
  ckpt.close()
  logging.info("[%s] best %s %.4f at epoch %d (%.1fs)", name, cfg.select_metric,
               state["best_metric"], state["best_epoch"] + 1, time.time() - start)
  return best_params, state


def fit_steps(*, name: str, params, opt_state, train_step: Callable, batches: Iterator[dict],
              steps: int, log_every: int, before_step: Callable[[int, Any], Any] | None = None,
              evaluate: Callable[[Any], dict[str, float]] | None = None, eval_every: int = 0,
              select_metric: str = "", steps_per_dispatch: int = 1,
              refresh_at: Callable[[int], bool] | None = None) -> tuple[Any, dict]:
  """Runs `steps` updates and returns the last parameters, or the best evaluated ones.

  Args:
    name: stage name for logs.
    params, opt_state: initial (replicated) state; donated by `train_step`.
    train_step: (params, opt_state, batch, step) -> (params, opt_state, metrics), metrics a
      dict of scalars holding at least `loss` and `grad_norm` (`Trainer.train_step`; the
      caller derives the step's random key from `step`). With `steps_per_dispatch` > 1 it
      receives a list of up to that many consecutive batches, the first being step `step`,
      and makes all their updates in one call (`Trainer.train_steps`).
    batches: yields one batch per step.
    steps: number of updates.
    log_every: steps between progress lines; the metrics are checked for non-finite values
      there and after the last step (a check every step would wait for every step).
    before_step: (step, params) -> params, called before each update, or with several steps
      per dispatch before each dispatch (refreshes that a method schedules: a k-means refit of
      the codebooks, a regularizer's inputs).
    evaluate: params -> metrics, every `eval_every` steps and after the last; with it the
      returned parameters are those with the lowest `select_metric`.
    eval_every: steps between evaluations (used only with `evaluate`).
    select_metric: the metric of `evaluate` to minimise.
    steps_per_dispatch: most updates per `train_step` call. Dispatches end where a progress
      line or an evaluation falls and start at every step where `refresh_at` is true, so the
      updates, refreshes and evaluations are those of one step per call.
    refresh_at: step -> whether `before_step` acts before that step (needed with several
      steps per dispatch and a `before_step`).

  Returns:
    (params, stats): stats holds "final_losses" (the last call's metrics without the loss
    and gradient norm: the objective's parts; with several steps per call, their mean over
    that call's steps), "steps", "seconds", "steps_per_second" (after
    the first, compiling, call), and with `evaluate` "evaluations" ([{"step", **metrics}]) and
    "selected_step".
  """
  if steps < 1 or log_every < 1 or steps_per_dispatch < 1:
    raise ValueError(f"[{name}] steps, log_every and steps_per_dispatch must be >= 1, got "
                     f"{steps}, {log_every}, {steps_per_dispatch}")
  if evaluate is not None and (eval_every < 1 or not select_metric):
    raise ValueError(f"[{name}] evaluation needs eval_every >= 1 and a select_metric, got "
                     f"{eval_every}, {select_metric!r}")
  if steps_per_dispatch > 1 and before_step is not None and refresh_at is None:
    raise ValueError(f"[{name}] several steps per dispatch with a before_step need "
                     f"refresh_at (the steps where it acts)")
  periods = (log_every,) + ((eval_every,) if evaluate is not None else ())
  t0 = t_compiled = time.time()
  values, evaluations, best, done, compiled_steps = {}, [], None, 0, 0
  while done < steps:
    if before_step is not None:
      params = before_step(done, params)
    count = min(steps_per_dispatch, steps - done, *(p - done % p for p in periods))
    if refresh_at is not None:
      count = next((j for j in range(1, count) if refresh_at(done + j)), count)
    group = list(itertools.islice(batches, count))
    if len(group) < count:
      break
    params, opt_state, metrics = train_step(
        params, opt_state, group if steps_per_dispatch > 1 else group[0], done)
    if done == 0:
      jax.block_until_ready(params)
      t_compiled, compiled_steps = time.time(), count
    done += count
    if evaluate is not None and (done % eval_every == 0 or done == steps):
      result = evaluate(params)
      evaluations.append({"step": done, **result})
      logging.info("[%s] step %d %s %.4f", name, done, select_metric, result[select_metric])
      if best is None or result[select_metric] < best[0]:
        best = (result[select_metric], done, jax.tree.map(jnp.copy, params))  # next step donates
    if done % log_every == 0 or done == steps:
      values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "steps"}
      if not all(np.isfinite(v) for v in values.values()):
        raise FloatingPointError(
            f"[{name}] step {done}: non-finite training metrics {values}; lower the learning "
            f"rate or check the inputs for NaN/inf")
      elapsed = time.time() - t0
      logging.info("[%s] step %d/%d %s  %.1f steps/s  ETA %.0fs", name, done, steps,
                   " ".join(f"{k} {v:.4f}" for k, v in values.items()), done / elapsed,
                   elapsed / done * (steps - done))
  if done < steps:
    raise ValueError(f"[{name}] the batch iterator ended after {done} of {steps} steps")
  # the last step always logs, so `values` holds its metrics
  jax.block_until_ready(params)
  t_end = time.time()
  stats = {"final_losses": {k: v for k, v in values.items() if k not in ("loss", "grad_norm")},
           "steps": steps, "seconds": t_end - t0,
           "steps_per_second": (steps - compiled_steps) / (t_end - t_compiled)
           if steps > compiled_steps else steps / (t_end - t0)}
  if best is not None:
    params = best[2]
    stats.update(evaluations=evaluations, selected_step=best[1])
    logging.info("[%s] kept step %d (lowest %s %.4f)", name, best[1], select_metric, best[0])
  return params, stats


def epoch_means(step_metrics: list[dict]) -> dict[str, float]:
  """Each metric's mean over an epoch's train steps. A dispatch of several updates
  (`Trainer.train_steps`) reports its real updates' means with their number `steps`, and
  counts that many times."""
  values = jax.device_get(step_metrics)
  weights = np.asarray([m.get("steps", 1) for m in values], np.float64)
  return {k: float(np.sum(weights * np.asarray([m[k] for m in values], np.float64))
                   / max(weights.sum(), 1.0))
          for k in values[0] if k != "steps"}


def _fmt(metrics: dict | None) -> str:
  if not metrics:
    return ""
  return "valid " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("@10"))
