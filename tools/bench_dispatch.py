"""Per-step overhead of the training loops: steps/s of models with no compute.

On an accelerator a small T5 step is a few milliseconds of compute, and what the host does per
step (batch gathering, a transfer, a Python dispatch, metric bookkeeping) can dominate it. This
benchmark makes the models negligible and measures training steps/s through the library's own
loops, with K updates per compiled call (`Trainer.train_steps`, a `lax.scan` over K stacked
batches; K = 1 is one call per batch); 1 / (steps/s) is then the time a loop spends per update
beyond the model itself:
  grm: `GRMTrainer.train` (the epoch loop of every recommender), a 1+1-layer T5 of width 8 on
    batches of 8 histories of 4 items; `--epochs` epochs of `--steps` updates, the first
    (compiling) epoch dropped, the median of the others;
  tokenizer: `train_tokenizer` (the step loop), an RQ-VAE of width 8 on batches of 64 items;
    `--steps` updates, the rate after the first (compiling) call.

  python tools/bench_dispatch.py --json_out experiments/benchmarks/dispatch_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from genrec_jax.data.splits import SampleSet  # noqa: E402
from genrec_jax.recommenders.t5 import T5Config  # noqa: E402
from genrec_jax.tokenizers.identifiers import assign_dedup, one_to_one_table  # noqa: E402
from genrec_jax.tokenizers.rqvae import RQVAEConfig  # noqa: E402
from genrec_jax.training.grm import GRMTrainConfig, GRMTrainer  # noqa: E402
from genrec_jax.training.loop import LoopConfig  # noqa: E402
from genrec_jax.training.sharding import make_mesh  # noqa: E402
from genrec_jax.training.tokenizer import TokenizerTrainConfig, train_tokenizer  # noqa: E402

BATCH, SLOTS, ITEMS = 8, 4, 64


def random_samples(count: int, seed: int = 0) -> SampleSet:
  rng = np.random.default_rng(seed)
  return SampleSet(history=rng.integers(0, ITEMS, (count, SLOTS)).astype(np.int32),
                   target=rng.integers(0, ITEMS, count).astype(np.int32),
                   user=np.arange(count, dtype=np.int32))


def steps_per_second(steps_per_dispatch: int, steps: int, epochs: int) -> dict:
  """Trains the no-compute model; the per-epoch update rates after the compiling epoch."""
  rng = np.random.default_rng(0)
  table = one_to_one_table(assign_dedup(rng.integers(0, 8, (ITEMS, 2)), 16), 8, 16)
  trainer = GRMTrainer(
      T5Config(vocab_size=table.vocab_size, d_model=8, d_ff=8, num_heads=1, d_kv=8,
               num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0),
      GRMTrainConfig(batch_size=BATCH, eval_batch_size=BATCH, beam_size=2,
                     length_buckets=(SLOTS,), steps_per_dispatch=steps_per_dispatch,
                     loop=LoopConfig(epochs=epochs, eval_every=epochs)), make_mesh())
  with tempfile.TemporaryDirectory() as workdir:
    _, state = trainer.train(table, ITEMS, random_samples(steps * BATCH),
                             random_samples(BATCH, seed=1), workdir)
  rates = [r["samples_per_s"] / BATCH for r in state["history"][1:]]
  return {"steps_per_dispatch": steps_per_dispatch, "steps_per_s": float(np.median(rates)),
          "epochs_steps_per_s": rates,
          "us_per_step": 1e6 / float(np.median(rates))}


def tokenizer_steps_per_second(steps_per_dispatch: int, steps: int) -> dict:
  """Trains the no-compute tokenizer `steps` updates; the rate after the compiling call."""
  features = np.random.default_rng(0).normal(size=(1024, 8)).astype(np.float32)
  _, stats = train_tokenizer(
      RQVAEConfig(input_dim=8, hidden_dims=(8,), latent_dim=8, num_levels=2, codebook_size=8),
      TokenizerTrainConfig(length=steps, unit="steps", batch_size=64, kmeans_iterations=2,
                           log_every=steps, steps_per_dispatch=steps_per_dispatch), features)
  return {"steps_per_dispatch": steps_per_dispatch, "steps_per_s": stats["steps_per_second"],
          "us_per_step": 1e6 / stats["steps_per_second"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dispatch", default="1,4,16,64", help="K values, comma-separated")
  parser.add_argument("--steps", type=int, default=1024, help="updates per epoch")
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  ks = [int(k) for k in args.dispatch.split(",")]
  rows = ([{"loop": "grm", **steps_per_second(k, args.steps, args.epochs)} for k in ks]
          + [{"loop": "tokenizer", **tokenizer_steps_per_second(k, args.steps * args.epochs)}
             for k in ks])
  print("| loop | steps per dispatch | train steps/s | us per step |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['loop']} | {r['steps_per_dispatch']} | {r['steps_per_s']:.0f} | "
          f"{r['us_per_step']:.0f} |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"backend": jax.default_backend(), "devices": jax.device_count(),
                 "jax": jax.__version__, "steps_per_epoch": args.steps, "epochs": args.epochs,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
