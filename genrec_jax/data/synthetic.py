"""Synthetic interactions with planted collaborative drift, to test continual tokenizers.

`planted_drift_data` generates a log in which the truth is known: items belong to clusters,
users consume mostly inside one home cluster, so co-occurrence neighbourhoods are the
clusters. From period 1 on, a planted subset of items (`drifting`) moves to a different
cluster: their co-occurrence neighbourhood changes while their static semantic features (which
depend on the original cluster only) do not. Stationary items keep their cluster throughout.

`cooccurrence_embeddings` turns one period's rows into cheap, deterministic collaborative
embeddings that live in a basis shared by all periods: fixed random anchor vectors, one per
item, propagated over the period's item co-occurrence graph. They stand in for the SASRec
embeddings fine-tuned on every period (METHODS.md section 4) in tests: an item's embedding
points at the anchor mass of its current co-occurrence neighbourhood, so a drifting item's
embedding turns towards its new cluster and a stationary item's stays roughly in place.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from genrec_jax.data.interactions import Interactions


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticDrift:
  """A generated log with its ground truth.

  Attributes:
    interactions: rows sorted by user, then time; every user is active in every period.
    period_of_row: int32 [N], the period of each interaction row.
    period_starts: int64 [num_periods + 1], period p covers timestamps
      [period_starts[p], period_starts[p + 1]).
    cluster: int32 [num_periods, num_items], each item's co-occurrence cluster per period.
    drifting: bool [num_items], the planted subset that changes cluster from period 1 on.
    features: float32 [num_items, feature_dim], static semantic vectors: the centre of the
      item's period-0 cluster plus Gaussian noise.
  """

  interactions: Interactions
  period_of_row: np.ndarray
  period_starts: np.ndarray
  cluster: np.ndarray
  drifting: np.ndarray
  features: np.ndarray


def planted_drift_data(num_users: int, num_items: int, num_clusters: int,
                       drift_fraction: float, num_periods: int, seed: int = 0, *,
                       feature_dim: int = 32, feature_noise: float = 0.5,
                       interactions_per_period: int = 8, in_cluster_prob: float = 0.9,
                       period_seconds: int = 30 * 86400, start: int = 1_400_000_000
                       ) -> SyntheticDrift:
  """Generates users x periods x interactions_per_period rows with planted drift.

  Items are split evenly (in random order) over `num_clusters` clusters; round(drift_fraction
  * num_items) random items move to another random cluster from period 1 on. Each user has a
  home cluster and, in every period, draws `interactions_per_period` items: with probability
  `in_cluster_prob` a uniform member of the home cluster under that period's assignment,
  otherwise a uniform item. Times are uniform inside the period. Raw ids are zero-padded
  ("u00012", "i00345") so that indices equal generation order.
  """
  if num_items < num_clusters or num_clusters < 2:
    raise ValueError(f"need num_clusters >= 2 and num_items >= num_clusters, got "
                     f"{num_items} items, {num_clusters} clusters")
  if not 0.0 <= drift_fraction <= 1.0 or num_periods < 1 or num_users < 1:
    raise ValueError(f"need 0 <= drift_fraction <= 1, num_periods >= 1, num_users >= 1; got "
                     f"{drift_fraction}, {num_periods}, {num_users}")
  rng = np.random.default_rng(seed)
  base = rng.permutation(np.arange(num_items) % num_clusters)
  drifting = np.zeros(num_items, bool)
  drifting[rng.choice(num_items, round(drift_fraction * num_items), replace=False)] = True
  moved = (base + rng.integers(1, num_clusters, num_items)) % num_clusters
  cluster = np.stack([base] + [np.where(drifting, moved, base)] * (num_periods - 1))
  centres = rng.normal(size=(num_clusters, feature_dim))
  features = (centres[base] + feature_noise * rng.normal(size=(num_items, feature_dim)))

  home = rng.integers(0, num_clusters, num_users)
  period_starts = start + period_seconds * np.arange(num_periods + 1, dtype=np.int64)
  items, times = [], []
  for period in range(num_periods):
    members = np.argsort(cluster[period], kind="stable")
    counts = np.bincount(cluster[period], minlength=num_clusters)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shape = (num_users, interactions_per_period)
    size = counts[home][:, None]
    in_cluster = members[offsets[home][:, None] +
                         np.floor(rng.random(shape) * np.maximum(size, 1)).astype(np.int64)]
    anywhere = rng.integers(0, num_items, shape)
    use_cluster = (rng.random(shape) < in_cluster_prob) & (size > 0)
    items.append(np.where(use_cluster, in_cluster, anywhere))
    times.append(np.sort(rng.integers(period_starts[period], period_starts[period + 1], shape),
                         axis=1))
  per_user = num_periods * interactions_per_period
  user = np.repeat(np.arange(num_users), per_user)
  interactions = Interactions(
      user=user.astype(np.int32),
      item=np.concatenate(items, axis=1).reshape(-1).astype(np.int32),
      timestamp=np.concatenate(times, axis=1).reshape(-1).astype(np.int64),
      user_ids=np.asarray([f"u{u:05d}" for u in range(num_users)]),
      item_ids=np.asarray([f"i{i:05d}" for i in range(num_items)]),
      source="synthetic:planted_drift")
  period_of_row = np.tile(np.repeat(np.arange(num_periods), interactions_per_period),
                          num_users)
  return SyntheticDrift(interactions, period_of_row.astype(np.int32), period_starts,
                        cluster.astype(np.int32), drifting, features.astype(np.float32))


def random_anchors(num_items: int, dim: int, seed: int = 0) -> np.ndarray:
  """Fixed unit-norm random vectors [num_items, dim], the basis shared by all periods."""
  anchors = np.random.default_rng(seed).normal(size=(num_items, dim))
  return (anchors / np.linalg.norm(anchors, axis=1, keepdims=True)).astype(np.float32)


def cooccurrence_embeddings(interactions: Interactions, rows: np.ndarray, anchors: np.ndarray,
                            steps: int = 2) -> np.ndarray:
  """CF embeddings [num_items, dim] from the co-occurrence graph of the selected rows.

  Two items co-occur when one user interacted with both in the selected rows (weight: product
  of the two interaction counts). Starting from the anchors X_0 [num_items, dim], each step
  sets X_{s+1} = normalize(C X_s) with C the co-occurrence matrix without its diagonal, so an
  item's embedding is the (normalized) anchor mass of its neighbourhood, never its own anchor.
  More steps smooth embeddings inside a neighbourhood. Items with no co-occurring item in the
  rows get a zero vector. Deterministic; cost O(steps * rows * dim).

  Args:
    interactions: the log.
    rows: bool mask [N] or int indices of the rows to use (e.g. one period's rows).
    anchors: [num_items, dim] fixed vectors (`random_anchors`), the same for every period.
    steps: propagation steps (>= 1).
  """
  if anchors.shape[0] != interactions.num_items:
    raise ValueError(f"anchors must have one row per item ({interactions.num_items}), got "
                     f"{anchors.shape}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  user = interactions.user[rows].astype(np.int64)
  item = interactions.item[rows].astype(np.int64)
  pairs, pair_counts = np.unique(user * interactions.num_items + item, return_counts=True)
  self_weight = np.bincount(pairs % interactions.num_items, weights=pair_counts.astype(float) ** 2,
                            minlength=interactions.num_items)
  x = anchors.astype(np.float64)
  for _ in range(steps):
    profile = np.zeros((interactions.num_users, x.shape[1]))
    np.add.at(profile, user, x[item])
    propagated = np.zeros_like(x)
    np.add.at(propagated, item, profile[user])
    propagated -= self_weight[:, None] * x
    norm = np.linalg.norm(propagated, axis=1, keepdims=True)
    x = np.where(norm > 1e-9, propagated / np.maximum(norm, 1e-9), 0.0)
  return x.astype(np.float32)
