"""Time periods of the continual protocol (DACT; PROTOCOLS.md section 2).

All interactions are ordered by time and cut at UTC day boundaries into periods D_0..D_{P-1}
(P = len(fractions) + 1: five periods for the cut points 60 / 70 / 80 / 90 %). One rule splits
every period, D_0 included: each user's last interaction in D_t is a test target, the
second-last a validation target and the rest are training targets. As in the official DACT
split, a test target is kept only when its history holds at least `min_test_history` = 2 items
(the user has >= 3 interactions up to the end of D_t); validation targets have no such rule.
A user's first-ever interaction has no history and is never a target. Histories reach back over the user's whole
past, across earlier periods, so a validation or test interaction of period t is seen later only
as history. For users with >= 3 interactions in D_0 this is leave-one-out inside D_0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from genrec_jax.data.interactions import DataError, Interactions
from genrec_jax.data.splits import PAD, SampleSet, samples_for_rows

SECONDS_PER_DAY = 86400
FRACTIONS = (0.6, 0.7, 0.8, 0.9)


def period_boundaries(timestamps: np.ndarray, fractions=FRACTIONS) -> list[int]:
  """Last day of every period but the final one, by the official day-boundary rule.

  Days are UTC day numbers, timestamp // 86400. Period k ends with the first day whose
  cumulative fraction of all interactions, that day included, reaches fractions[k]; no day is
  split, so a day that straddles a cut point belongs wholly to the earlier period.

  Args:
    timestamps: int [N] unix seconds of all interactions, in any order.
    fractions: strictly increasing cut points in (0, 1).

  Returns:
    len(fractions) day numbers: the last days of D_0..D_{P-2} (D_{P-1} ends with the data).
  """
  cuts = np.asarray(fractions, dtype=np.float64)
  if cuts.ndim != 1 or np.any((cuts <= 0) | (cuts >= 1)) or np.any(np.diff(cuts) <= 0):
    raise ValueError(f"fractions must be strictly increasing in (0, 1), got {fractions}")
  timestamps = np.asarray(timestamps)
  if timestamps.size == 0:
    raise ValueError("period_boundaries needs at least one timestamp")
  days, counts = np.unique(timestamps // SECONDS_PER_DAY, return_counts=True)
  reached = np.cumsum(counts) / timestamps.size  # [D] cumulative fraction after each day
  return [int(d) for d in days[np.searchsorted(reached, cuts, side="left")]]


@dataclasses.dataclass(frozen=True, eq=False)
class Period:
  """One period D_t with its samples and item sets.

  Attributes:
    index: t in 0..P-1.
    first_day, last_day: first and last UTC day ('YYYY-MM-DD') with interactions in D_t.
    train, valid, test: samples whose targets are D_t's training / validation / test
      interactions; history int32 [S, max_history] is the user's full past (all periods)
      before the target; each set is ordered by user, then time.
    catalog: int32 [C_t] sorted indices of the items seen in D_0..D_t.
    new_items: int32 [M_t] sorted indices of the items first seen in D_t (all of D_0's items
      for t = 0).
    cf_windows: windows for fine-tuning the CF model (SASRec) on D_t, one per user with a
      training target in D_t, laid out as `splits.training_windows`: history int32
      [U_t, cf_max_len] inputs (full past, left-padded with PAD), target int32
      [U_t, cf_max_len] the next item at each position, PAD where that next interaction is
      not a training target of D_t; user int32 [U_t].
    num_interactions: number of interactions in D_t.
  """

  index: int
  first_day: str
  last_day: str
  train: SampleSet
  valid: SampleSet
  test: SampleSet
  catalog: np.ndarray
  new_items: np.ndarray
  cf_windows: SampleSet
  num_interactions: int


def _iso_day(day: int) -> str:
  return str(np.datetime64(int(day), "D"))


def _cf_windows(
    inter: Interactions, train_rows: np.ndarray, start: np.ndarray, max_len: int
) -> SampleSet:
  """For each user in `train_rows` (sorted row indices of one period's training targets), the
  user's last max_len + 1 items ending at the user's last training row; next-item targets are
  kept only at rows in `train_rows`, so the loss sees this period's training targets alone."""
  is_train = np.zeros(inter.num_interactions, dtype=bool)
  is_train[train_rows] = True
  users = inter.user[train_rows]
  last_of_user = np.diff(users, append=-1) != 0  # users are sorted and >= 0
  last, user = train_rows[last_of_user], users[last_of_user]
  idx = last[:, None] - max_len + np.arange(max_len + 1)[None, :]  # [U_t, max_len + 1] rows
  valid = idx >= start[user][:, None]
  safe = np.maximum(idx, 0)
  seq = np.where(valid, inter.item[safe], PAD).astype(np.int32)
  # seq is already PAD before the user's first row, so masking by row role alone suffices.
  target = np.where(is_train[safe[:, 1:]], seq[:, 1:], PAD).astype(np.int32)
  return SampleSet(history=seq[:, :-1], target=target, user=user.astype(np.int32))


def continual_split(inter: Interactions, fractions=FRACTIONS, max_history: int = 20,
                    cf_max_len: int = 50, appended_after: tuple[int, ...] = (),
                    min_test_history: int = 2) -> list[Period]:
  """Splits `inter` (rows sorted by user, then time) into the continual protocol's periods.

  Args:
    inter: the interactions, after the global k-core filter.
    fractions: cut points of `period_boundaries`.
    max_history: history length of the train / valid / test samples.
    cf_max_len: input length of the CF fine-tuning windows.
    appended_after: for periods appended to the original data (`append_interactions`), the
      last day (UTC day number) of the data before each appended period. The fractions cut
      the interactions up to appended_after[0]; each appended period is one more period.
    min_test_history: fewest past items (all periods) of a kept test target: 2 is the
      official DACT split (users with >= 3 interactions up to the end of the period), 1 keeps
      every user with a past.

  Returns:
    the P = len(fractions) + 1 + len(appended_after) periods in time order. Raises DataError
    if the rows are not sorted or a period would be empty (one day holding more than the gap
    between cut points).
  """
  if max_history < 1 or cf_max_len < 1 or min_test_history < 1:
    raise ValueError(f"max_history, cf_max_len and min_test_history must be >= 1, got "
                     f"{max_history}, {cf_max_len}, {min_test_history}")
  same_user = np.diff(inter.user) == 0
  if np.any(np.diff(inter.user) < 0) or np.any(np.diff(inter.timestamp)[same_user] < 0):
    raise DataError(f"{inter.source}: rows are not sorted by user, then time")
  day = inter.timestamp // SECONDS_PER_DAY
  if np.any(np.diff(appended_after) <= 0):
    raise ValueError(f"appended_after must be increasing day numbers, got {appended_after}")
  base = day <= appended_after[0] if appended_after else np.ones(day.shape, bool)
  bounds = np.asarray(period_boundaries(inter.timestamp[base], fractions)
                      + [int(d) for d in appended_after], dtype=np.int64)
  period = np.searchsorted(bounds, day, side="left")  # [N] period of each row
  num_periods = len(bounds) + 1
  sizes = np.bincount(period, minlength=num_periods)
  if np.any(sizes == 0):
    raise DataError(
        f"{inter.source}: fractions {fractions} leave period(s) "
        f"{np.flatnonzero(sizes == 0).tolist()} empty (a single day spans a whole gap)"
    )

  n = inter.num_interactions
  rows = np.arange(n)
  counts = np.bincount(inter.user, minlength=inter.num_users)
  start = np.cumsum(counts) - counts  # [U] first row of each user
  # A user's rows within one period are contiguous (periods follow time); number each such
  # group and count rows to its end: 1 = the user's last row in the period (test), 2 = valid.
  new_group = np.ones(n, dtype=bool)
  new_group[1:] = (inter.user[1:] != inter.user[:-1]) | (period[1:] != period[:-1])
  group = np.cumsum(new_group) - 1
  pos_from_end = np.cumsum(np.bincount(group))[group] - rows
  past = rows - start[inter.user]  # [N] items before each row in the user's whole history
  is_target = past > 0  # a first-ever interaction has no history
  first_period = np.full(inter.num_items, num_periods)  # [I] period where each item appears
  np.minimum.at(first_period, inter.item, period)

  periods = []
  for t in range(num_periods):
    in_t = period == t
    targets = in_t & is_target
    train_rows = rows[targets & (pos_from_end >= 3)]
    periods.append(Period(
        index=t,
        first_day=_iso_day(day[in_t].min()),
        last_day=_iso_day(day[in_t].max()),
        train=samples_for_rows(inter, train_rows, start, max_history),
        valid=samples_for_rows(inter, rows[targets & (pos_from_end == 2)], start, max_history),
        test=samples_for_rows(inter, rows[targets & (pos_from_end == 1) &
                                          (past >= min_test_history)], start, max_history),
        catalog=np.flatnonzero(first_period <= t).astype(np.int32),
        new_items=np.flatnonzero(first_period == t).astype(np.int32),
        cf_windows=_cf_windows(inter, train_rows, start, cf_max_len),
        num_interactions=int(sizes[t]),
    ))
  return periods


def retrain_samples(periods: list[Period], t: int) -> SampleSet:
  """Training samples for retraining from scratch at period t (RT): the training samples of
  periods 0..t and the validation and test samples of periods 0..t-1 (past data by period t),
  concatenated in period order (train, valid, test within a period); histories [S, H]."""
  if not 0 <= t < len(periods):
    raise ValueError(f"period {t} out of range 0..{len(periods) - 1}")
  parts = []
  for k, p in enumerate(periods[:t + 1]):
    parts += [p.train] if k == t else [p.train, p.valid, p.test]
  return SampleSet(history=np.concatenate([s.history for s in parts]),
                   target=np.concatenate([s.target for s in parts]),
                   user=np.concatenate([s.user for s in parts]))


def period_summary(periods: list[Period]) -> list[dict]:
  """One row per period: days, sizes, catalog growth and the share of test targets that are
  new items of that period (cold-start pressure)."""
  return [dict(
      period=p.index, first_day=p.first_day, last_day=p.last_day,
      interactions=p.num_interactions, train=len(p.train), valid=len(p.valid),
      test=len(p.test), catalog=len(p.catalog), new_items=len(p.new_items),
      new_item_test_fraction=(float(np.isin(p.test.target, p.new_items).mean())
                              if len(p.test) else float("nan")),
  ) for p in periods]
