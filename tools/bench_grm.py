"""Speed benchmark of the generative recommender (T5 over semantic IDs), JAX vs. PyTorch.

Measures, on real Amazon-2014 Toys samples (real history lengths) with a random identifier table
(speed only, not accuracy):

  a. JAX training (`Trainer.lower_step` of the `GRMTrainer`): steps/s and samples/s with length
     bucketing (`GRMTrainConfig.length_buckets`) and with every batch padded to 80 tokens;
  b. JAX trie-constrained beam search (`GRMTrainer.lower_rank`, the body of `.rank`): users/s;
  c. peak memory: peak RSS of the process during each phase's warm-up on its largest shape
     (VmHWM, reset through /proc/self/clear_refs), ru_maxrss, XLA's memory analysis of each
     compiled train step and `device.memory_stats()` (None on CPU);
  d. the reference PyTorch setup (DACT/LETTER): HF `T5ForConditionalGeneration` of the same size
     trained with teacher forcing + AdamW on the same batches padded to 80 tokens, and
     `generate(num_beams=B, num_return_sequences=B, max_new_tokens=4,
     prefix_allowed_tokens_fn=<dict trie>)`;
  e. a table (metric, JAX, torch, JAX/torch) and a JSON file with machine information.

One concern per module of `tools/bench/`: `harness` (timing, interleaved phases, peak memory),
`flops` (XLA cost analysis, dot peak, torch FLOP counter), `jax_side` (data and the compiled
JAX phases), `torch_reference` (the HF PyTorch setup), `report` (machine info, the table).

Every train step / ranking batch is timed on its own, after ahead-of-time compilation (compile
time is reported separately) and one warm-up per phase. JAX throughputs are full-pass estimates:
the median time per input shape weighted by the number of batches of that shape in one training
epoch / validation pass (the mean- and fastest-based figures are in the JSON too). The timed
units of all phases are interleaved (--no_interleave: one phase after the other), so that on a
shared machine JAX and torch see the same load; `cpu_per_wall` tells how many cores the
process really had. --cpus 0 pins the process to one core (XLA and torch then both run one
thread): the like-for-like comparison when other jobs keep cores busy.

  python tools/bench_grm.py --model dact --json_out experiments/benchmarks/grm_cpu_2core.json
  python tools/bench_grm.py --model dact --cpus 0 --json_out experiments/benchmarks/grm_cpu_1core.json

torch/transformers are optional (`pip install -e .[bench]`); without them, or with --no_torch,
the PyTorch part is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import numpy as np

# The repository root: `tools.bench`, and the library when it is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from genrec_jax.recommenders.t5 import T5Config  # noqa: E402
from genrec_jax.training.grm import GRMTrainConfig, GRMTrainer  # noqa: E402
from genrec_jax.training.sharding import make_mesh, usable_cores  # noqa: E402
from tools.bench.flops import dot_peak_gflop_per_s, torch_gflop, weighted_gflop_per_unit  # noqa: E402,E501
from tools.bench.harness import (Phase, PeakRSS, loadavg, log, real_rows,  # noqa: E402
                                 ru_maxrss_mib, run_phases)
from tools.bench.jax_side import (MAX_HISTORY, JaxRank, JaxTrain, epoch_batches,  # noqa: E402
                                  host_tokens, jax_memory, jax_rank_phase, jax_train_phase,
                                  load_data, pick, valid_batches)
from tools.bench.report import machine_info, markdown_table, table_rows  # noqa: E402
from tools.bench.torch_reference import (TorchGenerate, TorchTrain, make_torch_model,  # noqa: E402
                                         torch_available)

DEFAULT_DATA = "/work/shared/data/amazon2014/toys/interactions.csv"
PRESETS = {
    # DACT / TIGER size.
    "dact": dict(d_model=128, d_ff=1024, num_heads=6, d_kv=64, num_encoder_layers=4,
                 num_decoder_layers=4),
    # Small preset for quick CPU runs.
    "cpu": dict(d_model=64, d_ff=256, num_heads=4, d_kv=16, num_encoder_layers=2,
                num_decoder_layers=2),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(PRESETS), default="dact")
  p.add_argument("--data", default=DEFAULT_DATA, help="interactions file (Amazon-2014 Toys)")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--eval_batch_size", type=int, default=256)
  p.add_argument("--train_steps", type=int, default=16,
                 help="timed JAX train steps with bucketing (stratified over buckets)")
  p.add_argument("--fixed_steps", type=int, default=4,
                 help="timed JAX train steps with every batch padded to 80 tokens")
  p.add_argument("--eval_users", type=int, default=1024,
                 help="JAX users ranked (rounded to eval batches, stratified over buckets)")
  p.add_argument("--fixed_eval_users", type=int, default=256,
                 help="JAX users ranked with inputs padded to 80 tokens (0 = skip)")
  p.add_argument("--beam", type=int, default=20)
  p.add_argument("--buckets", default=None,
                 help="comma-separated history-length buckets (items); default: the library's")
  p.add_argument("--torch", dest="torch", action="store_true", default=True,
                 help="also measure the HF PyTorch reference (default)")
  p.add_argument("--no_torch", "--no-torch", dest="torch", action="store_false",
                 help="JAX only")
  p.add_argument("--torch_train_steps", type=int, default=4, help="timed torch steps")
  p.add_argument("--torch_eval_users", type=int, default=256)
  p.add_argument("--torch_eval_batch_size", type=int, default=64)
  p.add_argument("--threads", type=int, default=None,
                 help="torch intra-op threads (default: the CPUs this process may use)")
  p.add_argument("--cpus", default=None,
                 help="pin the process to these CPUs, e.g. '0' (XLA and torch size their thread "
                      "pools from it): a like-for-like single-core comparison on a shared "
                      "machine, where 2 threads on 2 busy cores stall at every barrier")
  p.add_argument("--interleave", dest="interleave", action="store_true", default=True,
                 help="alternate the timed units of all phases (default; fair on a shared "
                      "machine)")
  p.add_argument("--no_interleave", "--no-interleave", dest="interleave", action="store_false",
                 help="time one phase after the other")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json_out", default=None)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.cpus:  # before the XLA backend starts (it sizes its thread pool from the affinity)
    os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
  if args.threads is None:
    args.threads = usable_cores()
  t_start = time.perf_counter()
  peak = PeakRSS()
  info = machine_info()
  log(f"machine: {info.get('cpu_model')} x{info['cpu_count']}, jax {jax.__version__} "
      f"({jax.default_backend()}), load {info['loadavg_at_start']}")

  split, table = load_data(args.data, args.seed)
  item_tokens = table.item_tokens(split.num_items)
  model_cfg = T5Config(table.vocab_size, **PRESETS[args.model])
  buckets = (tuple(int(b) for b in args.buckets.split(",")) if args.buckets
             else GRMTrainConfig().length_buckets)
  full_len = MAX_HISTORY * table.depth
  log(f"data: {len(split.train)} train / {len(split.valid)} valid samples, "
      f"{split.num_items} items, vocab {table.vocab_size}, buckets {buckets}, model {args.model}")

  mesh = make_mesh()
  train_cfg = GRMTrainConfig(batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                             beam_size=args.beam, length_buckets=buckets)
  trainer = GRMTrainer(model_cfg, train_cfg, mesh, seed=args.seed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.init_params))
  log(f"JAX T5 parameters: {n_params:,}")
  results = {"args": vars(args), "machine": info, "model": dataclasses.asdict(model_cfg),
             "num_params_jax": n_params, "buckets": list(buckets), "jax": {}}

  # JAX phases (compiled ahead of time; compile time reported separately).
  compiled_train: dict[int, object] = {}
  compiled_rank: dict[int, object] = {}
  train_groups = epoch_batches(split.train, args.batch_size, buckets, args.seed)
  fixed_groups = epoch_batches(split.train, args.batch_size, (MAX_HISTORY,), args.seed)
  device_tokens = trainer.item_tokens(table, split.num_items)
  bucketed_state = JaxTrain(trainer, device_tokens, compiled_train)
  phases = [jax_train_phase("jax train bucketed", bucketed_state, train_groups,
                            pick(train_groups, args.train_steps))]
  fixed_state = JaxTrain(trainer, device_tokens, compiled_train)
  phases.append(jax_train_phase("jax train 80 tokens", fixed_state, fixed_groups,
                                {full_len: fixed_groups[full_len][:args.fixed_steps]}))
  phases[-1].warmup = None  # same executable and shape as the bucketed phase's warm-up
  rank_state = JaxRank(trainer, table, device_tokens, args.beam, compiled_rank)
  valid_groups = valid_batches(split.valid, args.eval_batch_size, buckets)
  n_eval = max(1, int(round(args.eval_users / args.eval_batch_size)))
  phases.append(jax_rank_phase("jax beam bucketed", rank_state, valid_groups,
                               pick(valid_groups, n_eval)))
  if args.fixed_eval_users:
    fixed_valid = valid_batches(split.valid, args.eval_batch_size, (MAX_HISTORY,))
    n_fixed = max(1, int(round(args.fixed_eval_users / args.eval_batch_size)))
    phases.append(jax_rank_phase("jax beam 80 tokens", rank_state, fixed_valid,
                                 {full_len: fixed_valid[full_len][:n_fixed]}))
    phases[-1].warmup = None
  results["jax"]["compile_s"] = {
      "train": sum(v["trace_s"] + v["compile_s"] for v in bucketed_state.compile_s.values()),
      "beam": sum(rank_state.compile_s.values()),
      "train_by_tokens": bucketed_state.compile_s, "beam_by_tokens": rank_state.compile_s,
      "beam_gflop_by_tokens": rank_state.gflop}

  # Torch phases.
  ok, why = torch_available()
  torch_phases = []
  if not args.torch:
    why = "--no_torch"
  if args.torch and ok:
    import torch
    import transformers
    info.update(torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=args.threads)
    model = make_torch_model(model_cfg, args.threads)
    n_torch = sum(p.numel() for p in model.parameters())
    log(f"torch {torch.__version__} / transformers {transformers.__version__}, "
        f"{args.threads} threads, HF T5 parameters: {n_torch:,}")
    results["torch"] = {"num_params": n_torch}
    tt = TorchTrain(model, item_tokens, train_cfg.learning_rate, train_cfg.weight_decay,
                    train_cfg.grad_clip, full_len)
    tbatches = fixed_groups[full_len][:args.torch_train_steps + 1]
    torch_phases.append(Phase("torch train 80 tokens", "samples",
                              [(full_len, functools.partial(tt.step, *bi))
                               for bi in tbatches[1:]],
                              warmup=functools.partial(tt.step, *tbatches[0])))
    tg = TorchGenerate(model, table, args.beam, full_len)
    users = min(args.torch_eval_users, len(split.valid))
    inputs = host_tokens(split.valid.history[:users], item_tokens)
    chunks = [inputs[s:s + args.torch_eval_batch_size]
              for s in range(0, users, args.torch_eval_batch_size)]
    torch_phases.append(Phase("torch generate 80 tokens", "users",
                              [(full_len, functools.partial(tg.generate, c)) for c in chunks],
                              warmup=functools.partial(tg.generate, chunks[0])))
  else:
    log(f"torch part skipped: {why}" + ("" if why == "--no_torch" else
        " (install torch and transformers, e.g. `pip install -e .[bench]`, to compare)"))
    results["torch"] = None
    results["torch_skipped"] = why

  all_phases = phases + torch_phases
  if args.interleave:  # torch phases between the JAX ones: train next to train, beam to beam
    all_phases = phases[:2] + torch_phases[:1] + phases[2:] + torch_phases[1:]
  run_phases(all_phases, args.interleave, peak)

  keys = ["train_bucketed", "train_fixed80", "beam_bucketed", "beam_fixed80"]
  for key, ph in zip(keys, phases):
    results["jax"][key] = ph.summary()
  results["jax"]["train_fixed80"]["peak_rss_mib"] = results["jax"]["train_bucketed"][
      "peak_rss_mib"]
  results["jax"]["train_bucketing_gain"] = (results["jax"]["train_bucketed"]["samples_per_s"] /
                                            results["jax"]["train_fixed80"]["samples_per_s"])
  if "beam_fixed80" in results["jax"]:
    results["jax"]["beam_bucketing_gain"] = (results["jax"]["beam_bucketed"]["users_per_s"] /
                                             results["jax"]["beam_fixed80"]["users_per_s"])
  results["jax"]["final_loss"] = bucketed_state.loss
  # Effective GFLOP/s (XLA's FLOP count of the step / median step time): a contention-independent
  # view of how well each framework uses the cores (torch runs the same model at 80 tokens).
  train_gflop = {k: v["gflop"] for k, v in bucketed_state.compile_s.items() if v.get("gflop")}
  results["jax"]["train_gflop_by_tokens"] = train_gflop
  results["jax"]["train_gflop_per_s_by_tokens"] = {
      k: train_gflop[k] / results["jax"]["train_bucketed"]["median_s_by_tokens"][k]
      for k in train_gflop}
  results["jax"]["memory"] = jax_memory(compiled_train)
  # Roofline: FLOPs per sample / user (XLA's count; torch's FlopCounterMode) against this core's
  # dot speed bound how far any exact implementation of the same search can get.
  flops = {"dot_peak_gflop_per_s": dot_peak_gflop_per_s(),
           "jax_train_gflop_per_sample": weighted_gflop_per_unit(
               train_gflop, results["jax"]["train_bucketed"], "samples"),
           "jax_beam_gflop_per_user": weighted_gflop_per_unit(
               rank_state.gflop, results["jax"]["beam_bucketed"], "users")}
  if flops["jax_train_gflop_per_sample"] is not None:
    flops["jax_train_gflop_per_s"] = (flops["jax_train_gflop_per_sample"] *
                                      results["jax"]["train_bucketed"]["samples_per_s"])
  if flops["jax_beam_gflop_per_user"] is not None:
    flops["jax_beam_gflop_per_s"] = (flops["jax_beam_gflop_per_user"] *
                                     results["jax"]["beam_bucketed"]["users_per_s"])
  results["flops"] = flops
  if torch_phases:
    results["torch"]["train"] = torch_phases[0].summary()
    results["torch"]["train"]["final_loss"] = tt.loss
    if full_len in train_gflop:
      results["torch"]["train"]["gflop_per_s_same_flops_as_jax"] = (
          train_gflop[full_len] / results["torch"]["train"]["median_s_by_tokens"][full_len])
    results["torch"]["generate"] = torch_phases[1].summary()
    results["torch"]["generate"]["output_shape"] = tg.output_shape
    flops["torch_train_gflop_per_sample"] = torch_gflop(
        functools.partial(tt.step, *tbatches[0])) / real_rows(tbatches[0][1])
    flops["torch_beam_gflop_per_user"] = torch_gflop(
        functools.partial(tg.generate, chunks[0])) / len(chunks[0])
    flops["torch_train_gflop_per_s"] = (flops["torch_train_gflop_per_sample"] *
                                        results["torch"]["train"]["samples_per_s"])
    flops["torch_beam_gflop_per_s"] = (flops["torch_beam_gflop_per_user"] *
                                       results["torch"]["generate"]["users_per_s"])
    if flops["jax_beam_gflop_per_user"]:
      # The ratio JAX would reach if every one of its FLOPs ran at the dot peak.
      flops["beam_ratio_bound_at_dot_peak"] = (
          flops["dot_peak_gflop_per_s"]["best"] / flops["jax_beam_gflop_per_user"] /
          results["torch"]["generate"]["users_per_s"])
    j, t = results["jax"], results["torch"]
    results["ratios"] = {
        "train_samples_per_s_bucketed_vs_torch": (j["train_bucketed"]["samples_per_s"] /
                                                  t["train"]["samples_per_s"]),
        "train_samples_per_s_fixed80_vs_torch": (j["train_fixed80"]["samples_per_s"] /
                                                 t["train"]["samples_per_s"]),
        "beam_users_per_s_bucketed_vs_torch": (j["beam_bucketed"]["users_per_s"] /
                                               t["generate"]["users_per_s"])}
    if "beam_fixed80" in j:
      results["ratios"]["beam_users_per_s_fixed80_vs_torch"] = (
          j["beam_fixed80"]["users_per_s"] / t["generate"]["users_per_s"])
    results["ratios_fastest"] = {
        "train_samples_per_s_bucketed_vs_torch": (j["train_bucketed"]["samples_per_s_best"] /
                                                  t["train"]["samples_per_s_best"]),
        "beam_users_per_s_bucketed_vs_torch": (j["beam_bucketed"]["users_per_s_best"] /
                                               t["generate"]["users_per_s_best"])}
    results["targets"] = {"train_samples_per_s_bucketed_vs_torch": 3.0,
                          "beam_users_per_s_bucketed_vs_torch": 30.0}

  results["ru_maxrss_mib"] = ru_maxrss_mib()
  results["peak_rss_resettable"] = peak.resettable
  results["loadavg_at_end"] = loadavg()
  results["total_s"] = time.perf_counter() - t_start
  rows = table_rows(results)
  results["table_markdown"] = markdown_table(rows)

  head = ("metric", "JAX", "torch", "JAX / torch")
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
  print()
  for r in [head] + rows:
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths))))
  print()
  mem = results["jax"]["memory"]
  print(f"process peak RSS (ru_maxrss, whole run): {results['ru_maxrss_mib']:.0f} MiB; JAX "
        f"device memory_stats: {mem['device_memory_stats'] or 'None (' + mem.get('device_memory_stats_note', '') + ')'}")
  if results.get("torch") is None:
    print(f"torch comparison skipped: {results.get('torch_skipped')}")
  print(f"total {results['total_s']:.0f}s, load average at end {results['loadavg_at_end']}")
  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=1, default=str)
    log(f"wrote {args.json_out}")
  return results


if __name__ == "__main__":
  main()
