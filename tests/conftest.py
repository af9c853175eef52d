"""Shared fixtures: a tiny synthetic dataset with learnable sequential structure."""

import os

# The tests' tiny models take longer to compile than to run: XLA:CPU's backend optimization
# level 0 compiles them about a fifth faster (cold caches: tests/test_decoding.py,
# test_unigrec.py and test_cf_model.py 246 s -> 194 s) and changes no behaviour under test.
# Read when JAX starts its CPU backend, here and in the tests' subprocesses.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import numpy as np
import pytest

from genrec_jax.config import base_config

# Every pipeline run builds fresh jitted trainers; the persistent cache lets identical
# programs compile once per test session instead of once per run.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "genrec_jax_tests_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared")


def write_synthetic(directory, num_users=240, num_items=48, length=8, seed=0, late_items=0):
  """Users walk item chains (item i is mostly followed by i + 1); returns (csv, npy) paths.

  User u is active on days u..u + length, so users spread over time (the continual split
  cuts them into periods). With `late_items`, the last quarter of the users also meet items
  num_items..num_items + late_items - 1 that nobody saw before (cold items of late periods).
  Item vectors are random: the tokenizer input carries no structure, the sequences do.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(num_users):
    item = rng.integers(num_items)
    late = late_items > 0 and u >= num_users * 3 // 4
    for t in range(length):
      shown = num_items + rng.integers(late_items) if late and rng.random() < 0.3 else item
      rows.append((f"u{u:04d}", f"i{shown:03d}", 1_400_000_000 + 86400 * (u + t)))
      item = (item + 1) % num_items if rng.random() < 0.9 else rng.integers(num_items)
  path = os.path.join(directory, "interactions.csv")
  with open(path, "w") as f:
    f.write("user,item,timestamp\n")
    f.writelines(f"{u},{i},{t}\n" for u, i, t in rows)
  vectors = rng.normal(size=(num_items + late_items, 16)).astype(np.float32)
  np.save(os.path.join(directory, "items.npy"), vectors)
  return path, os.path.join(directory, "items.npy")


def tiny_config(directory, method="tiger", late_items=0):
  """A config that trains every stage in a few seconds on the synthetic data."""
  csv_path, npy_path = write_synthetic(directory, late_items=late_items)
  c = base_config()
  c.method = method
  c.data.name = "synthetic"
  c.data.path = csv_path
  c.data.max_history = 8
  c.embeddings.source = "file"
  c.embeddings.file = npy_path
  c.sasrec.update(hidden_dim=8, epochs=2, eval_every=1, batch_size=64, max_len=8)
  c.tokenizer.update(hidden_dims=(16,), latent_dim=8, num_levels=2, codebook_size=8,
                     dedup_size=16, train_length=60, train_unit="steps", batch_size=32,
                     kmeans_iterations=5)
  c.grm.update(d_model=16, d_ff=32, num_heads=2, d_kv=8, num_encoder_layers=1,
               num_decoder_layers=1, learning_rate=1e-2, warmup_steps=5, batch_size=64,
               eval_batch_size=64, beam_size=20, length_buckets=(8,), epochs=12,
               eval_every=2, patience=10)
  c.continual.update(cf_finetune_epochs=1, finetune_epochs=2, finetune_eval_every=1,
                     patience=2, retrain_epochs=2)
  c.continual.dact.update(steps=20, batch_size=32, log_every=10)
  if method == "continual":  # structure and resume tests: period 0 needs no accuracy
    c.tokenizer.cf_weight = 0.02
    c.grm.epochs = 8
  return c


@pytest.fixture
def shared_dir():
  if not os.path.isdir(SHARED):
    pytest.skip(f"shared reference material not found at {SHARED}")
  return SHARED


def interrupt_then_resume(monkeypatch, run, stage, epoch, call=1):
  """Runs `run()` with the `call`-th epoch loop of `stage` stopping after `epoch` (a simulated
  crash after that epoch's checkpoint), then `run()` again in the same workdir; returns the
  resumed run's result."""
  from genrec_jax.training import loop
  real_fit, calls = loop.fit, []

  def crashing_fit(**kwargs):
    if kwargs["name"] == stage:
      calls.append(1)
      if len(calls) == call:
        kwargs["interrupt_after_epoch"] = epoch
    return real_fit(**kwargs)

  monkeypatch.setattr(loop, "fit", crashing_fit)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(loop, "fit", real_fit)
  return run()
