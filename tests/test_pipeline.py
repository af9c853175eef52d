"""End-to-end runs on a tiny synthetic dataset: outputs, determinism, resume, devices."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from genrec_jax import methods
from tests.conftest import TEST_XLA_FLAGS, interrupt_then_resume, tiny_config

METRICS = {"recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"}


def test_tiger_run_writes_results_and_unique_identifiers(tmp_path):
  config = tiny_config(str(tmp_path))
  results = methods.run(config, str(tmp_path / "run"))
  on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
  assert on_disk["method"] == "tiger"
  assert on_disk["dataset"] == {"name": "synthetic", "users": 240, "items": 48,
                                "interactions": 1920}
  assert set(on_disk["metrics"]["test"]) == METRICS
  assert set(on_disk["timing"]) >= {"data", "tokenizer", "grm_train", "grm_eval", "total"}
  assert on_disk["config"]["grm"]["d_model"] == 16
  # The synthetic chains are easy: a trained model must beat random ranking (20/48) clearly.
  assert results["metrics"]["test"]["recall@20"] > 0.6
  with open(tmp_path / "run" / "identifiers.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["item", "code_1", "code_2", "dedup"]
  assert len(rows) == 48
  assert len({tuple(r.values())[1:] for r in rows}) == 48


def test_letter_and_sasrec_methods_run(tmp_path):
  config = tiny_config(str(tmp_path), method="letter")
  config.tokenizer.cf_weight = 0.02
  config.tokenizer.diversity_weight = 1e-4
  config.tokenizer.diversity_groups = 3
  config.tokenizer.sinkhorn_epsilon = 0.003
  config.tokenizer.update(selection="min_collision", eval_every=20)
  results = methods.run(config, str(tmp_path / "letter"))
  assert [e["step"] for e in results["tokenizer"]["collision_evaluations"]] == [20, 40, 60]
  rates = [e["collision_rate"] for e in results["tokenizer"]["collision_evaluations"]]
  assert results["tokenizer"]["collision_rate"] == pytest.approx(min(rates))
  assert set(results["baselines"]["sasrec"]["test"]) == METRICS
  config = tiny_config(str(tmp_path), method="sasrec")
  results = methods.run(config, str(tmp_path / "sasrec"))
  assert set(results["metrics"]["test"]) == METRICS


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
  config = tiny_config(str(tmp_path))
  reference = methods.run(config, str(tmp_path / "straight"))

  resumed = interrupt_then_resume(
      monkeypatch, lambda: methods.run(config, str(tmp_path / "resumed")), "grm", epoch=1)
  assert resumed["metrics"]["test"] == reference["metrics"]["test"]
  assert [h["loss"] for h in resumed["grm_history"]] == [
      h["loss"] for h in reference["grm_history"]]


def test_checkpoint_of_another_model_fails_loudly(tmp_path):
  config = tiny_config(str(tmp_path))
  config.grm.epochs = 1
  methods.run(config, str(tmp_path / "run"))
  config.grm.d_ff = 64
  config.grm.epochs = 2
  # The workdir remembers its config and names what changed ...
  with pytest.raises(ValueError, match=r"grm.d_ff: 32 -> 64; grm.epochs: 1 -> 2"):
    methods.run(config, str(tmp_path / "run"))
  # ... and without that record, the checkpoint itself refuses the other model.
  os.remove(tmp_path / "run" / "config.json")
  from genrec_jax.training.checkpoint import CheckpointMismatchError
  with pytest.raises(CheckpointMismatchError, match="does not match the model"):
    methods.run(config, str(tmp_path / "run"))


_MULTI_DEVICE = r"""
import json, sys
import jax
from genrec_jax import methods
from genrec_jax.training.sharding import use_cpu_devices
from tests.conftest import tiny_config
config = tiny_config(sys.argv[1])
config.cpu_devices = int(sys.argv[2])
use_cpu_devices(config.cpu_devices)
config.grm.epochs = 2
config.tokenizer.train_length = 20
config.tokenizer.train_unit = "steps"
res = methods.run(config, sys.argv[1] + "/run")
print(json.dumps({"devices": jax.device_count(),
                  "losses": [h["loss"] for h in res["grm_history"]]}))
"""


def _run_with_devices(tmp_path, n):
  """The tiny pipeline in a fresh process whose CPU is split into n devices (`cpu_devices`)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the device count comes from cpu_devices alone
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.makedirs(tmp_path / f"d{n}")
  out = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, str(tmp_path / f"d{n}"), str(n)],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_training_on_one_and_eight_devices(tmp_path):
  """`cpu_devices` splits the host into devices; the batch is split over them (the tokenizer's
  too) with the same numbers up to summation order."""
  one = _run_with_devices(tmp_path, 1)
  eight = _run_with_devices(tmp_path, 8)
  assert one["devices"] == 1 and eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-4)


def _tiny_grm(buckets, steps_per_dispatch=1, epochs=3, dropout_rate=0.0):
  """A 1+1-layer T5 trainer, a 30-item table and 200 random samples."""
  from genrec_jax.data.splits import SampleSet
  from genrec_jax.recommenders.t5 import T5Config
  from genrec_jax.tokenizers.identifiers import assign_dedup, one_to_one_table
  from genrec_jax.training.grm import GRMTrainConfig, GRMTrainer
  from genrec_jax.training.loop import LoopConfig
  from genrec_jax.training.sharding import make_mesh
  rng = np.random.default_rng(0)
  num_items = 30
  table = one_to_one_table(assign_dedup(rng.integers(0, 4, (num_items, 2)), 8), 4, 8)
  lengths = rng.integers(1, 5, 200)
  history = np.where(np.arange(4)[None, :] >= 4 - lengths[:, None],
                     rng.integers(0, num_items, (200, 4)), -1).astype(np.int32)
  samples = SampleSet(history=history, target=rng.integers(0, num_items, 200).astype(np.int32),
                      user=np.arange(200, dtype=np.int32))
  trainer = GRMTrainer(T5Config(vocab_size=table.vocab_size, d_model=16, d_ff=32, num_heads=2,
                                d_kv=8, num_encoder_layers=1, num_decoder_layers=1,
                                dropout_rate=dropout_rate),
                       GRMTrainConfig(batch_size=32, eval_batch_size=32, beam_size=5,
                                      length_buckets=buckets,
                                      steps_per_dispatch=steps_per_dispatch,
                                      loop=LoopConfig(epochs=epochs, eval_every=epochs)),
                       make_mesh())
  return trainer, table, num_items, samples


@pytest.mark.parametrize("steps_per_dispatch", [1, 3])
def test_train_step_compiles_once_per_length_bucket(tmp_path, steps_per_dispatch):
  """Every batch (or dispatch of stacked batches) has one of len(buckets) shapes, so the
  jitted step traces at most that many times over several epochs (a retrace would recompile
  on every accelerator)."""
  import chex
  import jax
  buckets = (2, 4)
  trainer, table, num_items, samples = _tiny_grm(buckets, steps_per_dispatch)
  core = trainer.trainer
  name = "_train_step" if steps_per_dispatch == 1 else "_train_steps"
  counted = jax.jit(chex.assert_max_traces(getattr(core, name), n=len(buckets)),
                    donate_argnums=(0, 1), static_argnames=("trainable",))
  setattr(core, "_step" if steps_per_dispatch == 1 else "_steps", counted)
  _, state = trainer.train(table, num_items, samples, samples, str(tmp_path / "ckpt"))
  assert state["epoch"] == 2


def test_several_steps_per_dispatch_train_as_single_steps(tmp_path):
  """With one length bucket the dispatches of 3 stacked batches hold the epoch's batches in
  their shuffled order (the last dispatch padded with filler steps), each with its dropout key:
  the same updates as one batch per call, so the same losses, validation metrics and
  parameters."""
  import jax
  runs = []
  for k in (1, 3):
    trainer, table, num_items, samples = _tiny_grm((4,), k, epochs=2, dropout_rate=0.3)
    params, state = trainer.train(table, num_items, samples, samples, str(tmp_path / f"k{k}"))
    runs.append((jax.tree.leaves(params), state["history"]))
  (params1, hist1), (params3, hist3) = runs
  assert -(-len(samples) // 32) % 3 != 0  # the last dispatch carries filler steps
  for a, b in zip(hist1, hist3):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  assert hist1[-1]["valid"] == pytest.approx(hist3[-1]["valid"], abs=1e-6)
  for a, b in zip(params1, params3):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
