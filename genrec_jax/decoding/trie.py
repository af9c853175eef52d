"""Prefix trie of valid identifiers, stored as arrays for use inside jit.

Node 0 is the root. `child_rows(nodes, size)` gives, for each node, the node reached by every
symbol of the next position (-1 if that prefix is invalid); `leaf_item[node]` is the item an
identifier-complete node denotes (-1 for inner nodes). Stepping the trie inside beam search is
a few gathers, so no Python runs per decoding step. Two layouts give the same rows: `Trie`
stores them densely (`children[node, s]`, fast, 1 KiB per node with 256-symbol levels) and
`SparseTrie` stores each node's consecutive children range (12 bytes per node, for catalogs of
millions of items); `search_trie` picks one by size.

The trie is an argument of the compiled search, so its shape is part of the compiled program:
`trie_capacity` gives a node count that depends only on the level sizes and the catalog size,
and `build_trie(..., num_nodes=...)` pads to it, so that tables that change between periods or
methods reuse one compiled search instead of compiling one per table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from genrec_jax.tokenizers.identifiers import IdentifierTable


@dataclasses.dataclass(frozen=True)
class Trie:
  """Dense prefix trie: 4 * max(level_sizes) bytes per node (35 MiB for 12 k items with
  256-symbol levels, 2 GiB for 1 M).

  Attributes:
    children: int32 [num_nodes, max(level_sizes)], child node or -1.
    leaf_item: int32 [num_nodes], item index at complete identifiers, else -1.
  """

  children: jax.Array | np.ndarray
  leaf_item: jax.Array | np.ndarray

  def child_rows(self, nodes: jax.Array, size: int) -> jax.Array:
    """Children int32 [..., size] of nodes [...] for the next position's `size` symbols (-1 =
    no such prefix, and for nodes < 0)."""
    rows = self.children[jnp.maximum(nodes, 0)][..., :size]
    return jnp.where(nodes[..., None] >= 0, rows, -1)


@dataclasses.dataclass(frozen=True)
class SparseTrie:
  """Sparse prefix trie: 12 bytes per node, for catalogs whose dense rows do not fit.

  A node's children are consecutive node ids (the builder numbers each level's nodes in
  (parent, symbol) order), so a node stores where they start and how many there are, and
  each node the symbol of its incoming edge. `child_rows` expands a node's children into the
  dense row the beam search reads (one gather of `size` candidate ids and one scatter), so the
  search is the same as over the dense trie.

  Attributes:
    first_child, num_children: int32 [num_nodes], the node's children ids
      first_child .. first_child + num_children - 1.
    symbol: int32 [num_nodes], the symbol leading to the node (root: 0).
    leaf_item: int32 [num_nodes], item index at complete identifiers, else -1.
  """

  first_child: jax.Array | np.ndarray
  num_children: jax.Array | np.ndarray
  symbol: jax.Array | np.ndarray
  leaf_item: jax.Array | np.ndarray

  def child_rows(self, nodes: jax.Array, size: int) -> jax.Array:
    """As `Trie.child_rows`: children int32 [..., size] of nodes [...] (-1 = none)."""
    safe = jnp.maximum(nodes, 0)
    rank = jnp.arange(size)
    candidates = self.first_child[safe][..., None] + rank  # [..., size]
    real = (rank < self.num_children[safe][..., None]) & (nodes[..., None] >= 0)
    last = self.symbol.shape[0] - 1
    symbols = jnp.where(real, self.symbol[jnp.minimum(candidates, last)], size)  # size: drop
    flat_symbols = symbols.reshape(-1, size)
    rows = jnp.full(flat_symbols.shape, -1, jnp.int32).at[
        jnp.arange(flat_symbols.shape[0])[:, None], flat_symbols].set(
            candidates.reshape(-1, size).astype(jnp.int32), mode="drop")
    return rows.reshape(symbols.shape)


jax.tree_util.register_dataclass(Trie, data_fields=["children", "leaf_item"], meta_fields=[])
jax.tree_util.register_dataclass(
    SparseTrie, data_fields=["first_child", "num_children", "symbol", "leaf_item"],
    meta_fields=[])

DENSE_TRIE_LIMIT_BYTES = 256 * 2**20  # `search_trie` builds a sparse trie above this


def trie_capacity(level_sizes: tuple[int, ...], num_identifiers: int) -> int:
  """Most nodes a trie of `num_identifiers` identifiers with these level sizes can have:
  the root plus, at each depth, at most min(all prefixes of that length, identifiers)."""
  nodes, prefixes = 1, 1
  for size in level_sizes:
    prefixes *= int(size)
    nodes += min(prefixes, int(num_identifiers))
  return nodes


@dataclasses.dataclass(frozen=True)
class _Edges:
  """Every edge of a table's trie: parent, symbol and child node ids (children numbered level
  by level in (parent, symbol) order), the node count, and each leaf's item."""

  parent: np.ndarray
  symbol: np.ndarray
  child: np.ndarray
  num_nodes: int
  leaf_node: np.ndarray
  leaf_item: np.ndarray


def _trie_edges(table: IdentifierTable, num_nodes: int | None) -> _Edges:
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
  first = np.unique(parent, return_index=True)[1]  # duplicates keep the first item
  return _Edges(np.concatenate(edges_parent), np.concatenate(edges_symbol),
                np.concatenate(edges_child), next_id if num_nodes is None else num_nodes,
                parent[first], table.item[first])


def build_trie(table: IdentifierTable, num_nodes: int | None = None) -> Trie:
  """Builds the dense trie of every identifier in `table` (duplicates keep the first item).

  With `num_nodes`, the arrays are padded with unused nodes (no children, no item) to that
  many rows, e.g. `trie_capacity(table.level_sizes, catalog size)`.
  """
  edges = _trie_edges(table, num_nodes)
  children = np.full((edges.num_nodes, max(table.level_sizes)), -1, np.int32)
  children[edges.parent, edges.symbol] = edges.child
  leaf_item = np.full(edges.num_nodes, -1, np.int32)
  leaf_item[edges.leaf_node] = edges.leaf_item
  return Trie(children=children, leaf_item=leaf_item)


def build_sparse_trie(table: IdentifierTable, num_nodes: int | None = None) -> SparseTrie:
  """Builds the sparse trie of every identifier in `table` (as `build_trie`, padding
  included)."""
  edges = _trie_edges(table, num_nodes)
  num_children = np.bincount(edges.parent, minlength=edges.num_nodes).astype(np.int32)
  first_child = np.zeros(edges.num_nodes, np.int32)
  # edges are sorted by parent and each parent's children are consecutive ids
  starts = np.unique(edges.parent, return_index=True)
  first_child[starts[0]] = edges.child[starts[1]]
  symbol = np.zeros(edges.num_nodes, np.int32)
  symbol[edges.child] = edges.symbol
  leaf_item = np.full(edges.num_nodes, -1, np.int32)
  leaf_item[edges.leaf_node] = edges.leaf_item
  return SparseTrie(first_child=first_child, num_children=num_children, symbol=symbol,
                    leaf_item=leaf_item)


def search_trie(table: IdentifierTable, num_nodes: int | None = None,
                kind: str = "auto") -> Trie | SparseTrie:
  """The trie beam search reads: "dense", "sparse", or "auto" (dense while its children
  array stays within `DENSE_TRIE_LIMIT_BYTES`, sparse above)."""
  if kind not in ("auto", "dense", "sparse"):
    raise ValueError(f"trie kind must be 'auto', 'dense' or 'sparse', got {kind!r}")
  if kind == "auto":
    rows = num_nodes or trie_capacity(table.level_sizes, len(table.codes))
    dense_bytes = 4 * rows * max(table.level_sizes)
    kind = "dense" if dense_bytes <= DENSE_TRIE_LIMIT_BYTES else "sparse"
  return build_trie(table, num_nodes) if kind == "dense" else build_sparse_trie(table, num_nodes)
