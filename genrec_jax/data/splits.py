"""Leave-one-out split of the static protocol (PROTOCOLS.md section 1).

A user with chronological items i1..in gives training samples with targets i2..i(n-2), a
validation sample with target i(n-1) and a test sample with target in; each sample's history
is every earlier item of the user, truncated to the most recent `max_history`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from genrec_jax.data.interactions import DataError, Interactions

PAD = -1


@dataclasses.dataclass(frozen=True, eq=False)
class SampleSet:
    """Next-item samples.

    Attributes:
      history: int32 [S, H] item indices, left-padded with PAD (-1); the most recent item
        is in the last column.
      target: int32 [S] item index to predict.
      user: int32 [S] user index of each sample.
    """

    history: np.ndarray
    target: np.ndarray
    user: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """int32 [S] number of non-pad history entries."""
        return (self.history != PAD).sum(axis=1).astype(np.int32)

    def __len__(self) -> int:
        return len(self.target)


@dataclasses.dataclass(frozen=True, eq=False)
class StaticSplit:
    """Train / validation / test samples of one dataset; items index 0..num_items-1."""

    train: SampleSet
    valid: SampleSet
    test: SampleSet
    num_items: int


def samples_for_rows(
    inter: Interactions, rows: np.ndarray, start: np.ndarray, max_history: int
) -> SampleSet:
    """Samples whose targets are the rows `rows` [S] of `inter` (sorted by user, then time);
    `start` [U] is each user's first row. History column j holds row r - H + j when it
    belongs to the same user, so a history is the user's whole past, truncated to the last
    H = max_history items."""
    idx = rows[:, None] - max_history + np.arange(max_history)[None, :]
    valid = idx >= start[inter.user[rows]][:, None]
    history = np.where(valid, inter.item[np.maximum(idx, 0)], PAD).astype(np.int32)
    return SampleSet(history=history, target=inter.item[rows], user=inter.user[rows])


def leave_one_out(inter: Interactions, max_history: int) -> StaticSplit:
    """Splits `inter` (rows sorted by user, then time) per PROTOCOLS.md section 1.

    Samples of each set are ordered by user, then time. Raises DataError if a user has
    fewer than 3 interactions (impossible after a 5-core filter).
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    same_user = np.diff(inter.user) == 0
    if np.any(np.diff(inter.user) < 0) or np.any(np.diff(inter.timestamp)[same_user] < 0):
        raise DataError(f"{inter.source}: rows are not sorted by user, then time")
    counts = np.bincount(inter.user, minlength=inter.num_users)
    short = np.flatnonzero(counts < 3)
    if short.size:
        u = int(short[0])
        raise DataError(
            f"{inter.source}: {short.size} user(s) with fewer than 3 interactions, e.g. "
            f"{str(inter.user_ids[u])!r} with {counts[u]}; leave-one-out needs >= 3"
        )
    end = np.cumsum(counts)
    start = end - counts
    rows = np.arange(inter.num_interactions)
    pos_from_end = end[inter.user] - rows  # 1 for a user's last row
    first = rows == start[inter.user]
    train_rows = rows[~first & (pos_from_end >= 3)]
    return StaticSplit(
        train=samples_for_rows(inter, train_rows, start, max_history),
        valid=samples_for_rows(inter, end - 2, start, max_history),
        test=samples_for_rows(inter, end - 1, start, max_history),
        num_items=inter.num_items,
    )


def training_windows(inter: Interactions, max_len: int, holdout: int = 2) -> SampleSet:
    """Per-user next-item training windows for sequence models such as SASRec.

    For each user, the training part is the sequence without its last `holdout` items (the
    validation and test targets); its last max_len + 1 items form one window. Users whose
    training part has < 2 items are skipped.

    Returns a SampleSet whose `history` int32 [U', max_len] holds the inputs (left-padded
    with PAD) and whose `target` int32 [U', max_len] holds the next item at every input
    position (PAD where the input is padding): history[:, j] predicts target[:, j].
    """
    counts = np.bincount(inter.user, minlength=inter.num_users)
    end = np.cumsum(counts)
    start = end - counts
    last = end - 1 - holdout  # last training row of each user
    keep = last - start >= 1
    idx = last[keep, None] - max_len + np.arange(max_len + 1)[None, :]
    valid = idx >= start[keep][:, None]
    seq = np.where(valid, inter.item[np.maximum(idx, 0)], PAD).astype(np.int32)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    targets = np.where(inputs != PAD, targets, PAD).astype(np.int32)
    return SampleSet(history=inputs, target=targets,
                     user=np.flatnonzero(keep).astype(np.int32))


def subsample(samples: SampleSet, size: int, seed: int) -> SampleSet:
    """A fixed random subset of `size` samples (all of them when size <= 0 or too large),
    kept in their original order; used to make frequent validation cheaper."""
    if size <= 0 or size >= len(samples):
        return samples
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), size, replace=False))
    return SampleSet(history=samples.history[idx], target=samples.target[idx],
                     user=samples.user[idx])
