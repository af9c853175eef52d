"""The JAX side: real Toys samples with a random identifier table, ahead-of-time compiled
train steps and beam searches through the library's public trainer functions, memory."""

from __future__ import annotations

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from genrec_jax.data import leave_one_out, load_interactions
from genrec_jax.data.batching import sample_batches
from genrec_jax.data.splits import SampleSet
from genrec_jax.decoding.trie import build_trie
from genrec_jax.tokenizers.identifiers import assign_dedup, one_to_one_table
from genrec_jax.training.grm import GRMTrainer
from genrec_jax.training.sharding import replicate, shard_batch

from tools.bench.flops import hlo_gflop
from tools.bench.harness import Phase, log, real_rows, stratified

MAX_HISTORY = 20
CODEBOOK = 256
DEDUP = 256
DEPTH = 4  # 3 code levels + the dedup digit

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


class JaxTrain:
  """Train state + AOT-compiled train step (`Trainer.lower_step`) per input length."""

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
    lowered = self.trainer.trainer.lower_step(self.params, self.opt_state, sharded, self.key,
                                              self.context)
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
  """AOT-compiled beam search (`GRMTrainer.lower_rank`) per input length."""

  def __init__(self, trainer: GRMTrainer, table, item_tokens, beam: int, compiled: dict):
    self.trainer, self.table, self.beam, self.compiled = trainer, table, beam, compiled
    self.params = trainer.init_params
    self.item_tokens = item_tokens
    self.trie = replicate(jax.tree.map(jnp.asarray, build_trie(table)), trainer.mesh)
    self.compile_s: dict[int, float] = {}
    self.gflop: dict[int, float | None] = {}

  def _history(self, batch):
    return shard_batch({"history": batch["history"]}, self.trainer.mesh)["history"]

  def compile(self, batch: dict) -> None:
    length = tokens_of(batch)
    if length in self.compiled:
      return
    t0 = time.perf_counter()
    self.compiled[length] = self.trainer.lower_rank(self.params, self._history(batch),
                                                    self.item_tokens, self.trie, self.table,
                                                    self.beam).compile()
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
