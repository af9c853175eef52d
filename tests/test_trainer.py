"""The shared trainer: parameter groups with their own optimizers, frozen groups, checks."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from genrec_jax.data.batching import item_batches
from genrec_jax.training.loop import LoopConfig, fit_steps
from genrec_jax.training.optim import make_optimizer
from genrec_jax.training.sharding import make_mesh, shard_batch
from genrec_jax.training.trainer import Trainer


class TwoParts(nnx.Module):
  """y = b(a(x)): two parameter groups, `a` and `b`."""

  def __init__(self):
    self.a = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(4, 1, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.b(self.a(x))


def squared_error(model, batch, key, context):
  error = model(batch["x"])[:, 0] * context["scale"] - batch["y"]
  return jnp.mean(error ** 2), {"max_error": jnp.abs(error).max()}


def _batch(rows=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(rows, 3)).astype(np.float32),
          "y": rng.normal(size=rows).astype(np.float32)}


def _numpy_sgd_step(params, batch, lr, scale, groups):
  """One SGD step on the squared error, gradients by hand (the independent reference)."""
  x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
  wa, ba, wb, bb = (np.asarray(params[k], np.float64) for k in ("wa", "ba", "wb", "bb"))
  h = x @ wa + ba
  out = (h @ wb + bb)[:, 0] * scale
  d_out = 2 * (out - y) / len(y) * scale  # [B]
  grads = {"wb": h.T @ d_out[:, None], "bb": np.array([d_out.sum()])}
  d_h = d_out[:, None] @ wb.T
  grads.update(wa=x.T @ d_h, ba=d_h.sum(0))
  new = dict(params)
  for name in grads:
    if name[1] in groups:
      new[name] = params[name] - lr[name[1]] * grads[name]
  return new


def _flat(trainer, params):
  model = trainer.merge(params)
  return {"wa": np.asarray(model.a.kernel[...]), "ba": np.asarray(model.a.bias[...]),
          "wb": np.asarray(model.b.kernel[...]), "bb": np.asarray(model.b.bias[...])}


def test_each_group_steps_with_its_own_optimizer_and_frozen_groups_stay_put():
  mesh = make_mesh()
  lr = {"a": 0.1, "b": 0.01}
  trainer = Trainer(TwoParts(), squared_error, {g: optax.sgd(lr[g]) for g in lr}, mesh)
  batch, context = _batch(), {"scale": jnp.float32(2.0)}
  sharded = shard_batch(batch, mesh)
  params = jax.tree.map(jnp.copy, trainer.init_params)
  before = _flat(trainer, params)
  opt_state = trainer.init_opt_state(params)
  params, opt_state, metrics = trainer.train_step(params, opt_state, sharded,
                                                  jax.random.key(0), context)
  expected = _numpy_sgd_step(before, batch, lr, 2.0, ("a", "b"))
  for name, value in _flat(trainer, params).items():
    np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)
  assert set(metrics) == {"loss", "grad_norm", "max_error"}

  start = _flat(trainer, params)
  params, opt_state, _ = trainer.train_step(params, opt_state, sharded, jax.random.key(1),
                                            context, trainable=("b",))
  expected = _numpy_sgd_step(start, batch, lr, 2.0, ("b",))
  after = _flat(trainer, params)
  np.testing.assert_array_equal(after["wa"], start["wa"])  # frozen: bit for bit
  np.testing.assert_array_equal(after["ba"], start["ba"])
  np.testing.assert_allclose(after["wb"], expected["wb"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="trainable groups"):
    trainer.train_step(params, opt_state, sharded, jax.random.key(2), context, trainable=("c",))


def test_steps_in_one_dispatch_follow_sgd_and_filler_steps_change_nothing():
  mesh = make_mesh()
  lr = {"a": 0.1, "b": 0.01}
  trainer = Trainer(TwoParts(), squared_error, {g: optax.sgd(lr[g]) for g in lr}, mesh)
  batches, context = [_batch(seed=s) for s in range(3)], {"scale": jnp.float32(2.0)}
  filler = {"x": np.full((8, 3), np.nan, np.float32), "y": np.zeros(8, np.float32)}
  stacked = {k: np.stack([b[k] for b in batches + [filler]]) for k in ("x", "y")}
  stacked["step_ids"] = np.array([0, 1, 2, -1], np.int32)
  params = jax.tree.map(jnp.copy, trainer.init_params)
  expected, losses = _flat(trainer, params), []
  for batch in batches:  # the reference: three SGD steps one after the other, by hand
    out = ((batch["x"] @ expected["wa"] + expected["ba"]) @ expected["wb"] + expected["bb"])
    losses.append(np.mean((out[:, 0] * 2.0 - batch["y"]) ** 2))
    expected = _numpy_sgd_step(expected, batch, lr, 2.0, ("a", "b"))
  params, _, metrics = trainer.train_steps(params, trainer.init_opt_state(params), stacked,
                                           jax.random.key(0), context)
  for name, value in _flat(trainer, params).items():  # the NaN filler step was skipped
    np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)
  assert int(metrics["steps"]) == 3  # the filler step is neither applied nor averaged
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)


def test_a_dispatch_equals_single_steps_with_their_keys_and_optimizer_state():
  """AdamW (stateful) and a keyed objective: the scan's steps against `train_step` calls with
  the keys fold_in(key, step_id); a filler step touches neither parameters nor moments."""
  mesh = make_mesh()

  def noisy_error(model, batch, key, context):
    noise = 0.1 * jax.random.normal(key, batch["y"].shape)
    return jnp.mean((model(batch["x"])[:, 0] - batch["y"] - noise) ** 2), {}

  trainer = Trainer(TwoParts(), noisy_error, optax.adamw(0.05), mesh)
  batches, key = [_batch(seed=s) for s in range(3)], jax.random.key(7)
  stacked = {k: np.stack([b[k] for b in batches + batches[:1]]) for k in ("x", "y")}
  stacked["step_ids"] = np.array([4, 9, 5, -1], np.int32)
  params = jax.tree.map(jnp.copy, trainer.init_params)
  opt_state = trainer.init_opt_state(params)
  for batch, step_id in zip(batches, (4, 9, 5)):
    params, opt_state, _ = trainer.train_step(params, opt_state, batch,
                                              jax.random.fold_in(key, step_id))
  expected = jax.tree.leaves((params, opt_state))
  params = jax.tree.map(jnp.copy, trainer.init_params)
  params, opt_state, _ = trainer.train_steps(params, trainer.init_opt_state(params), stacked,
                                             key)
  for a, b in zip(jax.tree.leaves((params, opt_state)), expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_epoch_means_weight_a_dispatch_by_its_updates():
  from genrec_jax.training.loop import epoch_means
  metrics = [{"loss": 1.0}, {"loss": np.float32(4.0), "steps": 3}]
  assert epoch_means(metrics) == {"loss": (1.0 + 3 * 4.0) / 4}


def test_every_variable_must_belong_to_a_group():
  with pytest.raises(ValueError, match="outside the parameter groups"):
    Trainer(TwoParts(), squared_error, {"a": optax.sgd(0.1)}, make_mesh())


def test_fit_alternates_groups_by_epoch_and_stops_on_non_finite_loss(tmp_path):
  mesh = make_mesh()
  trainer = Trainer(TwoParts(), squared_error, {"a": optax.adam(1e-2), "b": optax.adam(1e-2)},
                    mesh)
  batch = shard_batch(_batch(), mesh)
  seen = []

  def schedule(epoch):
    seen.append(epoch)
    return ("a",) if epoch % 2 == 0 else ("b",)

  start = _flat(trainer, trainer.init_params)
  params, state = trainer.fit(
      name="toy", epoch_batches=lambda epoch: [(batch, 8)], evaluate=lambda p: {"ndcg@10": 0.0},
      loop_cfg=LoopConfig(epochs=1, eval_every=1), checkpoint_dir=str(tmp_path / "a"),
      context={"scale": jnp.float32(1.0)}, trainable=schedule)
  one_epoch = _flat(trainer, params)
  assert seen == [0] and state["history"][0]["grad_norm"] > 0
  assert not np.array_equal(one_epoch["wa"], start["wa"])
  np.testing.assert_array_equal(one_epoch["wb"], start["wb"])  # epoch 0 trains `a` only

  with pytest.raises(FloatingPointError, match="non-finite"):
    trainer.fit(name="toy", epoch_batches=lambda epoch: [(batch, 8)],
                evaluate=lambda p: {"ndcg@10": 0.0}, loop_cfg=LoopConfig(epochs=1),
                checkpoint_dir=str(tmp_path / "b"), context={"scale": jnp.float32(np.nan)})


def test_fit_steps_keeps_the_lowest_scoring_step_refreshes_before_steps_and_stops_on_nan():
  mesh = make_mesh()
  trainer = Trainer(TwoParts(), squared_error, optax.sgd(0.05), mesh)
  batch = shard_batch(_batch(), mesh)
  context = {"scale": jnp.float32(1.0)}
  refreshed, snapshots = [], {}

  def before_step(step, params):
    refreshed.append(step)
    return params

  def evaluate(params):  # a score that is lowest at step 4 of 6, not at the last step
    step = len(snapshots) * 2 + 2
    snapshots[step] = _flat(trainer, params)
    return {"distance": abs(step - 4.0)}

  params, stats = fit_steps(
      name="toy", params=jax.tree.map(jnp.copy, trainer.init_params),
      opt_state=trainer.init_opt_state(trainer.init_params),
      train_step=lambda p, o, b, step: trainer.train_step(p, o, b, None, context),
      batches=iter([batch] * 10), steps=6, log_every=4, before_step=before_step,
      evaluate=evaluate, eval_every=2, select_metric="distance")
  assert refreshed == list(range(6)) and sorted(snapshots) == [2, 4, 6]
  assert stats["selected_step"] == 4 and [e["step"] for e in stats["evaluations"]] == [2, 4, 6]
  assert stats["steps"] == 6 and stats["steps_per_second"] > 0
  assert set(stats["final_losses"]) == {"max_error"}
  for name, value in _flat(trainer, params).items():
    np.testing.assert_array_equal(value, snapshots[4][name])
  assert not np.array_equal(snapshots[4]["wa"], snapshots[6]["wa"])

  with pytest.raises(FloatingPointError, match="step 2: non-finite"):
    fit_steps(name="toy", params=jax.tree.map(jnp.copy, trainer.init_params),
              opt_state=trainer.init_opt_state(trainer.init_params),
              train_step=lambda p, o, b, step: trainer.train_step(
                  p, o, b, None, {"scale": jnp.float32(np.nan)}),
              batches=iter([batch] * 3), steps=3, log_every=2)


def test_item_batches_cover_each_pass_once_and_drop_the_partial_batch():
  batches = item_batches(10, 4, seed=3)
  first_pass = [next(batches) for _ in range(2)]  # 10 items: two batches of 4, 2 dropped
  assert all(len(b) == 4 for b in first_pass)
  assert len(set(np.concatenate(first_pass))) == 8
  again = item_batches(10, 4, seed=3)
  np.testing.assert_array_equal(np.concatenate([next(again) for _ in range(2)]),
                                np.concatenate(first_pass))
  assert len(next(item_batches(3, 8, seed=0))) == 3  # fewer items than a batch: one full pass


def test_fit_refreshes_after_each_epoch_before_evaluation_and_records_the_stats(tmp_path):
  mesh = make_mesh()
  trainer = Trainer(TwoParts(), squared_error, {"a": optax.adam(1e-2), "b": optax.adam(1e-2)},
                    mesh)
  batch = shard_batch(_batch(), mesh)
  evaluated = []

  def refresh(epoch, params):  # a method's per-epoch refresh: here, reset `b`'s kernel
    params = dict(params)
    params["b"] = jax.tree.map(jnp.zeros_like, params["b"])
    return params, {"refreshed_after": epoch}

  def evaluate(params):
    evaluated.append(float(np.abs(_flat(trainer, params)["wb"]).sum()))
    return {"ndcg@10": float(len(evaluated))}

  params, state = trainer.fit(
      name="toy", epoch_batches=lambda epoch: [(batch, 8)], evaluate=evaluate,
      loop_cfg=LoopConfig(epochs=2, eval_every=1), checkpoint_dir=str(tmp_path / "a"),
      context={"scale": jnp.float32(1.0)}, after_epoch=refresh)
  assert [h["refreshed_after"] for h in state["history"]] == [0, 1]
  assert evaluated == [0.0, 0.0]  # evaluation sees the refreshed parameters
  np.testing.assert_array_equal(_flat(trainer, params)["wb"], 0.0)  # and so do the results


def test_fit_saves_by_time_resumes_from_its_last_save_and_ends_with_the_best_only(tmp_path):
  """checkpoint_seconds spaces the saves: a crash between two saves resumes from the earlier
  one and replays the epochs after it to the uninterrupted result. The last epoch's
  checkpoint holds the best parameters alone, which a later call restores without training."""
  from genrec_jax.training.checkpoint import Checkpoints
  mesh = make_mesh()
  trainer = Trainer(TwoParts(), squared_error, {"a": optax.adam(1e-2), "b": optax.adam(1e-2)},
                    mesh)
  batch, scores = shard_batch(_batch(), mesh), [1.0, 3.0, 5.0, 2.0, 4.0]  # best: epoch 2
  trained, crash_at = [], []

  def epoch_batches(epoch):
    trained.append(epoch)
    return [(batch, 8)]

  def evaluate(params):
    if trained[-1] in crash_at:
      crash_at.clear()
      raise KeyboardInterrupt("crash before the epoch's checkpoint")
    return {"ndcg@10": scores[trained[-1]]}

  def fit(directory, checkpoint_seconds, interrupt_after_epoch=None):
    return trainer.fit(name="toy", epoch_batches=epoch_batches, evaluate=evaluate,
                       loop_cfg=LoopConfig(epochs=5, checkpoint_seconds=checkpoint_seconds),
                       checkpoint_dir=str(directory), context={"scale": jnp.float32(1.0)},
                       interrupt_after_epoch=interrupt_after_epoch)

  straight, state = fit(tmp_path / "straight", 0.0)
  assert state["best_epoch"] == 2 and trained == [0, 1, 2, 3, 4]
  saved = Checkpoints(str(tmp_path / "straight"), ("params", "opt_state", "best_params"))
  assert saved.manager.all_steps() == [3, 4]  # max_to_keep
  assert saved.stored_items(3) == ("params", "opt_state", "best_params")
  assert saved.stored_items(4) == ("best_params",)
  saved.close()

  cut = tmp_path / "cut"
  trained.clear()
  with pytest.raises(KeyboardInterrupt):  # the hook saves epoch 1 whatever the period
    fit(cut, 1e9, interrupt_after_epoch=1)
  crash_at.append(3)
  with pytest.raises(KeyboardInterrupt):  # no save at epochs 2-3 within the period
    fit(cut, 1e9)
  resumed, resumed_state = fit(cut, 1e9)
  assert trained == [0, 1, 2, 3, 2, 3, 4]
  assert [h["loss"] for h in resumed_state["history"]] == [h["loss"] for h in state["history"]]
  assert resumed_state["best_epoch"] == 2
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  trained.clear()
  again, _ = fit(cut, 1e9)  # finished: restored, nothing trained
  assert trained == []
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_warms_up_linearly_then_follows_a_cosine_to_zero():
  opt = make_optimizer(1.0, weight_decay=0.0, warmup_steps=2, grad_clip=0.0, decay_steps=4)
  params = jnp.zeros(3)
  state = opt.init(params)
  rates = []
  for _ in range(7):  # a constant gradient: each Adam update is -lr(t) (up to eps)
    updates, state = opt.update(jnp.ones(3), state, params)
    rates.append(-float(updates[0]))
  expected = [0.0, 0.5] + [0.5 * (1 + np.cos(np.pi * t / 4)) for t in range(4)] + [0.0]
  np.testing.assert_allclose(rates, expected, atol=1e-5)


class Counted(nnx.Module):
  """A linear model and a statistics group the objective writes: rows seen per target."""

  def __init__(self):
    self.model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    self.stats = nnx.Variable(jnp.zeros((4,), jnp.float32))


def counting_loss(model, batch, key, context):
  model.stats[...] = model.stats[...].at[batch["target"]].add(1.0)
  return jnp.mean((model.model(batch["x"])[:, 0] - batch["y"]) ** 2), {}


def test_written_groups_keep_what_the_objective_assigns_in_single_and_scanned_steps():
  mesh = make_mesh()
  trainer = Trainer(Counted(), counting_loss, {"model": optax.sgd(0.1),
                                               "stats": optax.set_to_zero()}, mesh,
                    written=("stats",))
  batch = {**_batch(), "target": np.array([0, 1, 1, 3, 3, 3, 0, 0])}
  params = trainer.init_params
  opt_state = trainer.init_opt_state(params)
  params, opt_state, _ = trainer.train_step(params, opt_state, shard_batch(batch, mesh),
                                            jax.random.key(0), trainable=("model",))
  stacked = {k: np.stack([v, v]) for k, v in batch.items()}
  stacked["step_ids"] = np.array([1, -1], np.int32)  # one real step, one filler
  params, opt_state, _ = trainer.train_steps(params, opt_state, stacked, jax.random.key(0),
                                             trainable=("model",))
  counts = np.asarray(trainer.merge(params).stats[...])
  np.testing.assert_array_equal(counts, 2 * np.bincount(batch["target"], minlength=4))
  with pytest.raises(ValueError, match="written by the objective"):
    trainer.train_step(params, opt_state, shard_batch(batch, mesh), jax.random.key(0))


_CONCURRENT_COLLECTIVES = r"""
import os, sys
from genrec_jax.training.sharding import use_cpu_devices
use_cpu_devices(int(sys.argv[1]))
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from genrec_jax.training.sharding import make_mesh
mesh = make_mesh()
split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

@jax.jit
def gather(x, s):  # an all-gather
  y = jax.lax.with_sharding_constraint(x * s, whole)
  return jax.lax.with_sharding_constraint(jnp.tanh(y @ y.T)[: x.shape[0]] @ x, split)

@jax.jit
def reduce(x, s):  # an all-reduce
  return x * 0.5 + jnp.mean(jnp.tanh(x * s), axis=0, keepdims=True)

chains = [jax.device_put(jnp.full((128, 128), (i + 1) / 10), split) for i in range(4)]
for step in range(60):  # four independent chains, never waited on: programs overlap
  chains = [(gather, reduce)[(step + i) % 2](x, 1.0 + i / 4) for i, x in enumerate(chains)]
jax.block_until_ready(chains)
print(jax.device_count(), os.environ.get("PJRT_NPROC", 0))
"""


@pytest.mark.parametrize("devices", [2, 4])
def test_cpu_devices_survive_concurrent_collectives(devices):
  """Independent multi-device programs in flight at once finish on CPU devices.

  With XLA:CPU's default pool (one thread per core) this aborts on a 2-core machine after
  40 s in XLA's rendezvous ("Termination timeout for all gather"), as a continual LC-Rec run
  did (experiments/dact_lcrec_toys_cpu); `use_cpu_devices` sizes the pool so that it finishes.
  (On a machine with at least 2 x `devices` cores the default pool already suffices.)"""
  env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _CONCURRENT_COLLECTIVES, str(devices)], env=env,
                       cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  count, threads = map(int, out.stdout.split())
  assert count == devices and threads >= 2 * devices
