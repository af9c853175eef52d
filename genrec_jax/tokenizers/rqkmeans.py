"""Residual k-means (RQ-k-means): semantic identifiers without gradient training.

The tokenizer of GRID, MiniOneRec and OneRec at catalog scale (issue 15): level by level,
cluster the current residuals of the item vectors into K centroids, give each vector its
nearest centroid's index as that level's code, and subtract the centroid to form the next
residual. The centroids fill a `ResidualQuantizer`'s codebooks, so the identifiers follow the
library's rules (argmin codes, `tokenizers.identifiers.assign_dedup`) and the layer encodes new
items with `quantizer.encode`.

Each level's centroids come from mini-batch k-means (Sculley, 2010): random batches of the
vectors, each centroid the running mean of every vector ever assigned to it (the per-centroid
learning rate 1 / count), so that a step costs one batch against the K centroids and 10 M
vectors fit; the full set is only read in chunks to assign the final codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.tokenizers.quantizer import ResidualQuantizer, squared_distances


@jax.jit(static_argnames=("num_clusters", "batch_size", "steps"))
def minibatch_kmeans(x: jax.Array, num_clusters: int, key: jax.Array, *, batch_size: int,
                     steps: int) -> jax.Array:
  """Mini-batch k-means on x [N, d] -> centroids [num_clusters, d].

  Initialised by k-means++ on a random sample of 3 x batch_size vectors (as scikit-learn's
  MiniBatchKMeans); each step draws `batch_size` vectors (with replacement), assigns each to
  its nearest centroid and moves every centroid to the mean of all vectors assigned to it so
  far (`minibatch_step`). A centroid that is never assigned keeps its initial vector.
  """
  sample_key, init_key, step_key = jax.random.split(key, 3)
  sample = x[jax.random.randint(sample_key, (max(3 * batch_size, num_clusters),), 0,
                                x.shape[0])]
  centroids = kmeans_plus_plus(sample, num_clusters, init_key)
  counts = jnp.zeros((num_clusters,), x.dtype)

  def step(state, key):
    batch = x[jax.random.randint(key, (batch_size,), 0, x.shape[0])]
    return minibatch_step(*state, batch), None

  (centroids, _), _ = jax.lax.scan(step, (centroids, counts),
                                   jax.random.split(step_key, steps))
  return centroids


def kmeans_plus_plus(x: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding (Arthur and Vassilvitskii, 2007): the first centroid uniformly from the
  rows of x [S, d], each next one with probability proportional to its squared distance to the
  nearest centroid chosen so far. Returns [num_clusters, d]."""
  first_key, key = jax.random.split(key)
  first = x[jax.random.randint(first_key, (), 0, x.shape[0])]
  centroids = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(first)
  nearest = jnp.sum((x - first) ** 2, axis=-1)

  def pick(i, state):
    centroids, nearest = state
    logits = jnp.where(nearest > 0, jnp.log(jnp.maximum(nearest, 1e-30)), -jnp.inf)
    chosen = x[jax.random.categorical(jax.random.fold_in(key, i), logits)]
    nearest = jnp.minimum(nearest, jnp.sum((x - chosen) ** 2, axis=-1))
    return centroids.at[i].set(chosen), nearest

  return jax.lax.fori_loop(1, num_clusters, pick, (centroids, nearest))[0]


def minibatch_step(centroids: jax.Array, counts: jax.Array, batch: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """One mini-batch k-means update: centroids [K, d] with the counts [K] of vectors assigned
  so far, a batch [B, d]; each batch vector joins its nearest centroid and every centroid
  becomes the mean of all its vectors, (count * centroid + sum of new vectors) /
  (count + new)."""
  assign = jax.nn.one_hot(jnp.argmin(squared_distances(batch, centroids), axis=-1),
                          centroids.shape[0], dtype=batch.dtype)  # [B, K]
  new_counts = counts + assign.sum(0)
  moved = (centroids * counts[:, None] + assign.T @ batch) / jnp.maximum(new_counts, 1.0)[:, None]
  return jnp.where(new_counts[:, None] > 0, moved, centroids), new_counts


@jax.jit
def _nearest(x: jax.Array, centroids: jax.Array) -> jax.Array:
  return jnp.argmin(squared_distances(x, centroids), axis=-1).astype(jnp.int32)


def nearest_centroids(x: np.ndarray, centroids: jax.Array, chunk: int = 65536) -> np.ndarray:
  """Index int32 [N] of each row's nearest centroid, over chunks of `chunk` rows (the [N, K]
  distance matrix of a large catalog never exists at once)."""
  return np.concatenate([np.asarray(_nearest(jnp.asarray(x[i:i + chunk]), centroids))
                         for i in range(0, len(x), chunk)])


def fit_rq_kmeans(x: np.ndarray, num_levels: int, codebook_size: int, seed: int = 0, *,
                  batch_size: int = 4096, steps: int = 200) -> tuple[ResidualQuantizer,
                                                                      np.ndarray]:
  """RQ-k-means over item vectors x [N, d] (N >= codebook_size): a `ResidualQuantizer` whose
  codebooks are each level's mini-batch k-means centroids, and the codes int32 [N, L]."""
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] < codebook_size:
    raise ValueError(f"RQ-k-means needs item vectors [N, d] with N >= codebook_size="
                     f"{codebook_size}, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("RQ-k-means input vectors contain NaN or inf")
  key = jax.random.key(seed)
  residual = jnp.asarray(x)
  books, codes = [], []
  for level in range(num_levels):
    centroids = minibatch_kmeans(residual, codebook_size, jax.random.fold_in(key, level),
                                 batch_size=min(batch_size, x.shape[0]), steps=steps)
    nearest = nearest_centroids(np.asarray(residual), centroids)
    books.append(centroids)
    codes.append(nearest)
    residual = residual - centroids[jnp.asarray(nearest)]
  quantizer = ResidualQuantizer(num_levels, codebook_size, x.shape[1], rngs=nnx.Rngs(seed))
  quantizer.codebooks[...] = jnp.stack(books)
  return quantizer, np.stack(codes, axis=1).astype(np.int32)
