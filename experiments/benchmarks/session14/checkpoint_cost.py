"""Seconds per save of `genrec_jax.training.checkpoint.Checkpoints` by item and array count.

Usage (from the repository root): python experiments/benchmarks/session14/checkpoint_cost.py
Prints one JSON line per case: the median of 6 saves (after a first, warming one) of `items`
items holding `arrays` float32 [64, 64] arrays each.
"""

import json
import statistics
import sys
import tempfile
import time

import jax.numpy as jnp

sys.path.insert(0, ".")
from genrec_jax.training.checkpoint import Checkpoints  # noqa: E402

NAMES = ("params", "opt_state", "best_params")

for items, arrays in ((0, 0), (1, 1), (1, 40), (1, 120), (3, 40)):
  tree = {f"w{i}": jnp.ones((64, 64)) for i in range(arrays)}
  with tempfile.TemporaryDirectory() as directory:
    store = Checkpoints(directory, NAMES[:items])
    seconds = []
    for step in range(7):
      start = time.perf_counter()
      store.save(step, {name: tree for name in NAMES[:items]}, {"step": step})
      seconds.append(time.perf_counter() - start)
    store.close()
  print(json.dumps({"items": items, "arrays_per_item": arrays,
                    "median_save_s": round(statistics.median(seconds[1:]), 4)}))
