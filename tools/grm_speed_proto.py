"""Prototypes of faster GRM training and ranking, measured against the library (not library code).

Everything here runs on the library's own modules and parameters (`genrec_jax.recommenders.t5`,
`GRMTrainer`); nothing under genrec_jax/ is edited. Prototypes:

  * `hash_dropout`: dropout masks from a counter-based integer hash of the element index and two
    seeds drawn from the key, fused by XLA into the consumers (no random bits materialised).
  * `cheap_dropout(bits)`: masks from 16 (or 8) threefry bits per element instead of one full
    threefry2x32 hash per element (partitionable threefry evaluates the hash once per output
    element whatever the width). Same keep probability up to 1/65536 (16 bits).
  * `make_fast_rank`: trie-constrained beam search with per-layer self-attention K/V caches (each
    step runs the decoder on the new position only), a single decoder row per user at the first
    step (all beams hold the start token), cross-attention keys/values once per user and beams
    grouped by user in the cross-attention. Same search as `genrec_jax.decoding.beam_search`
    (same candidate masking and top-k), so it ranks the same items (checked on every run).
  * finer length buckets (epoch estimates from a fit of the measured step times).

Timed units of all variants are interleaved (see tools/bench_grm.py).

  python tools/grm_speed_proto.py --model dact --train_steps 2 \
      --json_out experiments/benchmarks/grm_proto_cpu_2core.json
  python tools/grm_speed_proto.py --model dact --skip_beam --train_steps 2 \
      --train_variants "library:16,48,80;hash:16,48,80;no_dropout:16,80" \
      --json_out experiments/benchmarks/grm_proto_dropout_cpu_2core.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_grm as bg  # noqa: E402  (also puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from genrec_jax.decoding.beam_search import NEG_INF  # noqa: E402
from genrec_jax.recommenders import t5 as t5_module  # noqa: E402
from genrec_jax.recommenders.t5 import T5Config  # noqa: E402
from genrec_jax.training.grm import GRMTrainConfig, GRMTrainer  # noqa: E402
from genrec_jax.training.sharding import make_mesh  # noqa: E402

LIBRARY_DROPOUT = t5_module.dropout


# ------------------------------------------------------------------------------------ dropout


def cheap_dropout(bits: int = 16):
  """Drop-in for `t5.dropout` drawing `bits` random bits per element (32 // bits per hash)."""
  dtype = {8: jnp.uint8, 16: jnp.uint16}[bits]

  def dropout(x, rate, key):
    if key is None or rate == 0.0:
      return x
    n = x.size
    per_word = 32 // bits
    words = jax.random.bits(key, (-(-n // per_word),), jnp.uint32)
    small = jax.lax.bitcast_convert_type(words, dtype).reshape(-1)[:n].reshape(x.shape)
    keep = small >= jnp.asarray(int(round(rate * 2 ** bits)), dtype)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)

  return dropout


def _mix32(h):
  """lowbias32 integer hash (a bijection of uint32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def hash_dropout(x, rate, key):
  """Drop-in for `t5.dropout` with a counter-based integer hash instead of threefry.

  The mask is an elementwise function of (element index, two 32-bit seeds drawn from `key`),
  so XLA fuses it into its consumers and recomputes it in the backward pass instead of
  materialising random bits. Not cryptographic; plenty for dropout (check the keep rate with
  `dropout_stats`).
  """
  if key is None or rate == 0.0:
    return x
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in range(x.ndim - 1, -1, -1):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
    stride *= x.shape[axis]
  h = _mix32(_mix32(index ^ seeds[0]) + seeds[1])
  keep = h >= jnp.uint32(min(int(round(rate * 2 ** 32)), 2 ** 32 - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def dropout_stats(fn, rate=0.1, shape=(256, 80, 1024)) -> dict:
  """Keep rate, mean and correlation between two keys' masks of a dropout function."""
  x = jnp.ones(shape, jnp.float32)
  a = fn(x, rate, jax.random.key(1))
  b = fn(x, rate, jax.random.key(2))
  ka, kb = (a > 0).astype(jnp.float32), (b > 0).astype(jnp.float32)
  corr = jnp.corrcoef(ka.reshape(-1)[:1_000_000], kb.reshape(-1)[:1_000_000])[0, 1]
  return {"keep_rate": float(ka.mean()), "mean": float(a.mean()), "mask_corr_two_keys":
          float(corr), "neighbour_corr": float(jnp.corrcoef(ka.reshape(-1)[:-1][:1_000_000],
                                                             ka.reshape(-1)[1:][:1_000_000])[0, 1])}


# -------------------------------------------------------------------------------- beam search


def _heads(y, num_heads, d_kv):
  return y.reshape(y.shape[:-1] + (num_heads, d_kv))


def make_fast_rank(trainer: GRMTrainer):
  """jit with the signature of `trainer._rank` (params, inputs, trie, *, static...)."""
  graphdef = trainer.graphdef

  def rank_batch(params, inputs, trie, *, offsets, level_sizes, beam_size, constrained):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    nh, dk = cfg.num_heads, cfg.d_kv
    encoded, mask = model.encode(inputs)                     # [B, T, d], [B, T]
    b = inputs.shape[0]
    dec = model.decoder
    depth = len(level_sizes)
    # Cross-attention keys / values: once per user and layer.
    cross = [(_heads(blk.cross_attn.k(encoded), nh, dk), _heads(blk.cross_attn.v(encoded), nh, dk))
             for blk in dec.blocks]
    mem_mask = mask[:, None, None, :]                        # [B, 1, 1, T]
    bias = dec.position_bias(depth, depth)[0]                # [H, depth, depth]
    emb = model.embed.embedding[...]

    def decoder_step(tok, pos, cache):
      """tok int [B, n] at position pos -> (log-probs [B, n, V], cache with pos appended)."""
      x = model.embed(tok)                                   # [B, n, d]
      n = tok.shape[1]
      new_cache = []
      for layer, blk in enumerate(dec.blocks):
        h = blk.self_norm(x)
        q = _heads(blk.self_attn.q(h), nh, dk)               # [B, n, H, dk]
        k = _heads(blk.self_attn.k(h), nh, dk)[:, :, None]   # [B, n, 1, H, dk]
        v = _heads(blk.self_attn.v(h), nh, dk)[:, :, None]
        if cache is not None:
          k = jnp.concatenate([cache[layer][0], k], axis=2)  # [B, n, pos + 1, H, dk]
          v = jnp.concatenate([cache[layer][1], v], axis=2)
        new_cache.append((k, v))
        logits = jnp.einsum("bnhd,bnshd->bnhs", q, k) + bias[None, None, :, pos, :pos + 1]
        w = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bnhs,bnshd->bnhd", w, v).reshape(b, n, nh * dk)
        x = x + blk.self_attn.o(out)
        h = blk.cross_norm(x)
        qc = _heads(blk.cross_attn.q(h), nh, dk)             # [B, n, H, dk]
        kc, vc = cross[layer]                                # [B, T, H, dk]
        logits = jnp.einsum("bnhd,bthd->bnht", qc, kc)
        logits = jnp.where(mem_mask, logits, -1e9)
        w = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bnht,bthd->bnhd", w, vc).reshape(b, n, nh * dk)
        x = x + blk.cross_attn.o(out)
        x = x + blk.ff(blk.ff_norm(x), 0.0, None)
      h = dec.final_norm(x)
      logp = jax.nn.log_softmax((h * cfg.d_model ** -0.5) @ emb.T, axis=-1)
      return logp, new_cache

    # The search of genrec_jax.decoding.beam_search, with the decoder state carried along.
    scores = jnp.full((b, beam_size), NEG_INF).at[:, 0].set(0.0)
    nodes = jnp.zeros((b, beam_size), jnp.int32)
    tokens = jnp.zeros((b, beam_size, 0), jnp.int32)
    cache = None
    for pos in range(depth):
      if pos == 0:  # every beam holds the start token: one decoder row per user
        logp, cache = decoder_step(jnp.zeros((b, 1), jnp.int32), 0, None)
        logp = jnp.broadcast_to(logp, (b, beam_size, logp.shape[-1]))
        cache = [tuple(jnp.broadcast_to(t, (b, beam_size) + t.shape[2:]) for t in kv)
                 for kv in cache]
      else:
        logp, cache = decoder_step(tokens[..., -1], pos, cache)
      size = level_sizes[pos]
      logp = logp[..., offsets[pos]:offsets[pos] + size]
      child = trie.children[jnp.maximum(nodes, 0)][..., :size]
      child = jnp.where(nodes[..., None] >= 0, child, -1)
      candidate = scores[..., None] + logp
      if constrained:
        candidate = jnp.where(child >= 0, candidate, NEG_INF)
      candidate = jnp.where(scores[..., None] <= NEG_INF / 2, NEG_INF, candidate)
      scores, flat = jax.lax.top_k(candidate.reshape(b, -1), beam_size)
      parent, symbol = flat // size, flat % size
      nodes = jnp.take_along_axis(child.reshape(b, -1), flat, axis=1)
      tokens = jnp.concatenate([
          jnp.take_along_axis(tokens, parent[..., None], axis=1),
          (symbol + offsets[pos])[..., None].astype(jnp.int32)], axis=-1)
      if pos + 1 < depth:
        idx = parent[:, :, None, None, None]
        cache = [(jnp.take_along_axis(k, idx, axis=1), jnp.take_along_axis(v, idx, axis=1))
                 for k, v in cache]
    items = jnp.where((nodes >= 0) & (scores > NEG_INF / 2),
                      trie.leaf_item[jnp.maximum(nodes, 0)], -1)
    return items, scores

  return jax.jit(rank_batch, static_argnames=("offsets", "level_sizes", "beam_size",
                                              "constrained"))


# ------------------------------------------------------------------------------ measurements


def train_phases(specs: dict[str, list[int]], model_cfg, batch_size, steps, seed=0):
  """One interleavable phase per dropout variant, timing train steps on random token batches."""
  fns = {"library": LIBRARY_DROPOUT, "bits16": cheap_dropout(16), "bits8": cheap_dropout(8),
         "hash": hash_dropout, "no_dropout": LIBRARY_DROPOUT}
  rng = np.random.default_rng(seed)
  mesh = make_mesh()
  phases = []
  for variant, lengths in specs.items():
    cfg = model_cfg
    if variant == "no_dropout":
      cfg = T5Config(**{**model_cfg.__dict__, "dropout_rate": 0.0})
    trainer = GRMTrainer(cfg, GRMTrainConfig(batch_size=batch_size), mesh, seed=seed)
    state = bg.JaxTrain(trainer, {})
    units = []
    for length in lengths:
      batch = {"inputs": rng.integers(1, cfg.vocab_size, (batch_size, length)).astype(np.int32),
               "targets": rng.integers(1, cfg.vocab_size, (batch_size, 4)).astype(np.int32),
               "weight": np.ones(batch_size, np.float32)}
      idx = np.arange(batch_size)
      t5_module.dropout = fns[variant]  # read when the step is traced (at compile time)
      try:
        state.compile(batch)
      finally:
        t5_module.dropout = LIBRARY_DROPOUT
      units += [(length, functools.partial(state.step, batch, idx))] * steps
    phases.append(bg.Phase(f"train {variant}", "samples", units,
                           warmup=functools.partial(state.step, batch, idx)))
    phases[-1].state = state
  return phases


def fit_step_time(step_s: dict[int, float]):
  """Step seconds as a polynomial of the input length (degree <= 2) through the measurements."""
  xs = sorted(step_s)
  coef = np.polyfit(xs, [step_s[x] for x in xs], min(2, len(xs) - 1))
  return lambda length: float(np.polyval(coef, length))


def epoch_estimate(step_fn, lengths: np.ndarray, batch_size: int, buckets: tuple[int, ...],
                   depth: int) -> dict:
  """samples/s of one epoch with these buckets, from a step-time model."""
  buckets = tuple(sorted(buckets))
  which = bg.bucket_of(lengths, buckets)
  batches = {b * depth: int(np.ceil((which == i).sum() / batch_size))
             for i, b in enumerate(buckets) if (which == i).any()}
  seconds = sum(n * step_fn(t) for t, n in batches.items())
  tokens = float(np.asarray(buckets)[which].mean() * depth)
  return {"samples_per_s": len(lengths) / seconds, "epoch_s": seconds,
          "batches_by_tokens": batches, "mean_input_tokens": tokens}


def parse_specs(text: str) -> dict[str, list[int]]:
  out = {}
  for part in text.split(";"):
    name, lengths = part.split(":")
    out[name.strip()] = [int(x) for x in lengths.split(",")]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=sorted(bg.PRESETS), default="dact")
  p.add_argument("--data", default=bg.DEFAULT_DATA)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--train_variants", default="library:16,48,80;bits16:16,48,80;no_dropout:80",
                 help="variant:lengths;... (variants: library, bits16, bits8, hash, no_dropout)")
  p.add_argument("--train_steps", type=int, default=3, help="timed steps per variant and length")
  p.add_argument("--eval_users", type=int, default=1024)
  p.add_argument("--beam", type=int, default=20)
  p.add_argument("--skip_train", action="store_true")
  p.add_argument("--skip_beam", action="store_true")
  p.add_argument("--fine_buckets", default="2,3,4,5,6,8,10,13,16,20")
  p.add_argument("--interleave", dest="interleave", action="store_true", default=True)
  p.add_argument("--no_interleave", "--no-interleave", dest="interleave", action="store_false")
  p.add_argument("--json_out", default=None)
  args = p.parse_args(argv)

  split, table = bg.load_data(args.data, 0)
  item_tokens = table.item_tokens(split.num_items)
  model_cfg = T5Config(table.vocab_size, **bg.PRESETS[args.model])
  results = {"args": vars(args), "machine": bg.machine_info()}
  peak = bg.PeakRSS()
  phases = []

  if not args.skip_train:
    results["dropout_stats"] = {name: dropout_stats(fn) for name, fn in [
        ("library", LIBRARY_DROPOUT), ("bits16", cheap_dropout(16)), ("hash", hash_dropout)]}
    bg.log(f"dropout statistics: {results['dropout_stats']}")
    tphases = train_phases(parse_specs(args.train_variants), model_cfg, args.batch_size,
                           args.train_steps)
    phases += tphases
  if not args.skip_beam:
    trainer = GRMTrainer(model_cfg, GRMTrainConfig(), make_mesh())
    groups = bg.valid_batches(split.valid, item_tokens, 256, GRMTrainConfig().length_buckets)
    measured = bg.pick(groups, max(1, int(round(args.eval_users / 256))))
    rank_states = {"fast": bg.JaxRank(trainer, table, args.beam, {},
                                      rank_fn=make_fast_rank(trainer)),
                   "library": bg.JaxRank(trainer, table, args.beam, {})}
    bphases = [bg.jax_rank_phase(f"beam {name}", st, groups, measured, keep=True)
               for name, st in rank_states.items()]
    phases += bphases
  bg.run_phases(phases, args.interleave, peak)

  if not args.skip_train:
    train = {ph.name.split()[-1]: ph.summary() for ph in tphases}
    for ph in tphases:
      train[ph.name.split()[-1]]["compile_s"] = ph.state.compile_s
    results["train"] = train
    depth = table.depth
    schemes = {"library": GRMTrainConfig().length_buckets,
               "fine": tuple(int(x) for x in args.fine_buckets.split(",")),
               "fixed80": (bg.MAX_HISTORY,)}
    est = {}
    for variant, res in train.items():
      if len(res["median_s_by_tokens"]) < 2:
        continue
      step_fn = fit_step_time(res["median_s_by_tokens"])
      for name, buckets in schemes.items():
        est[f"{variant}/{name}"] = epoch_estimate(step_fn, split.train.lengths, args.batch_size,
                                                  buckets, depth)
    results["epoch_estimates"] = est
    for k, v in est.items():
      bg.log(f"epoch estimate {k}: {v['samples_per_s']:.1f} samples/s, mean "
             f"{v['mean_input_tokens']:.1f} tokens")

  if not args.skip_beam:
    beam = {name: ph.summary() for name, ph in zip(rank_states, bphases)}
    fast, lib = rank_states["fast"].ranked, rank_states["library"].ranked
    rows = [(a[1][a[0] >= 0], b[1][b[0] >= 0]) for a, b in zip(fast, lib)]
    beam["identical_rankings_fraction"] = float(np.mean(
        np.concatenate([np.all(x == y, axis=1) for x, y in rows])))
    beam["identical_top1_fraction"] = float(np.mean(
        np.concatenate([x[:, 0] == y[:, 0] for x, y in rows])))
    beam["speedup"] = beam["fast"]["users_per_s"] / beam["library"]["users_per_s"]
    beam["compile_s"] = {k: st.compile_s for k, st in rank_states.items()}
    beam["gflop_by_tokens"] = {k: st.gflop for k, st in rank_states.items()}
    bg.log(f"fast beam search: {beam['speedup']:.1f}x the library, identical rankings for "
           f"{beam['identical_rankings_fraction']:.4f} of users (top-1 "
           f"{beam['identical_top1_fraction']:.4f})")
    results["beam"] = beam

  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=1, default=str)
    bg.log(f"wrote {args.json_out}")
  return results


if __name__ == "__main__":
  main()
