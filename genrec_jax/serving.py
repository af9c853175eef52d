"""Recommendations from a finished run, outside the training script (issue 15).

    from genrec_jax import Recommender
    rec = Recommender.load("runs/tiger_toys_cpu")
    items, scores = rec.recommend([["B0001", "B0042"], ["B0100"]], k=10)

`Recommender.load` reads what a TIGER or LETTER run stored in its workdir: the config
(`config.json`), the identifier table (`identifiers.csv`: every item's raw id and identifier)
and the recommender's best parameters (`checkpoints/grm`, the epoch loop's `best_params`).
`recommend` maps raw item ids to the run's items, ranks with the run's beam search
(trie-constrained or not, as the run was evaluated) and returns raw item ids, each at most once,
with their sequence log-probabilities. `export` serialises the ranking function with
`jax.export` (StableHLO: the parameters, identifier map and trie inside), which
`load_exported` reloads and calls without this library's model code.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genrec_jax import stages
from genrec_jax.config import base_config
from genrec_jax.decoding.trie import search_trie, trie_capacity
from genrec_jax.tokenizers.identifiers import IdentifierTable, read_identifiers_csv
from genrec_jax.training.checkpoint import Checkpoints
from genrec_jax.training.grm import GRMTrainer, beam_rank, identifier_inputs, ranking_options
from genrec_jax.training.sharding import make_mesh

SERVED_METHODS = ("tiger", "letter")


def stored_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of a run (WORKDIR/config.json over `base_config`, lists back to tuples)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: give the --workdir of a finished run")
  with open(path) as f:
    stored = json.load(f)
  config = base_config()

  def merge(node, values):
    for name, value in values.items():
      if name not in node:
        continue
      if isinstance(value, dict):
        merge(node[name], value)
      else:
        node[name] = tuple(value) if isinstance(node[name], tuple) else value

  merge(config, stored)
  return config


def read_table(path: str, config: ml_collections.ConfigDict) -> tuple[IdentifierTable, np.ndarray]:
  """The identifier table of a run's identifiers.csv (one identifier per item, rows in item
  order) and the raw item id of each item index."""
  tok = config.tokenizer
  table, item_ids = read_identifiers_csv(path, tok.codebook_size, tok.dedup_size)
  if table.depth != tok.num_levels + 1:
    raise ValueError(f"{path}: {table.depth - 1} code levels, but the run's config has "
                     f"tokenizer.num_levels={tok.num_levels}")
  return table, item_ids


class Recommender:
  """A finished run's recommender: raw item-id histories in, raw item ids and scores out.

  Attributes:
    config: the run's config.
    table: its identifier table (row i = item i).
    item_ids: str [num_items], the raw id of each item index.
  """

  def __init__(self, config: ml_collections.ConfigDict, table: IdentifierTable,
               item_ids: np.ndarray, ranker: GRMTrainer, params):
    self.config, self.table, self.item_ids = config, table, item_ids
    self.index = {str(raw): i for i, raw in enumerate(item_ids)}
    self.ranker, self.params = ranker, jax.device_get(params)
    self.item_tokens = jnp.asarray(table.item_tokens(len(item_ids)))
    self.trie = jax.tree.map(jnp.asarray, search_trie(
        table, trie_capacity(table.level_sizes, len(item_ids))))
    self._compiled = {}  # k -> the jitted ranking

  @classmethod
  def load(cls, workdir: str) -> "Recommender":
    """The recommender a TIGER or LETTER run trained in `workdir` (its best validation
    epoch)."""
    config = stored_config(workdir)
    if config.method not in SERVED_METHODS:
      raise ValueError(f"{workdir} holds a {config.method!r} run; Recommender serves "
                       f"{SERVED_METHODS} runs")
    table, item_ids = read_table(os.path.join(workdir, "identifiers.csv"), config)
    directory = os.path.join(workdir, "checkpoints", "grm")
    ranker = stages.grm_trainer(config, table.vocab_size, make_mesh())
    store = Checkpoints(directory, ("params", "opt_state", "best_params"))
    step = store.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory} holds no recommender checkpoint: is the run finished?")
    items, _ = store.restore(step, {"best_params": ranker.init_params})
    store.close()
    return cls(config, table, item_ids, ranker, items["best_params"])

  def histories(self, histories: list[list]) -> np.ndarray:
    """Item indices int32 [B, max_history] of raw-id histories, right-aligned (-1 = padding,
    the layout the recommender trained on); the most recent `data.max_history` items kept."""
    width = self.config.data.max_history
    out = np.full((len(histories), width), -1, np.int32)
    for row, history in enumerate(histories):
      if not history:
        raise ValueError(f"history {row} is empty: give at least one item id")
      unknown = [h for h in history if str(h) not in self.index]
      if unknown:
        raise ValueError(f"history {row}: unknown item ids {unknown[:5]} (not in the run's "
                         f"catalog of {len(self.item_ids)} items)")
      indices = [self.index[str(h)] for h in history][-width:]
      out[row, width - len(indices):] = indices
    return out

  def rank_function(self, k: int):
    """(params, history int32 [B, max_history], item_tokens, trie) -> (items [B, k], scores
    [B, k]): the run's beam search with beam k."""
    static = ranking_options(self.table, self.ranker.cfg, beam_size=k)
    merge = self.ranker.trainer.merge

    def rank(params, history, item_tokens, trie):
      model = merge(params)
      encoded, mask = model.encode(identifier_inputs(history, item_tokens))
      return beam_rank(model, encoded, mask, trie, **static)

    return rank

  def recommend(self, histories: list[list], k: int = 10) -> tuple[list[list[str]], np.ndarray]:
    """The top-k raw item ids of each history (each item at most once, fewer when the beams
    hold fewer items) and their scores float32 [B, k] (-inf where no item)."""
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    if k not in self._compiled:
      self._compiled[k] = jax.jit(self.rank_function(k))
    items, scores = self._compiled[k](self.params, jnp.asarray(self.histories(histories)),
                                      self.item_tokens, self.trie)
    return self._raw(np.asarray(items)), np.where(np.asarray(items) >= 0, np.asarray(scores),
                                                   -np.inf)

  def _raw(self, items: np.ndarray) -> list[list[str]]:
    return [[str(self.item_ids[i]) for i in row if i >= 0] for row in items]

  def export(self, batch_size: int, k: int = 10) -> bytes:
    """The ranking of `batch_size` histories (int32 [batch_size, data.max_history] item
    indices, as `histories` makes them) serialised with `jax.export`, parameters, identifier
    map and trie included: `load_exported(blob)(history)` returns (items, scores)."""
    rank = self.rank_function(k)
    params, item_tokens, trie = self.params, self.item_tokens, self.trie
    spec = jax.ShapeDtypeStruct((batch_size, self.config.data.max_history), jnp.int32)
    exported = jax.export.export(jax.jit(lambda h: rank(params, h, item_tokens, trie)))(spec)
    return bytes(exported.serialize())


def load_exported(blob: bytes):
  """A ranking function serialised by `Recommender.export`: history int32 [B, max_history]
  item indices -> (items int32 [B, k], scores float32 [B, k]); no model code needed."""
  return jax.export.deserialize(bytearray(blob)).call
