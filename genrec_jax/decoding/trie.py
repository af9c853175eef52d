"""Prefix trie of valid identifiers, stored as dense arrays for use inside jit.

Node 0 is the root. `children[node, s]` is the node reached from `node` by symbol s of the next
position (-1 if that prefix is invalid); `leaf_item[node]` is the item an identifier-complete node
denotes (-1 for inner nodes). Stepping the trie inside beam search is two gathers, so no Python
runs per decoding step.

The trie is an argument of the compiled search, so its shape is part of the compiled program:
`trie_capacity` gives a node count that depends only on the level sizes and the catalog size,
and `build_trie(..., num_nodes=...)` pads to it, so that tables that change between periods or
methods reuse one compiled search instead of compiling one per table.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from genrec_jax.tokenizers.identifiers import IdentifierTable


@dataclasses.dataclass(frozen=True)
class Trie:
  """Dense prefix trie.

  Attributes:
    children: int32 [num_nodes, max(level_sizes)], child node or -1.
    leaf_item: int32 [num_nodes], item index at complete identifiers, else -1.
  """

  children: jax.Array | np.ndarray
  leaf_item: jax.Array | np.ndarray


jax.tree_util.register_dataclass(Trie, data_fields=["children", "leaf_item"], meta_fields=[])


def trie_capacity(level_sizes: tuple[int, ...], num_identifiers: int) -> int:
  """Most nodes a trie of `num_identifiers` identifiers with these level sizes can have:
  the root plus, at each depth, at most min(all prefixes of that length, identifiers)."""
  nodes, prefixes = 1, 1
  for size in level_sizes:
    prefixes *= int(size)
    nodes += min(prefixes, int(num_identifiers))
  return nodes


def build_trie(table: IdentifierTable, num_nodes: int | None = None) -> Trie:
  """Builds the trie of every identifier in `table` (duplicates keep the first item).

  With `num_nodes`, the arrays are padded with unused nodes (no children, no item) to that
  many rows, e.g. `trie_capacity(table.level_sizes, catalog size)`.
  """
  codes = table.codes.astype(np.int64)
  num_ids, depth = codes.shape
  width = max(table.level_sizes)
  parent = np.zeros(num_ids, np.int64)  # node of each identifier's current prefix
  next_id = 1
  edges_parent, edges_symbol, edges_child = [], [], []
  for pos in range(depth):
    keys = parent * width + codes[:, pos]
    unique, inverse = np.unique(keys, return_inverse=True)
    child = next_id + np.arange(len(unique))
    edges_parent.append(unique // width)
    edges_symbol.append(unique % width)
    edges_child.append(child)
    parent = child[inverse.reshape(-1)]
    next_id += len(unique)
  if num_nodes is not None and num_nodes < next_id:
    raise ValueError(f"the trie needs {next_id} nodes, more than num_nodes={num_nodes}")
  rows = next_id if num_nodes is None else num_nodes
  children = np.full((rows, width), -1, np.int32)
  children[np.concatenate(edges_parent), np.concatenate(edges_symbol)] = np.concatenate(
      edges_child)
  leaf_item = np.full(rows, -1, np.int32)
  first = np.unique(parent, return_index=True)[1]
  leaf_item[parent[first]] = table.item[first]
  return Trie(children=children, leaf_item=leaf_item)
