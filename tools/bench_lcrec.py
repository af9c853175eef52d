"""Step time and memory of the LC-Rec recommender (Qwen2 + LoRA) at a given size.

Builds a randomly initialised backbone (no checkpoint needed: speed and memory do not depend on
the weights), an identifier table of the Toys catalog's shape (3 levels of 256 codes + a dedup
digit, 11,924 items), and full-length prompts (20 history items, the protocol's maximum: the
longest step), then measures, after ahead-of-time compilation:
  - the train step (LoRA adapters and identifier rows trained, base frozen): median seconds per
    step over --steps steps, samples/s and prompt tokens/s;
  - the ranking step (prefill + trie-constrained beam search, beam 20) on --eval_batch users;
  - memory: XLA's memory analysis of both compiled programs and, on a GPU, the device's peak
    bytes in use (`memory_stats`; None on CPU).

Usage (the paper's size needs an accelerator; `--size=tiny` runs anywhere in seconds):
  python tools/bench_lcrec.py --size=paper --dtype=bfloat16 --out=lcrec_bench.json

It imports neither ml_collections nor the data files, so it runs on the device machine from the
repository alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genrec_jax.decoding.trie import search_trie, trie_capacity  # noqa: E402
from genrec_jax.recommenders.lcrec import word_prompt_tokens  # noqa: E402
from genrec_jax.recommenders.lora import LoRAConfig  # noqa: E402
from genrec_jax.recommenders.qwen2 import Qwen2, Qwen2Config  # noqa: E402
from genrec_jax.tokenizers.identifiers import IdentifierTable, assign_dedup  # noqa: E402
from genrec_jax.training.grm import GRMTrainConfig  # noqa: E402
from genrec_jax.training.lcrec import FINE_TUNED, LCRecTrainer  # noqa: E402
from genrec_jax.training.sharding import make_mesh, replicate, shard_batch  # noqa: E402

SIZES = {  # Qwen2.5-1.5B-Instruct; the cpu preset's backbone; a test size
    "paper": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                  num_heads=12, num_kv_heads=2, rope_theta=1e6),
    "cpu": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, rope_theta=1e4),
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                 num_heads=2, num_kv_heads=1, rope_theta=1e4),
}


def _timed(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - start)
  return out


def _memory(compiled) -> dict | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return {k: int(getattr(analysis, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
      "generated_code_size_in_bytes") if hasattr(analysis, k)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="paper")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  parser.add_argument("--param_sharding", choices=("replicated", "fsdp"), default="replicated")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--eval_batch", type=int, default=32)
  parser.add_argument("--history", type=int, default=20)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--items", type=int, default=11924)
  parser.add_argument("--prompt", choices=("lcrec", "identifiers"), default="lcrec")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  cfg = Qwen2Config(**SIZES[args.size], dtype=args.dtype, param_dtype=args.dtype)
  rng = np.random.default_rng(0)
  codes = assign_dedup(rng.integers(0, 256, (args.items, 3)), 256)
  table = IdentifierTable(codes, np.arange(args.items, dtype=np.int32), (256, 256, 256, 256))
  mesh = make_mesh()
  t0 = time.perf_counter()
  trainer = LCRecTrainer(Qwen2(cfg, rngs=nnx.Rngs(0)), table.vocab_size - 1,
                         word_prompt_tokens(cfg.vocab_size, args.prompt), LoRAConfig(),
                         GRMTrainConfig(learning_rate=2e-5, batch_size=args.batch_size,
                                        eval_batch_size=args.eval_batch),
                         mesh, param_sharding=args.param_sharding)
  build_seconds = time.perf_counter() - t0
  params = trainer.init_params
  opt_state = trainer.trainer.init_opt_state(params)
  n = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
  batch = shard_batch({
      "history": rng.integers(0, args.items, (args.batch_size, args.history)).astype(np.int32),
      "target": rng.integers(0, args.items, args.batch_size).astype(np.int32),
      "weight": np.ones(args.batch_size, np.float32)}, mesh)
  context = replicate({"item_tokens": jnp.asarray(table.item_tokens(args.items))}, mesh)
  key = jax.random.key(0)

  t0 = time.perf_counter()
  step = trainer.trainer.lower_step(params, opt_state, batch, key, context,
                                    trainable=FINE_TUNED).compile()
  train_compile = time.perf_counter() - t0
  state = [params, opt_state]

  def train_once():
    state[0], state[1], metrics = step(state[0], state[1], batch, key, context)
    return metrics["loss"]

  train_once()  # warm-up
  train_times = _timed(train_once, args.steps)

  history = shard_batch({"history": rng.integers(0, args.items, (args.eval_batch, args.history))
                         .astype(np.int32)}, mesh)["history"]
  trie = replicate(jax.tree.map(jnp.asarray, search_trie(
      table, trie_capacity(table.level_sizes, args.items))), mesh)
  t0 = time.perf_counter()
  rank = trainer.lower_rank(state[0], history, context["item_tokens"], trie, table).compile()
  rank_compile = time.perf_counter() - t0
  rank_once = lambda: rank(state[0], history, context["item_tokens"], trie)[0]
  rank_once()
  rank_times = _timed(rank_once, 3)

  prompt = word_prompt_tokens(cfg.vocab_size, args.prompt)
  digits = len(table.level_sizes)  # prompt + the response's identifier, as in a train step
  tokens = (len(prompt.prefix) + args.history * (len(prompt.separator) + digits)
            - len(prompt.separator) + len(prompt.suffix) + digits)
  stats = jax.devices()[0].memory_stats()
  median = float(np.median(train_times))
  result = {
      "size": args.size, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
      "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
      "param_sharding": args.param_sharding, "batch_size": args.batch_size, "prompt": args.prompt,
      "history_items": args.history, "sequence_tokens": tokens,
      "parameters": {"total": n(state[0]), "trained": n([state[0][g] for g in FINE_TUNED])},
      "build_seconds": build_seconds,
      "train": {"compile_seconds": train_compile, "step_seconds_median": median,
                "step_seconds": train_times, "samples_per_second": args.batch_size / median,
                "tokens_per_second": args.batch_size * tokens / median,
                "memory_analysis": _memory(step)},
      "rank": {"compile_seconds": rank_compile, "users": args.eval_batch, "beam": 20,
               "batch_seconds_median": float(np.median(rank_times)),
               "users_per_second": args.eval_batch / float(np.median(rank_times)),
               "memory_analysis": _memory(rank)},
      "peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use"),
  }
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
