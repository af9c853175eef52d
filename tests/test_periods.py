"""Tests of genrec_jax.data.periods: DACT's day-boundary periods and per-period splits."""

import functools
from pathlib import Path

import numpy as np
import pytest

from genrec_jax.data import (DataError, RawInteractions, index_interactions, leave_one_out,
                             load_interactions)
from genrec_jax.data.interactions import Interactions
from genrec_jax.data.periods import (SECONDS_PER_DAY, continual_split, period_boundaries,
                                     period_summary, retrain_samples)
from genrec_jax.data.splits import PAD, SampleSet, samples_for_rows, training_windows

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon2014"
OFFICIAL_LAST_DAYS = {  # PROTOCOLS.md section 2: last days of D0..D3
    "toys": ["2013-08-16", "2013-11-24", "2014-01-08", "2014-03-20"],
    "beauty": ["2013-09-28", "2013-12-27", "2014-03-07", "2014-05-13"],
}

P = PAD
DAY0 = 16071  # 2014-01-01
# (user, item, day - DAY0), listed by user, then time: these are rows r0..r19 after indexing
# (users u0..u3 -> 0..3, items i0..i9 -> 0..9). Rows per day: 3, 4, 3 | 4 | 3, 3 of 20, so
# with cut points 40 % and 70 %: D0 = days 0-2 (day 2 straddles the 40 % cut at 8 rows and
# stays whole), D1 = day 3 (reaches 70 % exactly), D2 = days 4-5.
SMALL = [
    ("u0", "i0", 0), ("u0", "i1", 0), ("u0", "i2", 1), ("u0", "i3", 2), ("u0", "i4", 2),
    ("u0", "i5", 3), ("u0", "i6", 3), ("u0", "i7", 4), ("u0", "i8", 5), ("u0", "i9", 5),
    ("u1", "i1", 0), ("u1", "i2", 1), ("u1", "i0", 1), ("u1", "i4", 1), ("u1", "i3", 3),
    ("u1", "i5", 4),
    ("u2", "i0", 2), ("u2", "i2", 5),
    ("u3", "i6", 3), ("u3", "i7", 4),
]  # fmt: skip
SMALL_FRACTIONS = (0.4, 0.7)


def _small() -> Interactions:
  users, items, days = zip(*SMALL)
  # Minutes past midnight increasing with the row, so days are not whole multiples of 86400.
  seconds = (DAY0 + np.asarray(days)) * SECONDS_PER_DAY + 60 * np.arange(len(SMALL))
  return index_interactions(RawInteractions(
      np.asarray(users), np.asarray(items), seconds.astype(np.int64), "small"))


@functools.cache
def _load(name: str) -> Interactions:
  path = AMAZON / name / "interactions.csv"
  if not path.is_file():
    pytest.skip(f"{path} not found")
  return load_interactions(path)


def _assert_samples(s: SampleSet, user, target, history):
  np.testing.assert_array_equal(s.user, np.asarray(user, dtype=np.int32).reshape(-1))
  np.testing.assert_array_equal(s.target, np.asarray(target, dtype=np.int32))
  np.testing.assert_array_equal(s.history, np.asarray(history, dtype=np.int32))
  assert s.history.dtype == s.target.dtype == s.user.dtype == np.int32


def test_period_boundaries_day_rule():
  ts = _small().timestamp
  assert period_boundaries(ts, SMALL_FRACTIONS) == [DAY0 + 2, DAY0 + 3]
  assert period_boundaries(ts[::-1], SMALL_FRACTIONS) == [DAY0 + 2, DAY0 + 3]
  assert period_boundaries(ts, (0.1, 0.5, 0.99)) == [DAY0, DAY0 + 2, DAY0 + 5]
  for bad in [(0.7, 0.4), (0.4, 0.4), (0.0, 0.5), (0.5, 1.0)]:
    with pytest.raises(ValueError, match="strictly increasing"):
      period_boundaries(ts, bad)
  with pytest.raises(DataError, match=r"period\(s\) \[1\] empty"):
    continual_split(_small(), (0.4, 0.45))  # both cuts fall on day 2


def test_official_rule_keeps_test_targets_with_at_least_two_past_items():
  """Official DACT split: a test target needs >= 3 interactions of its user up to the end of
  the period. In D2, u2 (items i0, i2) and u3 (i6, i7) have two interactions each: dropped."""
  official = continual_split(_small(), SMALL_FRACTIONS, max_history=2, cf_max_len=3)
  every = continual_split(_small(), SMALL_FRACTIONS, max_history=2, cf_max_len=3,
                          min_test_history=1)
  _assert_samples(official[2].test, [0, 1], [9, 5], [[7, 8], [4, 3]])
  assert len(every[2].test) == 4
  for p, q in zip(official, every):
    for name in ("train", "valid", "cf_windows"):
      np.testing.assert_array_equal(getattr(p, name).target, getattr(q, name).target)
  for p, q in zip(official[:2], every[:2]):
    np.testing.assert_array_equal(p.test.target, q.test.target)
  with pytest.raises(ValueError, match="min_test_history"):
    continual_split(_small(), SMALL_FRACTIONS, min_test_history=0)


def test_continual_split_small():
  p0, p1, p2 = continual_split(_small(), SMALL_FRACTIONS, max_history=2, cf_max_len=3,
                               min_test_history=1)
  assert [(p.index, p.first_day, p.last_day, p.num_interactions) for p in (p0, p1, p2)] == [
      (0, "2014-01-01", "2014-01-03", 10), (1, "2014-01-04", "2014-01-04", 4),
      (2, "2014-01-05", "2014-01-06", 6)]
  # D0 is leave-one-out inside D0 for u0 and u1; u2's only D0 row is its first-ever: no sample.
  _assert_samples(p0.train, [0, 0, 1], [1, 2, 2], [[P, 0], [0, 1], [P, 1]])
  _assert_samples(p0.valid, [0, 1], [3, 0], [[1, 2], [1, 2]])
  _assert_samples(p0.test, [0, 1], [4, 4], [[2, 3], [2, 0]])
  # D1: u1 has one interaction (test only) with its D0 past truncated to 2; u3's first-ever
  # interaction is dropped; no training targets at all.
  _assert_samples(p1.train, [], [], np.zeros((0, 2)))
  _assert_samples(p1.valid, [0], [5], [[3, 4]])
  _assert_samples(p1.test, [0, 1], [6, 3], [[4, 5], [0, 4]])
  # D2: histories reach back to D1 (u1, u3) and to D0 across an absent period (u2).
  _assert_samples(p2.train, [0], [7], [[5, 6]])
  _assert_samples(p2.valid, [0], [8], [[6, 7]])
  _assert_samples(p2.test, [0, 1, 2, 3], [9, 5, 2, 7], [[7, 8], [4, 3], [P, 0], [P, 6]])

  for p, catalog, new in [(p0, range(5), range(5)), (p1, range(7), [5, 6]),
                          (p2, range(10), [7, 8, 9])]:
    np.testing.assert_array_equal(p.catalog, np.asarray(catalog, dtype=np.int32))
    np.testing.assert_array_equal(p.new_items, np.asarray(new, dtype=np.int32))
  assert [r["new_item_test_fraction"] for r in period_summary([p0, p1, p2])] == [1.0, 0.5, 0.5]
  assert period_summary([p1])[0] == dict(
      period=1, first_day="2014-01-04", last_day="2014-01-04", interactions=4, train=0,
      valid=1, test=2, catalog=7, new_items=2, new_item_test_fraction=0.5)

  # CF windows end at each user's last training target; only D_t training targets are kept.
  _assert_samples(p0.cf_windows, [0, 1], [[P, 1, 2], [P, P, 2]], [[P, 0, 1], [P, P, 1]])
  _assert_samples(p1.cf_windows, [], np.zeros((0, 3)), np.zeros((0, 3)))
  # u0's D2 window holds D0 / D1 items as context; their targets (D0 test i4, D1 valid / test
  # i5, i6) are masked.
  _assert_samples(p2.cf_windows, [0], [[P, P, 7]], [[4, 5, 6]])
  # Longer windows: u1's reaches back over u0's rows (r2 = u0's D0 training target i2), which
  # must stay padding, targets included.
  q0, _, q2 = (p.cf_windows for p in continual_split(_small(), SMALL_FRACTIONS, cf_max_len=10))
  _assert_samples(q0, [0, 1], [[P] * 8 + [1, 2], [P] * 9 + [2]],
                  [[P] * 8 + [0, 1], [P] * 9 + [1]])
  _assert_samples(q2, [0], [[P] * 9 + [7]], [[P, P, P, 0, 1, 2, 3, 4, 5, 6]])


def test_retrain_samples_small():
  periods = continual_split(_small(), SMALL_FRACTIONS, max_history=2, min_test_history=1)
  # train0, valid0, test0, train1 (empty), valid1, test1, train2
  _assert_samples(retrain_samples(periods, 2), [0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0],
                  [1, 2, 2, 3, 0, 4, 4, 5, 6, 3, 7],
                  [[P, 0], [0, 1], [P, 1], [1, 2], [1, 2], [2, 3], [2, 0], [3, 4], [4, 5],
                   [0, 4], [5, 6]])
  _assert_samples(retrain_samples(periods, 1), [0, 0, 1, 0, 1, 0, 1], [1, 2, 2, 3, 0, 4, 4],
                  [[P, 0], [0, 1], [P, 1], [1, 2], [1, 2], [2, 3], [2, 0]])
  assert retrain_samples(periods, 0).target.tolist() == [1, 2, 2]
  with pytest.raises(ValueError, match="out of range"):
    retrain_samples(periods, 3)


@pytest.mark.parametrize("name", sorted(OFFICIAL_LAST_DAYS))
def test_official_last_days(name):
  days = period_boundaries(_load(name).timestamp)
  assert [str(np.datetime64(d, "D")) for d in days] == OFFICIAL_LAST_DAYS[name]
  periods = continual_split(_load(name))
  assert [p.last_day for p in periods[:4]] == OFFICIAL_LAST_DAYS[name]


def test_toys_invariants():
  inter, max_history, cf_max_len = _load("toys"), 20, 50
  # Every user with a past keeps a test target here, so every non-first row is a target once.
  periods = continual_split(inter, max_history=max_history, cf_max_len=cf_max_len,
                            min_test_history=1)
  n, rows = inter.num_interactions, np.arange(inter.num_interactions)
  assert sum(p.num_interactions for p in periods) == n
  counts = np.bincount(inter.user, minlength=inter.num_users)
  start = np.cumsum(counts) - counts
  day = inter.timestamp // SECONDS_PER_DAY

  # Every row keyed by (user, item, full past truncated to max_history); the keys are unique,
  # so each sample names the one row it was made from.
  def keys(s):
    return [k.tobytes() for k in np.column_stack([s.user, s.target, s.history])]

  row_of = {k: r for r, k in enumerate(keys(samples_for_rows(inter, rows, start, max_history)))}
  assert len(row_of) == n
  times_target = np.zeros(n, dtype=np.int64)
  held_out = np.zeros(n, dtype=bool)  # valid / test rows of earlier periods
  for p in periods:
    first, last = (np.datetime64(d, "D").astype(np.int64) for d in (p.first_day, p.last_day))
    for name in ("train", "valid", "test"):
      s = getattr(p, name)
      r = np.asarray([row_of[k] for k in keys(s)], dtype=np.int64)
      assert np.all((day[r] >= first) & (day[r] <= last)), (p.index, name)
      assert not held_out[r].any(), (p.index, name)
      # History = the user's items just before the target, as many as exist up to
      # max_history, all at or before the target's time (same-day ties are common).
      length = s.lengths
      np.testing.assert_array_equal(length, np.minimum(r - start[s.user], max_history))
      back = np.arange(max_history)[None, :] - max_history  # -H..-1 relative to the target
      h_rows = r[:, None] + back
      real = back >= -length[:, None]
      assert np.all(inter.timestamp[h_rows[real]] <= np.repeat(inter.timestamp[r], length))
      np.add.at(times_target, r, 1)
      if p.index > 0 and name == "test":  # full past: context from earlier periods
        assert np.any(day[h_rows[real]] < first)
    for s in (p.valid, p.test):
      held_out[[row_of[k] for k in keys(s)]] = True
    # CF windows: one per user with training targets, holding the user's last
    # min(#targets, cf_max_len) training targets of the period.
    train_users, train_counts = np.unique(p.train.user, return_counts=True)
    np.testing.assert_array_equal(p.cf_windows.user, train_users)
    assert np.sum(p.cf_windows.target != PAD) == np.minimum(train_counts, cf_max_len).sum()
  # Each interaction is a target exactly once, except first-ever ones, which never are.
  np.testing.assert_array_equal(times_target, (rows != start[inter.user]).astype(np.int64))

  # D0 equals leave-one-out inside D0 for users with >= 3 D0 interactions, and its CF windows
  # equal the static training windows of D0.
  p0, in_d0 = periods[0], day <= np.datetime64(periods[0].last_day, "D").astype(np.int64)
  kept = np.flatnonzero(np.bincount(inter.user[in_d0], minlength=inter.num_users) >= 3)
  sel = in_d0 & np.isin(inter.user, kept)
  loo = leave_one_out(Interactions(
      user=np.searchsorted(kept, inter.user[sel]).astype(np.int32), item=inter.item[sel],
      timestamp=inter.timestamp[sel], user_ids=inter.user_ids[kept],
      item_ids=inter.item_ids), max_history)
  for name in ("train", "valid", "test"):
    s, expected = getattr(p0, name), getattr(loo, name)
    mine = np.isin(s.user, kept)
    _assert_samples(expected, np.searchsorted(kept, s.user[mine]),
                    s.target[mine], s.history[mine])
  windows = training_windows(Interactions(
      user=inter.user[in_d0], item=inter.item[in_d0], timestamp=inter.timestamp[in_d0],
      user_ids=inter.user_ids, item_ids=inter.item_ids), cf_max_len)
  _assert_samples(p0.cf_windows, windows.user, windows.target, windows.history)
