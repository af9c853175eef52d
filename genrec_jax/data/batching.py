"""Length-bucketed batching of left-padded histories.

Histories are short (Toys: median 4 of 20 slots), so a batch padded to the maximum length is
mostly padding. Samples are grouped into buckets by history length and each batch keeps only the
last `bucket` slots, so compute scales with real tokens while the number of compiled shapes stays
small (one per bucket). Every batch has exactly `batch_size` rows: a bucket's last batch is
completed with index -1 (weight 0), so jit never sees a new shape.
"""

from __future__ import annotations

import numpy as np


def bucket_of(lengths: np.ndarray, boundaries: tuple[int, ...]) -> np.ndarray:
  """Index of the smallest boundary >= each length; lengths [S] -> int [S]."""
  boundaries = np.asarray(sorted(boundaries))
  if np.asarray(lengths).max(initial=0) > boundaries[-1]:
    raise ValueError(f"history length {np.max(lengths)} exceeds the largest bucket "
                     f"{boundaries[-1]}")
  return np.searchsorted(boundaries, lengths, side="left")


def bucketed_batches(lengths: np.ndarray, batch_size: int, boundaries: tuple[int, ...], *,
                     seed: int | None = None, epoch: int = 0
                     ) -> list[tuple[int, np.ndarray]]:
  """Splits samples into fixed-size batches of one bucket each.

  Args:
    lengths: int [S] real history lengths.
    batch_size: rows per batch.
    boundaries: bucket sizes in history slots, e.g. (5, 10, 20).
    seed: None keeps sample order (evaluation); otherwise samples and batches are shuffled with
      a generator seeded by (seed, epoch), so an epoch's order does not depend on earlier epochs
      (a resumed run sees the same batches).
    epoch: epoch number mixed into the shuffle seed.

  Returns:
    List of (bucket_slots, indices int64 [batch_size]) with -1 marking filler rows.
  """
  boundaries = tuple(sorted(boundaries))
  which = bucket_of(lengths, boundaries)
  rng = None if seed is None else np.random.default_rng([seed, epoch])
  batches = []
  for b, slots in enumerate(boundaries):
    idx = np.flatnonzero(which == b)
    if rng is not None:
      idx = rng.permutation(idx)
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      batches.append((slots, np.pad(chunk, (0, batch_size - len(chunk)), constant_values=-1)))
  if rng is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches
