"""Speed benchmark of the generative recommender (T5 over semantic IDs), JAX vs. PyTorch.

Measures, on real Amazon-2014 Toys samples (real history lengths) with a random identifier table
(speed only, not accuracy):

  a. JAX training (the `Trainer` step of `GRMTrainer`): steps/s and samples/s with length bucketing
     (`GRMTrainConfig.length_buckets`) and with every batch padded to 80 tokens (20 items);
  b. JAX trie-constrained beam search (`GRMTrainer._rank`, the jitted body of `.rank`): users/s;
  c. peak memory: peak RSS of the process during each phase's warm-up on its largest shape
     (VmHWM, reset through /proc/self/clear_refs), ru_maxrss, XLA's memory analysis of each
     compiled train step and `device.memory_stats()` (None on CPU);
  d. the reference PyTorch setup (DACT/LETTER): HF `T5ForConditionalGeneration` of the same size
     trained with teacher forcing + AdamW on the same batches padded to 80 tokens, and
     `generate(num_beams=B, num_return_sequences=B, max_new_tokens=4,
     prefix_allowed_tokens_fn=<dict trie>)`;
  e. a table (metric, JAX, torch, JAX/torch) and a JSON file with machine information.

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
import collections
import dataclasses
import functools
import json
import os
import platform
import resource
import sys
import time

import numpy as np

try:
  import genrec_jax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from genrec_jax.data import leave_one_out, load_interactions  # noqa: E402
from genrec_jax.data.splits import SampleSet  # noqa: E402
from genrec_jax.decoding.trie import build_trie  # noqa: E402
from genrec_jax.recommenders.t5 import T5Config  # noqa: E402
from genrec_jax.tokenizers.identifiers import assign_dedup, one_to_one_table  # noqa: E402
from genrec_jax.data.batching import sample_batches  # noqa: E402
from genrec_jax.training.grm import GRMTrainConfig, GRMTrainer  # noqa: E402
from genrec_jax.training.sharding import make_mesh, replicate, shard_batch  # noqa: E402

DEFAULT_DATA = "/work/shared/data/amazon2014/toys/interactions.csv"
MAX_HISTORY = 20
CODEBOOK = 256
DEDUP = 256
DEPTH = 4  # 3 code levels + the dedup digit

PRESETS = {
    # DACT / TIGER size.
    "dact": dict(d_model=128, d_ff=1024, num_heads=6, d_kv=64, num_encoder_layers=4,
                 num_decoder_layers=4),
    # Small preset for quick CPU runs.
    "cpu": dict(d_model=64, d_ff=256, num_heads=4, d_kv=16, num_encoder_layers=2,
                num_decoder_layers=2),
}


# ------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


class PeakRSS:
  """Peak resident memory of one phase: VmHWM after resetting it (Linux clear_refs '5')."""

  def __init__(self):
    self.resettable = self._reset()

  @staticmethod
  def _reset() -> bool:
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      return True
    except OSError:
      return False

  @staticmethod
  def _status(field: str) -> float | None:
    try:
      with open("/proc/self/status") as f:
        for line in f:
          if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
      pass
    return None

  def start(self) -> None:
    if self.resettable:
      self._reset()

  def peak_mib(self) -> float | None:
    """Peak RSS since start() (or since process start if VmHWM cannot be reset)."""
    return self._status("VmHWM")

  @staticmethod
  def current_mib() -> float | None:
    return PeakRSS._status("VmRSS")


def ru_maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def stratified(groups: dict[int, list], total: int) -> dict[int, int]:
  """How many of each group's items to take so that `total` follows the groups' sizes (>= 1)."""
  sizes = {k: len(v) for k, v in groups.items() if v}
  n = sum(sizes.values())
  return {k: max(1, min(s, int(round(total * s / n)))) for k, s in sizes.items()}


def weighted_throughput(times: dict[int, list[float]], counts: dict[int, int],
                        units: dict[int, float], stat=np.median) -> tuple[float, float]:
  """(units/s, seconds) of a full pass with counts[b] batches taking stat(times[b]) each.

  The median per shape is the headline: the machine may be shared, and a step that lost its
  cores to another process should not count as the library's speed.
  """
  seconds = sum(counts[b] * float(stat(times[b])) for b in counts)
  return sum(units.values()) / seconds, seconds


def real_rows(idx: np.ndarray) -> int:
  return int((idx >= 0).sum())


# --------------------------------------------------------------------------------------- data


def load_data(path: str, seed: int):
  inter = load_interactions(path)
  split = leave_one_out(inter, max_history=MAX_HISTORY)
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, CODEBOOK, (split.num_items, 3))
  table = one_to_one_table(assign_dedup(codes, DEDUP), CODEBOOK, DEDUP)
  return split, table


def host_tokens(items: np.ndarray, item_tokens: np.ndarray) -> np.ndarray:
  """Item indices int [B, H] (-1 = pad) -> tokens int [B, H * D] (0 = pad), for torch."""
  tokens = np.where(items[..., None] >= 0, item_tokens[np.maximum(items, 0)], 0)
  return tokens.reshape(items.shape[0], -1)


def tokens_of(batch: dict) -> int:
  """Encoder input length (tokens) of a batch of item histories."""
  return batch["history"].shape[1] * DEPTH


def epoch_batches(samples: SampleSet, batch_size, buckets, seed):
  """All batches of one shuffled epoch, grouped by input length (tokens)."""
  groups: dict[int, list] = collections.defaultdict(list)
  for batch, idx in sample_batches(samples, batch_size, buckets, seed=seed, epoch=0):
    groups[tokens_of(batch)].append((batch, idx))
  return dict(groups)


def pick(groups: dict[int, list], total: int) -> dict[int, list]:
  """Stratified subset of batches, full batches first."""
  take = stratified(groups, total)
  out = {}
  for k, n in take.items():
    ordered = sorted(groups[k], key=lambda bi: -real_rows(bi[1]))
    out[k] = ordered[:n]
  return out


# ---------------------------------------------------------------------------------- JAX parts


class Timings:
  """Wall and process-CPU seconds of timed units, grouped by input length (tokens).

  cpu / wall tells how many cores the process really had: about --threads when the machine was
  free, less when other processes took cores (then wall times overstate the library's cost).
  """

  def __init__(self):
    self.wall: dict[int, list[float]] = collections.defaultdict(list)
    self.cpu: dict[int, list[float]] = collections.defaultdict(list)
    self.units = 0

  def time(self, length: int, fn) -> None:
    c0, t0 = time.process_time(), time.perf_counter()
    self.units += fn()
    self.wall[length].append(time.perf_counter() - t0)
    self.cpu[length].append(time.process_time() - c0)

  def summary(self, groups: dict[int, list] | None, unit: str) -> dict:
    """Throughput from the median time per shape, weighted by the batches of a full pass
    (`groups`; None: the timed units themselves), plus per-shape statistics."""
    wall_all = sum(sum(v) for v in self.wall.values())
    cpu_all = sum(sum(v) for v in self.cpu.values())
    out = {}
    if groups is not None:
      counts = {k: len(v) for k, v in groups.items()}
      units = {k: float(sum(real_rows(idx) for _, idx in v)) for k, v in groups.items()}
      missing = sorted(set(counts) - set(self.wall))
      if missing:
        raise ValueError(f"no timed batch of lengths {missing}")
      rate, seconds = weighted_throughput(self.wall, counts, units, np.median)
      rate_mean, _ = weighted_throughput(self.wall, counts, units, np.mean)
      rate_best, _ = weighted_throughput(self.wall, counts, units, np.min)
      out.update({
          f"{unit}_per_s": rate, "batches_per_s": sum(counts.values()) / seconds,
          f"{unit}_per_s_mean": rate_mean, f"{unit}_per_s_best": rate_best,
          "full_pass_s": seconds,
          "full_pass_batches": sum(counts.values()), f"full_pass_{unit}": int(sum(units.values())),
          "mean_input_tokens": float(sum(k * units[k] for k in units) / sum(units.values())),
          "batches_by_tokens": {int(k): counts[k] for k in sorted(counts)}})
    else:
      n = sum(len(v) for v in self.wall.values())
      flat = [x for v in self.wall.values() for x in v]
      median = float(np.median(flat))
      out.update({f"{unit}_per_s": self.units / n / median, "batches_per_s": 1.0 / median,
                  f"{unit}_per_s_mean": self.units / wall_all,
                  f"{unit}_per_s_best": self.units / n / float(np.min(flat))})
    out.update({
        "timed_units": self.units,
        "median_s_by_tokens": {int(k): float(np.median(v)) for k, v in sorted(self.wall.items())},
        "min_s_by_tokens": {int(k): float(np.min(v)) for k, v in sorted(self.wall.items())},
        "wall_s_all": {int(k): [round(x, 3) for x in v] for k, v in sorted(self.wall.items())},
        "cpu_per_wall": cpu_all / max(wall_all, 1e-9)})
    return out


@dataclasses.dataclass
class Phase:
  """Units of work of one measurement, each timed on its own.

  units: (input length, fn() -> number of samples / users done); warmup: fn run once before
  timing, under a fresh peak-RSS window; groups: batches of a full pass, for the weighting.
  """

  name: str
  unit: str
  units: list
  warmup: object = None
  groups: dict | None = None
  timings: Timings = dataclasses.field(default_factory=Timings)
  peak_rss_mib: float | None = None
  loadavg: list = dataclasses.field(default_factory=list)

  def summary(self) -> dict:
    res = self.timings.summary(self.groups, self.unit)
    res.update({"peak_rss_mib": self.peak_rss_mib, "loadavg_during": self.loadavg})
    if self.unit == "samples":
      res["steps_per_s"] = res.pop("batches_per_s")
    else:
      res.pop("batches_per_s")
    return res


def run_phases(phases: list[Phase], interleave: bool, peak: PeakRSS) -> None:
  """Warm-ups (one peak-RSS window each), then the timed units: round-robin over the phases
  when interleaving (so that every phase sees the same load on a shared machine), else each
  phase in turn."""
  for ph in phases:
    if ph.warmup is not None:
      peak.start()
      t0 = time.perf_counter()
      ph.warmup()
      ph.peak_rss_mib = peak.peak_mib()
      log(f"{ph.name}: warm-up {time.perf_counter() - t0:.1f}s, peak RSS {ph.peak_rss_mib} MiB")
  queues = [collections.deque(ph.units) for ph in phases]
  order = []
  if interleave:
    while any(queues):
      for ph, q in zip(phases, queues):
        if q:
          order.append((ph, q.popleft()))
  else:
    order = [(ph, u) for ph, q in zip(phases, queues) for u in q]
  for ph, (length, fn) in order:
    ph.loadavg.append(loadavg()[0] if loadavg() else None)
    ph.timings.time(length, fn)
  for ph in phases:
    log(f"{ph.name}: {ph.summary()[ph.unit + '_per_s']:.2f} {ph.unit}/s, cpu/wall "
        f"{ph.timings.summary(ph.groups, ph.unit)['cpu_per_wall']:.2f}, median s by tokens "
        f"{ph.timings.summary(ph.groups, ph.unit)['median_s_by_tokens']}")


# ---------------------------------------------------------------------------------- JAX parts


def hlo_gflop(compiled) -> float | None:
  """XLA's FLOP count of a compiled executable (GFLOP), None if unavailable."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9
  except Exception:  # pylint: disable=broad-except
    return None


def dot_peak_gflop_per_s(repeats: int = 10) -> dict:
  """This machine's fp32 matmul speed through XLA at the model's shapes (the best of canonical
  [N, 128] x [128, 1024], [N, 1024] x [1024, 128] and [N, 128] x [128, 1152] dots, N = 6144):
  the roofline that any exact implementation of the same FLOPs runs into."""
  out = {}
  for m, k, n in [(6144, 128, 1024), (6144, 1024, 128), (6144, 128, 1152)]:
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    fn = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(fn(a, b))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(a, b))
      times.append(time.perf_counter() - t0)
    out[f"{m}x{k}x{n}"] = 2 * m * k * n / min(times) / 1e9
  out["best"] = max(out.values())
  return out


def weighted_gflop_per_unit(gflop_by_tokens: dict, summary: dict, unit: str) -> float | None:
  """XLA GFLOP of a full pass (GFLOP per batch shape x batches of that shape) per sample/user."""
  counts = summary["batches_by_tokens"]
  if any(gflop_by_tokens.get(k) is None for k in counts):
    return None
  return sum(gflop_by_tokens[k] * n for k, n in counts.items()) / summary[f"full_pass_{unit}"]


def torch_gflop(fn) -> float:
  """FLOPs of one call of fn (torch's FlopCounterMode: matmuls and attention, GFLOP)."""
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    fn()
  return counter.get_total_flops() / 1e9


class JaxTrain:
  """Train state + AOT-compiled train step (`GRMTrainer.trainer`) per input length."""

  def __init__(self, trainer: GRMTrainer, item_tokens, compiled: dict):
    self.trainer, self.compiled = trainer, compiled
    self.params = jax.tree.map(jnp.copy, trainer.init_params)
    self.opt_state = trainer.trainer.init_opt_state(self.params)
    self.context = {"item_tokens": item_tokens}
    self.key = jax.random.key(0)
    self.steps = 0
    self.compile_s: dict[int, dict] = {}

  def compile(self, batch: dict) -> None:
    length = tokens_of(batch)
    if length in self.compiled:
      return
    sharded = shard_batch(batch, self.trainer.mesh)
    t0 = time.perf_counter()
    lowered = self.trainer.trainer._step.lower(self.params, self.opt_state, sharded, self.key,
                                               self.context,
                                               trainable=self.trainer.trainer.groups)
    t1 = time.perf_counter()
    self.compiled[length] = lowered.compile()
    t2 = time.perf_counter()
    self.compile_s[length] = {"trace_s": t1 - t0, "compile_s": t2 - t1,
                              "gflop": hlo_gflop(self.compiled[length])}
    log(f"compiled train step for {length} tokens in {t2 - t0:.1f}s")

  def step(self, batch: dict, idx: np.ndarray) -> int:
    self.steps += 1
    out = self.compiled[tokens_of(batch)](
        self.params, self.opt_state, shard_batch(batch, self.trainer.mesh),
        jax.random.fold_in(self.key, self.steps), self.context)
    self.params, self.opt_state, metrics = jax.block_until_ready(out)
    self.loss = float(metrics["loss"])
    if not np.isfinite(self.loss):
      raise FloatingPointError(f"non-finite loss {self.loss}")
    return real_rows(idx)


class JaxRank:
  """AOT-compiled beam search (`GRMTrainer._rank`) per input length."""

  def __init__(self, trainer: GRMTrainer, table, item_tokens, beam: int, compiled: dict):
    self.trainer, self.compiled = trainer, compiled
    self.rank_fn = trainer._rank
    self.params = trainer.init_params
    self.item_tokens = item_tokens
    self.trie = replicate(jax.tree.map(jnp.asarray, build_trie(table)), trainer.mesh)
    self.static = dict(offsets=tuple(int(o) for o in table.offsets),
                       level_sizes=tuple(table.level_sizes), beam_size=beam,
                       constrained=trainer.cfg.constrained)
    self.compile_s: dict[int, float] = {}
    self.gflop: dict[int, float | None] = {}

  def _history(self, batch):
    return shard_batch({"history": batch["history"]}, self.trainer.mesh)["history"]

  def compile(self, batch: dict) -> None:
    length = tokens_of(batch)
    if length in self.compiled:
      return
    t0 = time.perf_counter()
    self.compiled[length] = self.rank_fn.lower(self.params, self._history(batch),
                                               self.item_tokens, self.trie,
                                               **self.static).compile()
    self.compile_s[length] = time.perf_counter() - t0
    self.gflop[length] = hlo_gflop(self.compiled[length])
    log(f"compiled beam search for {length} tokens in {self.compile_s[length]:.1f}s")

  def rank(self, batch: dict, idx: np.ndarray) -> int:
    items, _ = self.compiled[tokens_of(batch)](self.params, self._history(batch),
                                               self.item_tokens, self.trie)
    jax.block_until_ready(items)
    return real_rows(idx)


def jax_train_phase(name, state: JaxTrain, groups, measured) -> Phase:
  for batches in measured.values():
    state.compile(batches[0][0])
  units = [(length, functools.partial(state.step, *bi))
           for length, batches in measured.items() for bi in batches]
  units = [units[i] for i in np.random.default_rng(1).permutation(len(units))]
  largest = max(measured)
  return Phase(name, "samples", units, groups=groups,
               warmup=functools.partial(state.step, *measured[largest][0]))


def jax_rank_phase(name, state: JaxRank, groups, measured) -> Phase:
  for batches in measured.values():
    state.compile(batches[0][0])
  units = [(length, functools.partial(state.rank, *bi))
           for length, batches in sorted(measured.items()) for bi in batches]
  largest = max(measured)
  return Phase(name, "users", units, groups=groups,
               warmup=functools.partial(state.rank, *measured[largest][0]))


def valid_batches(samples: SampleSet, batch_size, buckets):
  groups: dict[int, list] = collections.defaultdict(list)
  for batch, idx in sample_batches(samples, batch_size, buckets):
    groups[tokens_of(batch)].append((batch, idx))
  return dict(groups)


def jax_memory(compiled_train: dict) -> dict:
  out = {}
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception as e:  # pylint: disable=broad-except
    stats = f"unavailable: {e}"
  out["device_memory_stats"] = stats if stats else None
  if not stats:
    out["device_memory_stats_note"] = (
        f"{jax.devices()[0].platform}: jax reports no device memory stats on this platform")
  for length, compiled in sorted(compiled_train.items()):
    try:
      ma = compiled.memory_analysis()
      out[f"train_step_{length}_tokens_xla_mib"] = {
          name: getattr(ma, f"{name}_size_in_bytes") / 2**20
          for name in ("argument", "output", "temp", "generated_code", "alias")}
    except Exception as e:  # pylint: disable=broad-except
      out[f"train_step_{length}_tokens_xla_mib"] = f"unavailable: {e}"
  return out


# -------------------------------------------------------------------------------- torch parts


def torch_available() -> tuple[bool, str]:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except Exception as e:  # pylint: disable=broad-except
    return False, f"{type(e).__name__}: {e}"
  return True, ""


def make_torch_model(cfg: T5Config, threads: int):
  """HF T5ForConditionalGeneration of the same size (DACT/LETTER/TIGER setup)."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf_cfg = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
      d_kv=cfg.d_kv, num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_decoder_layers, dropout_rate=cfg.dropout_rate,
      relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance, feed_forward_proj="relu",
      tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
  model = transformers.T5ForConditionalGeneration(hf_cfg)
  gen = model.generation_config
  gen.eos_token_id, gen.pad_token_id, gen.decoder_start_token_id = None, 0, 0
  return model


def pad_to(inputs: np.ndarray, length: int) -> np.ndarray:
  """Left-pads token rows to `length` (histories are left-padded, most recent item last)."""
  return np.pad(inputs, ((0, 0), (length - inputs.shape[1], 0)))


class TorchTrain:
  """Teacher-forced training with AdamW (+ clipping if set) on batches padded to a fixed length."""

  def __init__(self, model, item_tokens, lr, weight_decay, grad_clip, full_len):
    import torch
    self.torch, self.model, self.item_tokens = torch, model, item_tokens
    self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    self.grad_clip, self.full_len = grad_clip, full_len

  def step(self, batch, idx) -> int:
    torch = self.torch
    self.model.train()
    inputs = host_tokens(batch["history"], self.item_tokens)
    inputs = torch.from_numpy(pad_to(inputs, self.full_len).astype(np.int64))
    labels = torch.from_numpy(host_tokens(batch["target"][:, None], self.item_tokens)
                              .astype(np.int64))
    labels[torch.from_numpy(idx < 0)] = -100
    out = self.model(input_ids=inputs, attention_mask=(inputs > 0).long(), labels=labels)
    out.loss.backward()
    if self.grad_clip > 0:  # 0 = no clipping, as the JAX trainer
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.loss = out.loss.item()
    return real_rows(idx)


def dict_trie(table) -> dict[tuple[int, ...], list[int]]:
  """{prefix tokens: allowed next tokens}, the usual prefix_allowed_tokens_fn trie."""
  trie: dict[tuple[int, ...], set[int]] = collections.defaultdict(set)
  for row in table.tokens().tolist():
    for d in range(len(row)):
      trie[tuple(row[:d])].add(row[d])
  return {k: sorted(v) for k, v in trie.items()}


class TorchGenerate:
  """HF generate(num_beams=B, num_return_sequences=B, prefix_allowed_tokens_fn=<dict trie>)."""

  def __init__(self, model, table, beam, full_len):
    import torch
    self.torch, self.model, self.beam, self.full_len = torch, model, beam, full_len
    self.depth = table.depth
    self.trie = dict_trie(table)
    self.output_shape = None

  def allowed(self, batch_id, sent):  # sent: decoder start token 0, then generated tokens
    return self.trie.get(tuple(sent.tolist()[1:]), [])

  def generate(self, inputs: np.ndarray) -> int:
    torch = self.torch
    self.model.eval()
    x = torch.from_numpy(pad_to(inputs, self.full_len).astype(np.int64))
    with torch.inference_mode():
      out = self.model.generate(
          input_ids=x, attention_mask=(x > 0).long(), num_beams=self.beam,
          num_return_sequences=self.beam, max_new_tokens=self.depth, min_new_tokens=self.depth,
          do_sample=False, early_stopping=False, prefix_allowed_tokens_fn=self.allowed,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
    self.output_shape = list(out.shape)
    return inputs.shape[0]


# ---------------------------------------------------------------------------------- reporting


def machine_info() -> dict:
  info = {
      "cpu_count": os.cpu_count(),
      "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "loadavg_at_start": loadavg(),
  }
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    info["cpu_model"] = names[0] if names else None
  except OSError:
    pass
  try:
    with open("/proc/meminfo") as f:
      info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
  except OSError:
    pass
  return info


def fmt(v, digits=2):
  if v is None:
    return "-"
  if isinstance(v, str):
    return v
  return f"{v:,.{digits}f}"


def table_rows(res: dict) -> list[tuple[str, str, str, str]]:
  j, t = res["jax"], res.get("torch") or {}
  rows = []

  def add(name, jv, tv, digits=2, ratio=True):
    r = jv / tv if (ratio and jv is not None and tv) else None
    rows.append((name, fmt(jv, digits), fmt(tv, digits), fmt(r, 2) + ("x" if r else "")))

  tt, tg = t.get("train", {}), t.get("generate", {})
  add("train samples/s (JAX bucketed, torch 80 tok)", j["train_bucketed"]["samples_per_s"],
      tt.get("samples_per_s"), 1)
  add("train steps/s (JAX bucketed, torch 80 tok)", j["train_bucketed"]["steps_per_s"],
      tt.get("steps_per_s"), 3)
  add("train samples/s (both 80 tok)", j["train_fixed80"]["samples_per_s"],
      tt.get("samples_per_s"), 1)
  add("beam search users/s (JAX bucketed, torch 80 tok)", j["beam_bucketed"]["users_per_s"],
      tg.get("users_per_s"), 1)
  if "beam_fixed80" in j:
    add("beam search users/s (both 80 tok)", j["beam_fixed80"]["users_per_s"],
        tg.get("users_per_s"), 1)
  add("train samples/s, fastest step per shape (JAX bucketed, torch 80 tok)",
      j["train_bucketed"]["samples_per_s_best"], tt.get("samples_per_s_best"), 1)
  add("beam search users/s, fastest batch per shape (JAX bucketed, torch 80 tok)",
      j["beam_bucketed"]["users_per_s_best"], tg.get("users_per_s_best"), 1)
  f = res.get("flops", {})
  add("GFLOP per train sample (JAX bucketed, torch 80 tok)", f.get("jax_train_gflop_per_sample"),
      f.get("torch_train_gflop_per_sample"), 3)
  add("GFLOP per beam-searched user (JAX bucketed, torch 80 tok)",
      f.get("jax_beam_gflop_per_user"), f.get("torch_beam_gflop_per_user"), 3)
  add("achieved GFLOP/s, train", f.get("jax_train_gflop_per_s"), f.get("torch_train_gflop_per_s"),
      1)
  add("achieved GFLOP/s, beam search", f.get("jax_beam_gflop_per_s"),
      f.get("torch_beam_gflop_per_s"), 1)
  add("fp32 dot peak GFLOP/s of this machine (XLA)",
      (f.get("dot_peak_gflop_per_s") or {}).get("best"), None, 1, ratio=False)
  add("beam search JAX / torch if JAX ran at the dot peak", f.get("beam_ratio_bound_at_dot_peak"),
      None, 1, ratio=False)
  add("peak RSS MiB, train warm-up (80 tok)", j["train_bucketed"]["peak_rss_mib"],
      tt.get("peak_rss_mib"), 0)
  add("peak RSS MiB, beam search warm-up (80 tok)", j["beam_bucketed"]["peak_rss_mib"],
      tg.get("peak_rss_mib"), 0)
  add("cpu/wall during train (cores really used)", j["train_bucketed"]["cpu_per_wall"],
      tt.get("cpu_per_wall"), 2, ratio=False)
  add("JAX compile s (train, all shapes)", j["compile_s"]["train"], None, 1, ratio=False)
  add("JAX compile s (beam search, all shapes)", j["compile_s"]["beam"], None, 1, ratio=False)
  return rows


def markdown_table(rows) -> str:
  head = ("metric", "JAX", "torch", "JAX / torch")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------- main


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
    args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count())
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
