"""Length-bucketed batching of left-padded histories.

Histories are short (Toys: median 4 of 20 slots), so a batch padded to the maximum length is
mostly padding. Samples are grouped into buckets by history length and each batch keeps only the
last `bucket` slots, so compute scales with real tokens while the number of compiled shapes stays
small (one per bucket). Every batch has exactly `batch_size` rows: a bucket's last batch is
completed with index -1 (weight 0), so jit never sees a new shape.

Grouping by length makes every training batch length-homogeneous, where the reference code
draws uniformly random batches; `grouping="random"` draws those (a random permutation cut
into batches) and pads each batch to the bucket of its longest history.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

GROUPINGS = ("length", "random")


def bucket_of(lengths: np.ndarray, boundaries: tuple[int, ...]) -> np.ndarray:
  """Index of the smallest boundary >= each length; lengths [S] -> int [S]."""
  boundaries = np.asarray(sorted(boundaries))
  if np.asarray(lengths).max(initial=0) > boundaries[-1]:
    raise ValueError(f"history length {np.max(lengths)} exceeds the largest bucket "
                     f"{boundaries[-1]}")
  return np.searchsorted(boundaries, lengths, side="left")


def bucketed_batches(lengths: np.ndarray, batch_size: int, boundaries: tuple[int, ...], *,
                     seed: int | None = None, epoch: int = 0, grouping: str = "length"
                     ) -> list[tuple[int, np.ndarray]]:
  """Splits samples into fixed-size batches, each padded to one bucket.

  Args:
    lengths: int [S] real history lengths.
    batch_size: rows per batch.
    boundaries: bucket sizes in history slots, e.g. (5, 10, 20).
    seed: None keeps sample order (evaluation); otherwise samples and batches are shuffled with
      a generator seeded by (seed, epoch), so an epoch's order does not depend on earlier epochs
      (a resumed run sees the same batches).
    epoch: epoch number mixed into the shuffle seed.
    grouping: "length" (batches of one bucket each) or "random" (uniformly random batches,
      each padded to the bucket of its longest history; needs a seed).

  Returns:
    List of (bucket_slots, indices int64 [batch_size]) with -1 marking filler rows.
  """
  if grouping not in GROUPINGS:
    raise ValueError(f"batch grouping must be one of {GROUPINGS}, got {grouping!r}")
  boundaries = tuple(sorted(boundaries))
  which = bucket_of(lengths, boundaries)
  rng = None if seed is None else np.random.default_rng([seed, epoch])
  if grouping == "random":
    if rng is None:
      raise ValueError("random batch grouping needs a seed")
    order = rng.permutation(len(which))
    return [(boundaries[which[chunk].max()],
             np.pad(chunk, (0, batch_size - len(chunk)), constant_values=-1))
            for chunk in (order[i:i + batch_size] for i in range(0, len(order), batch_size))]
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


def sample_batches(samples, batch_size: int, boundaries: tuple[int, ...], *,
                   seed: int | None = None, epoch: int = 0, grouping: str = "length"
                   ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Batches of item indices of a `SampleSet`, one bucket's width each (`bucketed_batches`).

  Yields (batch, indices) with indices int64 [B] (-1 = filler row) and batch:
    history int32 [B, slots]: the last `slots` history items, -1 = padding or filler row;
    target int32 [B] (or [B, slots] for training windows): -1 = none or filler row;
    weight float32 [B]: 1 for real samples, 0 for filler rows.
  Models turn item indices into their inputs inside the compiled step (identifier tokens,
  embedding rows), so a batch does not depend on the identifier table.
  """
  for slots, idx in bucketed_batches(samples.lengths, batch_size, boundaries, seed=seed,
                                     epoch=epoch, grouping=grouping):
    yield gather_samples(samples, idx, slots), idx


def sample_dispatches(samples, batch_size: int, boundaries: tuple[int, ...], steps: int, *,
                      seed: int, epoch: int = 0, grouping: str = "length"
                      ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """An epoch's training batches stacked `steps` at a time, for several updates per dispatch
  (`Trainer.train_steps`).

  The epoch's batches (`bucketed_batches`, shuffled) are grouped by width: each bucket's
  batches, in their shuffled order, are cut into runs of `steps`, the last run completed with
  filler steps (every row -1), and the runs are taken in the order of their first batch.
  Yields (batch, indices int64 [steps, B]): the `sample_batches` fields stacked on a leading
  axis [steps, B, ...] and `step_ids` int32 [steps], each batch's position in the epoch's
  shuffled order (the step number it has with one batch per call; -1 = filler step).
  """
  if steps < 1:
    raise ValueError(f"steps per dispatch must be >= 1, got {steps}")
  runs: dict[int, list[tuple[int, list[tuple[int, np.ndarray]]]]] = {}
  for position, (slots, idx) in enumerate(bucketed_batches(
      samples.lengths, batch_size, boundaries, seed=seed, epoch=epoch, grouping=grouping)):
    bucket = runs.setdefault(slots, [])
    if not bucket or len(bucket[-1][1]) == steps:
      bucket.append((position, []))
    bucket[-1][1].append((position, idx))
  ordered = sorted((first, slots, members) for slots, bucket in runs.items()
                   for first, members in bucket)
  for _, slots, members in ordered:
    idx = np.full((steps, batch_size), -1, np.int64)
    idx[:len(members)] = [batch for _, batch in members]
    step_ids = np.full(steps, -1, np.int32)
    step_ids[:len(members)] = [position for position, _ in members]
    yield {**gather_samples(samples, idx, slots), "step_ids": step_ids}, idx


def gather_samples(samples, idx: np.ndarray, slots: int) -> dict[str, np.ndarray]:
  """The `sample_batches` fields of samples idx int [..., B] (-1 = filler row), histories cut
  to their last `slots` items: history [..., B, slots], target [..., B] (or [..., B, slots]),
  weight [..., B]."""
  width = samples.history.shape[1]
  rows, filler = np.maximum(idx, 0), idx < 0
  history = samples.history[rows][..., width - slots:].astype(np.int32)
  target = samples.target[rows].astype(np.int32)
  if target.ndim == idx.ndim + 1:
    target = target[..., width - slots:]
  history[filler] = -1
  target[filler] = -1
  return {"history": history, "target": target, "weight": (~filler).astype(np.float32)}


def item_batches(num_items: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless random batches of item indices, int64 [min(batch_size, num_items)] each.

  The tokenizers train on the item set: each pass is a fresh permutation cut into full
  batches, and a pass's last partial batch is dropped (the LETTER and DACT code's
  `drop_last`), so every batch has one shape.
  """
  if num_items < 1:
    raise ValueError(f"item batches need at least one item, got {num_items}")
  batch = min(batch_size, num_items)
  rng = np.random.default_rng(seed)
  order, cursor = rng.permutation(num_items), 0
  while True:
    if cursor + batch > num_items:
      order, cursor = rng.permutation(num_items), 0
    yield order[cursor:cursor + batch]
    cursor += batch


def stack_item_batches(indices: list[np.ndarray], steps: int, first_id: int
                       ) -> dict[str, np.ndarray]:
  """Up to `steps` consecutive item batches int [B] (`item_batches`) as one dispatch of
  `Trainer.train_steps`: `idx` [steps, B] and `step_ids` [steps] (first_id, first_id + 1, ...;
  filler steps -1, repeating the first batch)."""
  step_ids = np.full(steps, -1, np.int32)
  step_ids[:len(indices)] = first_id + np.arange(len(indices))
  return {"idx": np.stack(indices + [indices[0]] * (steps - len(indices))),
          "step_ids": step_ids}
