"""Identifier step of the continual protocol: how period t's identifiers follow period t-1's.

Every rule returns an `IdentifierTable` over the period's catalog, one identifier per item,
rows in catalog order (`table.item == catalog`), and guarantees uniqueness (the official DACT
code re-uses old identifiers without re-checking collisions and ships duplicates).

Conventions: `catalog` is int [C], the item indices known at period t (it contains every item
of the previous table: catalogs only grow); `new_codes` is int [C, L], the L residual codes of
catalog[j] in row j, from whichever tokenizer the caller chose; tables carry L codes plus the
dedup digit, and `prev_table` must hold one identifier per item.

Rules:
- `keep_and_extend`: old identifiers frozen, new items get new codes (frozen tokenizer;
  Reformer, whose tokenizer was fine-tuned with the old items held at their codes,
  `tokenizers.dact.finetune_tokenizer(mode="reformer")`).
- `reencode_all`: every item re-encoded, dedup digits recomputed (naive fine-tuning).
- `hierarchical_reassign`: DACT's relaxed-to-strict rule.
"""

from __future__ import annotations

import numpy as np

from genrec_jax.tokenizers.identifiers import IdentifierTable, assign_dedup


def _previous_rows(prev_table: IdentifierTable, catalog: np.ndarray) -> np.ndarray:
  """Row of prev_table holding each catalog item, -1 for items new at this period -> int [C]."""
  if np.unique(prev_table.item).shape[0] != prev_table.item.shape[0]:
    raise ValueError("reassignment rules need one identifier per item in the previous table")
  size = int(max(prev_table.item.max(initial=-1), catalog.max(initial=-1))) + 1
  row_of_item = np.full(size, -1, np.int64)
  row_of_item[prev_table.item] = np.arange(prev_table.item.shape[0])
  rows = row_of_item[catalog]
  if (rows >= 0).sum() != prev_table.item.shape[0]:
    missing = np.setdiff1d(prev_table.item, catalog)
    raise ValueError(f"{missing.shape[0]} items of the previous table are missing from the "
                     f"catalog (catalogs only grow), e.g. {missing[:3].tolist()}")
  return rows


def _check_inputs(catalog: np.ndarray, new_codes: np.ndarray, levels: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
  catalog = np.asarray(catalog, np.int64)
  new_codes = np.asarray(new_codes, np.int64)
  if catalog.ndim != 1 or np.unique(catalog).shape[0] != catalog.shape[0]:
    raise ValueError(f"catalog must be distinct item indices [C], got shape {catalog.shape}")
  if new_codes.ndim != 2 or new_codes.shape[0] != catalog.shape[0]:
    raise ValueError(f"new_codes must be [C={catalog.shape[0]}, L], got {new_codes.shape}")
  if levels is not None and new_codes.shape[1] != levels:
    raise ValueError(f"new_codes have {new_codes.shape[1]} levels, the table {levels}")
  return catalog, new_codes


def _unique_identifiers(codes: np.ndarray, kept: np.ndarray, kept_digit: np.ndarray,
                        dedup_size: int) -> np.ndarray:
  """Identifiers [C, L + 1]: kept rows keep their digit, the others take free digits.

  codes: [C, L]; kept: bool [C]; kept_digit: [C] (read where kept). Kept identifiers must be
  distinct; every other row, in order, takes the smallest digit that no identifier with the
  same L codes uses yet. Raises ValueError when a code group runs out of dedup digits.
  """
  taken: dict[tuple[int, ...], set[int]] = {}
  for row in np.flatnonzero(kept):
    digits = taken.setdefault(tuple(codes[row].tolist()), set())
    if int(kept_digit[row]) in digits:
      raise ValueError(f"kept identifiers collide: {codes[row].tolist()} + {kept_digit[row]}")
    digits.add(int(kept_digit[row]))
  digit = np.where(kept, kept_digit, -1)
  for row in np.flatnonzero(~kept):
    digits = taken.setdefault(tuple(codes[row].tolist()), set())
    free = next((d for d in range(dedup_size) if d not in digits), None)
    if free is None:
      raise ValueError(f"more than {dedup_size} items share the codes {codes[row].tolist()}; "
                       f"increase the dedup vocabulary")
    digits.add(free)
    digit[row] = free
  return np.concatenate([codes, digit[:, None]], axis=1).astype(np.int32)


def _table(identifiers: np.ndarray, catalog: np.ndarray, level_sizes: tuple[int, ...]
           ) -> IdentifierTable:
  table = IdentifierTable(identifiers.astype(np.int32), catalog.astype(np.int32), level_sizes)
  if table.duplicates():
    raise AssertionError(f"reassignment produced {table.duplicates()} duplicated identifiers")
  return table


def keep_and_extend(prev_table: IdentifierTable, catalog: np.ndarray, new_codes: np.ndarray
                    ) -> IdentifierTable:
  """Known items keep their identifiers; new items take new_codes and a free dedup digit.

  The frozen-tokenizer baseline passes codes of the frozen tokenizer; Reformer passes codes
  of the tokenizer updated on period t, so new items are placed by the updated tokenizer while
  old identifiers never change. A new item whose codes collide with an existing identifier
  (old or new) takes the smallest dedup digit still free for those codes.
  """
  catalog, new_codes = _check_inputs(catalog, new_codes, prev_table.depth - 1)
  rows = _previous_rows(prev_table, catalog)
  previous = prev_table.codes[rows]  # rows of new items (-1) read a dummy row, never kept
  known = rows >= 0
  codes = np.where(known[:, None], previous[:, :-1], new_codes)
  identifiers = _unique_identifiers(codes, known, previous[:, -1], prev_table.level_sizes[-1])
  return _table(identifiers, catalog, prev_table.level_sizes)


def reencode_all(new_codes: np.ndarray, catalog: np.ndarray, dedup_size: int,
                 codebook_size: int) -> IdentifierTable:
  """Naive rule: every item takes its new codes; dedup digits are recomputed from scratch.

  Digits are ranks within each colliding group in catalog order (`assign_dedup`); an item
  whose codes did not change may still see its digit shift when its group changes, which is
  part of the disruption that naive fine-tuning causes.
  """
  catalog, new_codes = _check_inputs(catalog, new_codes, None)
  levels = new_codes.shape[1]
  return _table(assign_dedup(new_codes, dedup_size), catalog,
                (codebook_size,) * levels + (dedup_size,))


def hierarchical_reassign(prev_table: IdentifierTable, catalog: np.ndarray,
                          new_codes: np.ndarray) -> IdentifierTable:
  """DACT's relaxed-to-strict reassignment (paper section 3.2, METHODS.md section 5).

  Level 1 always follows the fine-tuned tokenizer: a known item whose new level-1 code
  differs from its previous one takes all its new codes; a known item with the same level-1
  code keeps its previous identifier entirely (every level and the dedup digit); new items
  take their new codes. Uniqueness is then restored touching only changed and new items:
  each takes, in catalog order, the smallest dedup digit free among identifiers with its codes.
  Unchanged items keep their exact identifiers, which are distinct because the previous table
  was.
  """
  catalog, new_codes = _check_inputs(catalog, new_codes, prev_table.depth - 1)
  rows = _previous_rows(prev_table, catalog)
  previous = prev_table.codes[rows]  # rows of new items (-1) read a dummy row, never kept
  kept = (rows >= 0) & (previous[:, 0] == new_codes[:, 0])
  codes = np.where(kept[:, None], previous[:, :-1], new_codes)
  identifiers = _unique_identifiers(codes, kept, previous[:, -1], prev_table.level_sizes[-1])
  return _table(identifiers, catalog, prev_table.level_sizes)


def code_change_rates(prev_table: IdentifierTable, new_table: IdentifierTable
                      ) -> dict[str, float | int]:
  """Fractions of the items present in both tables whose identifier changed.

  Keys: "level_1".."level_L" (that code level changed), "overall" (any of the L code levels
  changed, dedup digit excluded: DACT Table 4), "identifier" (the full identifier, dedup digit
  included, changed) and "items" (how many items were compared).
  """
  if prev_table.depth != new_table.depth:
    raise ValueError(f"tables have different depths: {prev_table.depth} vs {new_table.depth}")
  for table in (prev_table, new_table):
    if np.unique(table.item).shape[0] != table.item.shape[0]:
      raise ValueError("code_change_rates needs one identifier per item in each table")
  common, prev_rows, new_rows = np.intersect1d(prev_table.item, new_table.item,
                                               return_indices=True)
  if common.shape[0] == 0:
    raise ValueError("the tables share no item")
  changed = prev_table.codes[prev_rows] != new_table.codes[new_rows]
  rates = {f"level_{l + 1}": float(changed[:, l].mean()) for l in range(changed.shape[1] - 1)}
  rates["overall"] = float(changed[:, :-1].any(axis=1).mean())
  rates["identifier"] = float(changed.any(axis=1).mean())
  rates["items"] = int(common.shape[0])
  return rates
