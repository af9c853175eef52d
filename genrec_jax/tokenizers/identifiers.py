"""Item identifier tables: codes + dedup digit, uniqueness, token mapping, CSV export.

An identifier is L residual codes plus one dedup digit (PROTOCOLS.md section 3). The table maps
identifiers to items explicitly (`item` column) instead of by arithmetic, so that one item may
own several identifiers (PIT) and tables may change between periods (DACT).

GRM tokens: level l (0-based) with local code c becomes token `offsets[l] + c`, where
`offsets[l] = 1 + sum_{j<l} level_sizes[j]`; token 0 is padding / decoder start.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import tempfile

import numpy as np
from absl import logging
from flax import nnx


@dataclasses.dataclass(frozen=True)
class IdentifierTable:
  """Identifiers of a catalog.

  Attributes:
    codes: int32 [M, L + 1], M identifiers of L codes plus the dedup digit.
    item: int32 [M], the item index each identifier denotes.
    level_sizes: tuple of L + 1 ints, the number of symbols per position (K for code levels,
      the dedup vocabulary for the last position).
  """

  codes: np.ndarray
  item: np.ndarray
  level_sizes: tuple[int, ...]

  def __post_init__(self):
    if self.codes.ndim != 2 or self.codes.shape[1] != len(self.level_sizes):
      raise ValueError(f"codes must be [M, {len(self.level_sizes)}], got {self.codes.shape}")
    if self.item.shape != (self.codes.shape[0],):
      raise ValueError(f"item must be [{self.codes.shape[0]}], got {self.item.shape}")
    too_big = self.codes >= np.asarray(self.level_sizes)[None, :]
    if too_big.any() or (self.codes < 0).any():
      level = int(np.argwhere(too_big | (self.codes < 0))[0, 1])
      raise ValueError(f"identifier position {level} has a symbol outside "
                       f"[0, {self.level_sizes[level]}): max {self.codes[:, level].max()}")

  @property
  def depth(self) -> int:
    return len(self.level_sizes)

  @property
  def offsets(self) -> np.ndarray:
    """int32 [L + 1], the token id of symbol 0 at each position."""
    return (1 + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]])).astype(np.int32)

  @property
  def vocab_size(self) -> int:
    """Number of GRM tokens (padding included)."""
    return 1 + int(sum(self.level_sizes))

  def tokens(self) -> np.ndarray:
    """int32 [M, L + 1] token ids of every identifier."""
    return (self.codes + self.offsets[None, :]).astype(np.int32)

  def item_tokens(self, num_items: int) -> np.ndarray:
    """int32 [num_items, L + 1] the first identifier's tokens per item (0 rows if none)."""
    out = np.zeros((num_items, self.depth), np.int32)
    first = np.unique(self.item, return_index=True)[1][::-1]
    out[self.item[first]] = self.tokens()[first]
    return out

  def item_token_sets(self, num_items: int, width: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Every identifier of every item (one-to-many tables): tokens int32 [num_items, m, L + 1]
    with m = `width` (default: the most identifiers any item owns), in table order, 0 rows
    past an item's count; and count int32 [num_items], the identifiers each item owns. A
    fixed width keeps one array shape while the counts change (PIT's index)."""
    count = np.bincount(self.item, minlength=num_items).astype(np.int32)
    most = int(count.max(initial=0))
    if width is not None and width < most:
      raise ValueError(f"an item owns {most} identifiers, more than width={width}")
    out = np.zeros((num_items, width or max(most, 1), self.depth), np.int32)
    order = np.argsort(self.item, kind="stable")
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank = np.arange(len(order)) - starts[self.item[order]]  # position among its item's rows
    out[self.item[order], rank] = self.tokens()[order]
    return out, count

  def duplicates(self) -> int:
    """Number of identifiers that repeat an earlier one (0 for a valid table)."""
    return int(self.codes.shape[0] - np.unique(self.codes, axis=0).shape[0])


def code_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Groups of identical rows of codes int [N, L] (N >= 1): each row's group int64 [N] (groups
  numbered in sorted code order) and each group's size int64 [G]. Rows become one int64 key
  when the code ranges allow (seconds for 10 M rows, against a minute for a row-wise sort)."""
  codes = np.asarray(codes, np.int64)
  sizes = [int(m) + 1 for m in codes.max(axis=0)] if codes.size else []
  if codes.min(initial=0) >= 0 and np.prod(np.asarray(sizes, dtype=object)) < 2**62:
    keys = np.ravel_multi_index(tuple(codes.T), sizes) if sizes else np.zeros(len(codes))
    _, group, counts = np.unique(keys, return_inverse=True, return_counts=True)
  else:
    _, group, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
  return group.reshape(-1).astype(np.int64), counts


def assign_dedup(codes: np.ndarray, dedup_size: int, *,
                 preferred: np.ndarray | None = None) -> np.ndarray:
  """Appends the dedup digit so that no two rows of codes [N, L] share an identifier.

  Within a group of items with identical codes, digits are 0, 1, 2, ... in item-index order.
  With `preferred` (int [N], -1 = no preference) an item keeps its preferred digit when no other
  item of its group claims the same one first; remaining items take the smallest free digits.
  This keeps unchanged items' identifiers stable across re-assignments (DACT).

  Returns int32 [N, L + 1]. Raises ValueError if a group is larger than dedup_size.
  """
  codes = np.asarray(codes, np.int32)
  n = codes.shape[0]
  group, counts = code_groups(codes)
  if counts.max(initial=0) > dedup_size:
    raise ValueError(f"{counts.max()} items share one code sequence, more than the dedup "
                     f"vocabulary ({dedup_size}); increase tokenizer.dedup_size")
  order = np.argsort(group, kind="stable")
  bounds = np.concatenate([[0], np.cumsum(counts)])
  if preferred is None:  # each item's place in its group, in item order (vectorised: 10 M items)
    digit = np.empty(n, np.int64)
    digit[order] = np.arange(n) - bounds[group[order]]
    return np.concatenate([codes, digit[:, None].astype(np.int32)], axis=1)
  digit = np.full(n, -1, np.int64)
  for g in range(len(counts)):
    members = order[bounds[g]:bounds[g + 1]]
    taken = set()
    for i in members:
      p = int(preferred[i])
      if 0 <= p < dedup_size and p not in taken:
        digit[i] = p
        taken.add(p)
    free = (d for d in range(dedup_size) if d not in taken)
    for i in members:
      if digit[i] < 0:
        digit[i] = next(free)
  digit[digit < 0] = 0
  return np.concatenate([codes, digit[:, None].astype(np.int32)], axis=1)


def one_to_one_table(codes_with_dedup: np.ndarray, codebook_size: int,
                     dedup_size: int) -> IdentifierTable:
  """Table where row i is the identifier of item i; checks uniqueness."""
  codes_with_dedup = np.asarray(codes_with_dedup, np.int32)
  levels = codes_with_dedup.shape[1] - 1
  table = IdentifierTable(codes_with_dedup, np.arange(codes_with_dedup.shape[0], dtype=np.int32),
                          (codebook_size,) * levels + (dedup_size,))
  if table.duplicates():
    raise AssertionError(f"identifier table has {table.duplicates()} duplicated identifiers")
  return table


def collision_rate(codes: np.ndarray) -> float:
  """Fraction of items whose L codes (before dedup) are shared with another item."""
  _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
  return float((counts[inverse.reshape(-1)] > 1).mean())


def refresh_identifiers(codes: np.ndarray, previous: np.ndarray, dedup_size: int
                        ) -> tuple[np.ndarray, dict]:
  """Identifiers int32 [N, L + 1] of new codes int [N, L] after previous identifiers
  [N, L + 1]: an item whose codes did not change keeps its dedup digit; the others take the
  smallest free digits of their code group (`assign_dedup`). Returns them with the cycle's
  statistics: code_change (items whose codes changed), identifier_change, collision_rate
  (before the dedup digit), max_dedup_digit and refresh_skipped.

  When more items share one code sequence than the dedup vocabulary holds, the previous
  identifiers are kept for this cycle (refresh_skipped = 1, with a warning) instead of stopping
  the run: the vocabulary is fixed when the model is built (the ETEGRec and UniGRec official code
  crash here).
  """
  unchanged = np.all(codes == previous[:, :-1], axis=1)
  stats = {"code_change": float(1.0 - unchanged.mean()),
           "collision_rate": collision_rate(codes)}
  largest = int(np.unique(codes, axis=0, return_counts=True)[1].max())
  if largest > dedup_size:
    logging.warning("[identifiers] %d items share one code sequence, more than the dedup "
                    "vocabulary (%d): identifiers kept from the previous cycle; a larger "
                    "tokenizer.dedup_size avoids this", largest, dedup_size)
    return previous, {**stats, "identifier_change": 0.0,
                      "max_dedup_digit": int(previous[:, -1].max()), "refresh_skipped": 1}
  identifiers = assign_dedup(codes, dedup_size,
                             preferred=np.where(unchanged, previous[:, -1], -1))
  stats.update(identifier_change=float(np.any(identifiers != previous, axis=1).mean()),
               max_dedup_digit=int(identifiers[:, -1].max()), refresh_skipped=0)
  return identifiers, stats


class Identifiers(nnx.Variable):
  """An identifier map kept in a model's state: int32 [num_items, D] GRM tokens per item. Not a
  parameter: no optimizer updates it; a method replaces it between epochs (ETEGRec, UniGRec),
  and since it sits in the model state it is looked up inside the compiled step and saved with
  every checkpoint."""


def write_identifiers_csv(path: str, table: IdentifierTable, item_ids: np.ndarray) -> None:
  """Writes `item,code_1..code_L,dedup` (raw item ids) atomically."""
  levels = table.depth - 1
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  with os.fdopen(fd, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["item"] + [f"code_{l + 1}" for l in range(levels)] + ["dedup"])
    for item, row in zip(table.item, table.codes):
      writer.writerow([item_ids[item]] + [int(c) for c in row])
  os.replace(tmp, path)


def read_identifiers_csv(path: str, codebook_size: int, dedup_size: int,
                         item_ids: np.ndarray | None = None
                         ) -> tuple[IdentifierTable, np.ndarray]:
  """Reads a table written by `write_identifiers_csv`: (table, raw item ids).

  With `item_ids` (raw ids in item-index order) rows map to those indices, and an id outside
  them is an error; without, the file defines the items: one row per item, item i the i-th
  row, and the raw ids are returned in that order. The dedup vocabulary is `dedup_size`, or
  larger when a stored digit needs it (a run whose vocabulary grew,
  `identifiers_from_codes`)."""
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    rows = list(reader)
  if not header or header[0] != "item" or header[-1] != "dedup" or not rows:
    raise ValueError(f"{path}: expected the header item,code_1..code_L,dedup and one row per "
                     f"identifier (a run's identifiers.csv), got {header}")
  codes = np.asarray([[int(c) for c in r[1:]] for r in rows], np.int32)
  if item_ids is None:
    item_ids = np.asarray([r[0] for r in rows])
    if len(np.unique(item_ids)) != len(item_ids):
      raise ValueError(f"{path}: an item has several rows; pass the run's item ids")
    item = np.arange(len(rows), dtype=np.int32)
  else:
    index = {str(v): i for i, v in enumerate(item_ids)}
    unknown = [r[0] for r in rows if r[0] not in index]
    if unknown:
      raise ValueError(f"{path}: {len(unknown)} unknown item ids, e.g. {unknown[:3]}")
    item = np.asarray([index[r[0]] for r in rows], np.int32)
  dedup_size = max(dedup_size, int(codes[:, -1].max()) + 1)
  table = IdentifierTable(codes, item, (codebook_size,) * (len(header) - 2) + (dedup_size,))
  return table, item_ids
