"""Decoding at catalog scale (issue 15): trie build time and memory, beam-search users/s.

Synthetic identifier tables of N items (3 levels x 256 codes plus the dedup digit), with codes
drawn uniformly or clustered (level-1 codes from a power law, p_k ~ 1 / (k + 10), each deeper
level from 32 codes per parent prefix, so that branches are uneven and collisions many). For
each table: the dense and sparse tries' build seconds and bytes (the dense one only while it
fits `--dense_limit_gib`), then beam search of `--users` users with each step function:
- `random`: a fixed random logit table indexed by the last token (no model: the search's own
  cost);
- `t5`: the cpu preset's T5 (2+2 layers, d_model 64) with random weights over random histories.
With `--exact_check`, the first size also checks a beam as large as the catalog against
exhaustive scoring of every identifier (random step function). Last, RQ-k-means
(`tokenizers.rqkmeans`, 3 x 256 codes, 100 mini-batch steps of 4,096 per level) on
`--rqkmeans_items` random vectors: seconds and collision rate.

  python tools/bench_catalog.py --sizes=10000,100000,1000000,10000000 --beams=20,100 \
      --json_out=experiments/benchmarks/catalog_cpu.jsonl
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from genrec_jax.decoding.beam_search import beam_search
from genrec_jax.decoding.trie import build_sparse_trie, build_trie
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.tokenizers.identifiers import (assign_dedup, code_groups, collision_rate,
                                               one_to_one_table)
from genrec_jax.tokenizers.rqkmeans import fit_rq_kmeans

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["10000", "100000", "1000000", "10000000"], "Catalog sizes.")
flags.DEFINE_list("beams", ["20", "100"], "Beam sizes.")
flags.DEFINE_list("distributions", ["uniform", "clustered"], "Code distributions.")
flags.DEFINE_list("steps", ["random", "t5"], "Step functions.")
flags.DEFINE_integer("users", 256, "Users per search batch.")
flags.DEFINE_integer("repeats", 3, "Timed searches after the compiling one.")
flags.DEFINE_float("dense_limit_gib", 2.5, "Largest dense trie to build.")
flags.DEFINE_bool("exact_check", True, "Check a catalog-sized beam against brute force.")
flags.DEFINE_string("json_out", "", "Append one JSON line per measurement to this file.")
flags.DEFINE_integer("rqkmeans_items", 10_000_000, "Item vectors of the RQ-k-means measurement "
                     "(0 = skip).")
flags.DEFINE_integer("rqkmeans_dim", 32, "Size of those vectors.")

LEVELS, CODES = 3, 256


def synthetic_table(num_items: int, distribution: str, seed: int = 0):
  """Identifier table of num_items items: codes [N, 3] and the dedup digit."""
  rng = np.random.default_rng(seed)
  if distribution == "uniform":
    codes = rng.integers(0, CODES, (num_items, LEVELS))
  elif distribution == "clustered":
    weight = 1.0 / (np.arange(CODES) + 10.0)  # level 1: a power law, 3 % on the top code
    codes = [rng.choice(CODES, num_items, p=weight / weight.sum())]
    for _ in range(1, LEVELS):  # 32 codes per parent prefix, placed by a hash of the prefix
      prefix = np.zeros(num_items, np.int64)
      for c in codes:
        prefix = prefix * CODES + c
      codes.append((prefix * 2654435761 + 8 * rng.integers(0, 32, num_items)) % CODES)
    codes = np.stack(codes, 1)
  else:
    raise ValueError(f"unknown distribution {distribution!r}")
  identifiers = assign_dedup(codes, num_items)
  dedup = int(identifiers[:, -1].max()) + 1
  return one_to_one_table(identifiers, CODES, dedup)


def nbytes(tree) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def random_step(vocab: int, seed: int = 0):
  """A step function without a model: fixed random log-probabilities per last token."""
  table = jax.nn.log_softmax(jax.random.normal(jax.random.key(seed), (vocab, vocab)) * 3, -1)
  return lambda last, state: (table[last[:, 0]], state), table


def t5_step(vocab: int, users: int, seed: int = 0):
  cfg = T5Config(vocab_size=vocab, d_model=64, d_ff=256, num_heads=4, d_kv=16,
                 num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
  model = T5(cfg, rngs=nnx.Rngs(seed))
  history = jax.random.randint(jax.random.key(seed), (users, 40), 1, vocab)
  encoded, mask = model.encode(history)
  memory = model.decoder_memory(encoded)

  def step(last, cache):
    logits, cache = model.decode_step(memory, mask, last, cache)
    return jax.nn.log_softmax(logits, -1), cache

  return step, model.init_cache(users)


def time_search(step, state, users, trie, table, beam) -> tuple[float, float]:
  """(compile + first run seconds, users/s over the timed repeats)."""
  offsets = tuple(int(o) for o in table.offsets)
  search = jax.jit(lambda trie, state: beam_search(step, state, users, trie, offsets,
                                                   tuple(table.level_sizes), beam)[0])
  t0 = time.time()
  jax.block_until_ready(search(trie, state))
  first = time.time() - t0
  t0 = time.time()
  for _ in range(FLAGS.repeats):
    jax.block_until_ready(search(trie, state))
  return first, FLAGS.repeats * users / (time.time() - t0)


def exact_check(table, trie) -> bool:
  """A beam as large as the catalog finds the brute-force top 20 of 4 users exactly."""
  step, logp = random_step(table.vocab_size)
  tokens = table.tokens()  # [N, D]
  starts = np.zeros((len(tokens), 1), np.int64)
  previous = np.concatenate([starts, tokens[:, :-1]], axis=1)
  scores = np.asarray(logp)[previous, tokens].sum(1)  # the same for every user
  want = table.item[np.argsort(-scores, kind="stable")[:20]]
  offsets = tuple(int(o) for o in table.offsets)
  items, _, _ = jax.jit(lambda trie: beam_search(
      step, None, 4, trie, offsets, tuple(table.level_sizes), len(tokens)))(trie)
  return bool((np.asarray(items)[:, :20] == want[None]).all())


def main(argv):
  del argv
  out = open(FLAGS.json_out, "a") if FLAGS.json_out else None
  for size_index, size in enumerate(int(s) for s in FLAGS.sizes):
    for distribution in FLAGS.distributions:
      t0 = time.time()
      table = synthetic_table(size, distribution)
      tables_seconds = time.time() - t0
      tries = {}
      t0 = time.time()
      tries["sparse"] = jax.tree.map(jnp.asarray, build_sparse_trie(table))
      build = {"sparse": time.time() - t0}
      dense_rows = len(tries["sparse"].leaf_item)
      if 4 * dense_rows * max(table.level_sizes) <= FLAGS.dense_limit_gib * 2**30:
        t0 = time.time()
        tries["dense"] = jax.tree.map(jnp.asarray, build_trie(table))
        build["dense"] = time.time() - t0
      record = {"items": size, "distribution": distribution, "nodes": dense_rows,
                "dedup_size": int(table.level_sizes[-1]), "table_seconds": tables_seconds,
                "build_seconds": build, "trie_bytes": {k: nbytes(v) for k, v in tries.items()},
                "dense_bytes_if_built": 4 * dense_rows * max(table.level_sizes)}
      if FLAGS.exact_check and size_index == 0 and size <= 20000:
        record["exact_top20_with_catalog_beam"] = exact_check(table, tries["sparse"])
      searches = []
      for name in FLAGS.steps:
        for beam in (int(b) for b in FLAGS.beams):
          if name == "random":
            step, _ = random_step(table.vocab_size)
            state = None
          else:
            step, state = t5_step(table.vocab_size, FLAGS.users)
          for kind, trie in tries.items():
            first, users_per_s = time_search(step, state, FLAGS.users, trie, table, beam)
            searches.append({"step": name, "beam": beam, "trie": kind,
                             "first_call_seconds": first, "users_per_s": users_per_s})
      record["searches"] = searches
      line = json.dumps(record)
      print(line, flush=True)
      if out:
        out.write(line + "\n")
        out.flush()
  if FLAGS.rqkmeans_items:
    x = np.random.default_rng(0).normal(size=(FLAGS.rqkmeans_items, FLAGS.rqkmeans_dim))
    x = x.astype(np.float32)
    t0 = time.time()
    _, codes = fit_rq_kmeans(x, LEVELS, CODES, 0, batch_size=4096, steps=100)
    record = {"rqkmeans_items": len(x), "dim": x.shape[1], "seconds": time.time() - t0,
              "collision_rate": collision_rate(codes),
              "max_group": int(code_groups(codes)[1].max())}
    print(json.dumps(record), flush=True)
    if out:
      out.write(json.dumps(record) + "\n")
  if out:
    out.close()


if __name__ == "__main__":
  app.run(main)
