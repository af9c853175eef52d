"""Ranking metrics over the full catalog with one relevant item per example.

Recall@K equals Hit@K here; NDCG@K = 1 / log2(rank + 1) when the target's 1-based rank is at
most K, else 0 (PROTOCOLS.md section 1).
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (5, 10, 20)


MISSING_RANK = np.iinfo(np.int64).max  # the rank of a target absent from its ranked list


def target_ranks(ranked_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """1-based rank int64 [N] of each target in ranked_items [N, R] (targets [N]);
  `MISSING_RANK` if absent, beyond every cutoff (a list shorter than a cutoff K, beam 10
  against @20, counts its misses as misses)."""
  ranked_items = np.asarray(ranked_items)
  hits = ranked_items == np.asarray(targets)[:, None]
  found = hits.any(axis=1)
  return np.where(found, hits.argmax(axis=1) + 1, MISSING_RANK).astype(np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
  """{'recall@K', 'ndcg@K'} averaged over examples (ranks are 1-based)."""
  ranks = np.asarray(ranks, np.float64)
  if ranks.size == 0:
    raise ValueError("cannot compute metrics over zero examples")
  out = {}
  for k in ks:
    hit = ranks <= k
    out[f"recall@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
  return out


def ranking_metrics(ranked_items: np.ndarray, targets: np.ndarray, ks=DEFAULT_KS
                    ) -> dict[str, float]:
  """Metrics of ranked item lists [N, R] against targets [N]; needs R >= max(ks)."""
  if np.asarray(ranked_items).shape[1] < max(ks):
    raise ValueError(f"need at least {max(ks)} ranked items, got {ranked_items.shape[1]}")
  return metrics_from_ranks(target_ranks(ranked_items, targets), ks)
