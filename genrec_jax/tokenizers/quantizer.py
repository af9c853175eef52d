"""Residual vector quantization as a reusable Flax NNX layer.

`ResidualQuantizer` maps vectors to L discrete codes (one per level, K codes per level) and
back. It is the core of every tokenizer in the library (TIGER, LETTER, DACT, ETEGRec, UniGRec)
and can be dropped into any Flax NNX model:

    rq = ResidualQuantizer(num_levels=3, codebook_size=256, dim=32, rngs=nnx.Rngs(0))
    out = rq(latents)            # latents: [B, 32]
    out.quantized                # [B, 32] straight-through quantized latent
    out.codes                    # [B, 3] int32
    out.loss                     # codebook + beta * commitment loss (scalar)

Math (METHODS.md section 1): v_1 = x; at level l the code is c_l = argmin_k ||v_l - e^l_k||^2,
v_{l+1} = v_l - e^l_{c_l}; the quantized vector is q = sum_l e^l_{c_l}. As in the reference
RQ-VAE (which subtracts the straight-through output), the residual handed to level l + 1 carries
no gradient: each codebook learns only from its own level's codebook loss, and only the
straight-through path reaches the input (`detach_residual=False` keeps the gradient path through
v_{l+1} = v_l - e^l_{c_l}, an earlier behaviour of this library).
Loss scale (`loss_reduction`): "sum" takes squared norms over the d dimensions and sums the
levels (the TIGER paper's ||.||^2); "mean" averages over dimensions and levels (F.mse_loss and
the level mean of the LETTER / DACT code). With `temperature`
set, a soft assignment p_l = softmax_k(-||v_l - e^l_k||^2 / T) is returned beside the hard one
(the distributions that DACT's stability KL, ETEGRec's SIA and UniGRec's soft identifiers use);
in `soft=True` mode the soft code p_l E_l replaces the hard codeword (UniGRec). With
`sinkhorn_epsilons`, the chosen levels assign codes by Sinkhorn-Knopp balanced assignment over
the batch instead of argmin (LETTER's last level during training; `sinkhorn_codes`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass
class QuantizerOutput:
  """Result of a forward pass over B vectors of size d with L levels of K codes.

  Attributes:
    quantized: [B, d] quantized vector; gradients pass straight through to the input.
    codes: [B, L] int32 hard codes (argmin distance).
    residuals: [B, L, d] the residual v_l entering each level.
    codewords: [B, L, d] the selected (or soft) codeword of each level.
    log_probs: [B, L, K] log softmax(-distance / temperature) per level.
    codebook_loss: scalar, ||sg(v_l) - e||^2 per item (summed or averaged over dimensions),
      mean over the batch, summed or averaged over levels (`loss_reduction`).
    commitment_loss: scalar, the same reduction of ||v_l - sg(e)||^2.
    loss: scalar, codebook_loss + beta * commitment_loss.
  """

  quantized: jax.Array
  codes: jax.Array
  residuals: jax.Array
  codewords: jax.Array
  log_probs: jax.Array
  codebook_loss: jax.Array
  commitment_loss: jax.Array
  loss: jax.Array


jax.tree_util.register_dataclass(
    QuantizerOutput,
    data_fields=[f.name for f in dataclasses.fields(QuantizerOutput)],
    meta_fields=[])


LOSS_REDUCTIONS = ("sum", "mean")


def squared_error(a: jax.Array, b: jax.Array, reduction: str) -> jax.Array:
  """||a - b||^2 of rows a, b [B, d], summed ("sum") or averaged ("mean") over the d
  dimensions, then averaged over the batch: a scalar."""
  per_row = jnp.sum((a - b) ** 2, -1)
  if reduction == "mean":
    per_row = per_row / a.shape[-1]
  elif reduction != "sum":
    raise ValueError(f"loss reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
  return jnp.mean(per_row)


def squared_distances(v: jax.Array, codebook: jax.Array) -> jax.Array:
  """||v_b - e_k||^2 for v: [B, d], codebook: [K, d] -> [B, K]."""
  return (jnp.sum(v * v, -1, keepdims=True) - 2.0 * v @ codebook.T +
          jnp.sum(codebook * codebook, -1)[None, :])


class ResidualQuantizer(nnx.Module):
  """L-level residual quantizer with K codewords of size `dim` per level.

  Args:
    num_levels: L, number of residual levels.
    codebook_size: K, codewords per level.
    dim: d, size of the vectors being quantized.
    beta: weight of the commitment loss (0.25 in TIGER / DACT).
    loss_reduction: "sum" (squared norms, levels summed: TIGER paper) or "mean" (mean over
      dimensions and levels: LETTER / DACT code).
    detach_residual: stop the gradient of the residual handed to the next level (reference
      RQ-VAE); False lets later levels' losses reach the input and earlier codebooks.
    rngs: NNX rngs; the `params` stream initialises the codebooks (uniform, scale 1/K as in the
      reference RQ-VAE code; k-means initialisation usually overwrites them).
  """

  def __init__(self, num_levels: int, codebook_size: int, dim: int, *, beta: float = 0.25,
               loss_reduction: str = "sum", detach_residual: bool = True, rngs: nnx.Rngs):
    if num_levels < 1 or codebook_size < 2 or dim < 1:
      raise ValueError(f"ResidualQuantizer needs num_levels >= 1, codebook_size >= 2, dim >= 1; "
                       f"got {num_levels}, {codebook_size}, {dim}")
    if loss_reduction not in LOSS_REDUCTIONS:
      raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got "
                       f"{loss_reduction!r}")
    self.loss_reduction = loss_reduction
    self.detach_residual = detach_residual
    self.num_levels = num_levels
    self.codebook_size = codebook_size
    self.dim = dim
    self.beta = beta
    scale = 1.0 / codebook_size
    self.codebooks = nnx.Param(jax.random.uniform(
        rngs.params(), (num_levels, codebook_size, dim), minval=-scale, maxval=scale))

  def __call__(self, x: jax.Array, *, temperature: float = 1.0, soft: bool = False,
               sinkhorn_epsilons: tuple[float, ...] | None = None,
               sinkhorn_iterations: int = 50, forced_codes: jax.Array | None = None
               ) -> QuantizerOutput:
    """Quantizes x: [B, d].

    `soft` uses p_l E_l instead of the hard codeword (UniGRec). `sinkhorn_epsilons` (one value
    per level, 0 = argmin) makes the levels with epsilon > 0 pick codes by balanced Sinkhorn
    assignment over the batch (a training-time regulariser against codebook collapse).
    `forced_codes` (int [B, L], -1 = free) holds rows to given codes instead of the nearest
    codewords (fine-tuning that keeps old items' assignments fixed, Reformer); the losses then
    pull those codewords and latents together.
    """
    if x.ndim != 2 or x.shape[-1] != self.dim:
      raise ValueError(f"ResidualQuantizer expects [batch, {self.dim}], got {x.shape}")
    if forced_codes is not None and forced_codes.shape != (x.shape[0], self.num_levels):
      raise ValueError(f"forced_codes must be [{x.shape[0]}, {self.num_levels}], got "
                       f"{forced_codes.shape}")
    if sinkhorn_epsilons is not None and len(sinkhorn_epsilons) != self.num_levels:
      raise ValueError(f"sinkhorn_epsilons needs one value per level ({self.num_levels}), got "
                       f"{sinkhorn_epsilons}")
    residual = x
    codes, residuals, codewords, log_probs = [], [], [], []
    codebook_loss = commitment_loss = 0.0
    for level in range(self.num_levels):
      codebook = self.codebooks[level]
      dist = squared_distances(residual, codebook)
      epsilon = sinkhorn_epsilons[level] if sinkhorn_epsilons else 0.0
      code = (sinkhorn_codes(dist, epsilon, sinkhorn_iterations) if epsilon > 0
              else jnp.argmin(dist, axis=-1))
      if forced_codes is not None:
        code = jnp.where(forced_codes[:, level] >= 0, forced_codes[:, level], code)
      logp = jax.nn.log_softmax(-dist / temperature, axis=-1)
      if soft:
        chosen = jnp.exp(logp) @ codebook
      else:
        chosen = codebook[code]
        codebook_loss += squared_error(jax.lax.stop_gradient(residual), chosen,
                                       self.loss_reduction)
        commitment_loss += squared_error(residual, jax.lax.stop_gradient(chosen),
                                         self.loss_reduction)
      codes.append(code)
      residuals.append(residual)
      codewords.append(chosen)
      log_probs.append(logp)
      residual = residual - chosen
      if self.detach_residual and not soft:
        residual = jax.lax.stop_gradient(residual)
    if self.loss_reduction == "mean":
      codebook_loss /= self.num_levels
      commitment_loss /= self.num_levels
    summed = sum(codewords)
    # Straight-through: forward value is the quantized vector, gradient is the identity.
    quantized = summed if soft else x + jax.lax.stop_gradient(summed - x)
    codebook_loss = jnp.asarray(codebook_loss)
    commitment_loss = jnp.asarray(commitment_loss)
    return QuantizerOutput(
        quantized=quantized,
        codes=jnp.stack(codes, axis=1).astype(jnp.int32),
        residuals=jnp.stack(residuals, axis=1),
        codewords=jnp.stack(codewords, axis=1),
        log_probs=jnp.stack(log_probs, axis=1),
        codebook_loss=codebook_loss,
        commitment_loss=commitment_loss,
        loss=codebook_loss + self.beta * commitment_loss)

  def encode(self, x: jax.Array) -> jax.Array:
    """Hard codes of x: [B, d] -> [B, L] int32."""
    return self(x).codes

  def decode(self, codes: jax.Array) -> jax.Array:
    """Sum of the selected codewords: codes [B, L] -> [B, d]."""
    levels = jnp.arange(self.num_levels)
    return jnp.sum(self.codebooks[levels[None, :], codes], axis=1)

  def init_kmeans(self, x: jax.Array, key: jax.Array, *, iterations: int = 50) -> None:
    """Sets every level's codebook to k-means centroids of that level's residuals.

    Level by level: cluster the current residuals of x [N, d] (N >= K) into K centroids, then
    subtract each vector's nearest centroid and move to the next level.
    """
    if x.shape[0] < self.codebook_size:
      raise ValueError(f"k-means initialisation needs at least K={self.codebook_size} vectors, "
                       f"got {x.shape[0]}")
    residual = jnp.asarray(x, jnp.float32)
    books = []
    for level in range(self.num_levels):
      centroids = kmeans(residual, self.codebook_size, jax.random.fold_in(key, level),
                         iterations=iterations)
      books.append(centroids)
      nearest = jnp.argmin(squared_distances(residual, centroids), axis=-1)
      residual = residual - centroids[nearest]
    self.codebooks[...] = jnp.stack(books)


def sinkhorn_codes(distances: jax.Array, epsilon: float, iterations: int = 50) -> jax.Array:
  """Balanced assignment of B vectors to K codes by Sinkhorn-Knopp (LETTER / LC-Rec).

  The distances [B, K] are centred and scaled to [-1, 1] (as in the reference code), the plan
  Q ~ exp(-d / epsilon) is alternately normalised so that every vector carries mass 1/B and
  every code 1/K, and each vector takes its code of largest mass: int32 [B]. Computed in the
  log domain, so small epsilons (0.003) do not overflow float32. No gradient flows through it.
  """
  d = jax.lax.stop_gradient(distances)
  middle = (d.max() + d.min()) / 2
  d = (d - middle) / (d.max() - middle + 1e-5)
  b, k = d.shape
  log_q = -d / epsilon

  def normalise(log_q, _):
    log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - jnp.log(b)
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - jnp.log(k)
    return log_q, None

  log_q, _ = jax.lax.scan(normalise, log_q, None, length=iterations)
  return jnp.argmax(log_q, axis=-1).astype(jnp.int32)


@jax.jit(static_argnames=("num_clusters", "iterations"))
def kmeans(x: jax.Array, num_clusters: int, key: jax.Array, *, iterations: int = 50
           ) -> jax.Array:
  """Lloyd's k-means on x [N, d] -> centroids [num_clusters, d].

  Initialised from distinct random points; a cluster that empties keeps its previous centroid.
  """
  init = x[jax.random.choice(key, x.shape[0], (num_clusters,), replace=False)]

  def step(centroids, _):
    assign = jnp.argmin(squared_distances(x, centroids), axis=-1)
    one_hot = jax.nn.one_hot(assign, num_clusters, dtype=x.dtype)
    counts = one_hot.sum(0)
    sums = one_hot.T @ x
    updated = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)
    return updated, None

  centroids, _ = jax.lax.scan(step, init, None, length=iterations)
  return centroids


def balanced_kmeans(x: np.ndarray, num_clusters: int, seed: int = 0, iterations: int = 20, *,
                    size_min: int = 0, size_max: int | None = None) -> np.ndarray:
  """Size-constrained k-means (LETTER's codeword groups): labels int32 [N] of x [N, d], every
  cluster holding between size_min and size_max points (default size_max: ceil(N / C), equal
  groups). LETTER groups K = 256 codewords into C = 10 clusters of 10..60 (`letter_group_sizes`).

  Lloyd iterations whose assignment step is the exact minimum-cost assignment under the bounds:
  each centroid is offered size_max slots, size_min of them carrying a bonus larger than any
  total cost so that every cluster's minimum is filled first (Hungarian algorithm).
  """
  from scipy.optimize import linear_sum_assignment
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  if not 1 <= num_clusters <= n:
    raise ValueError(f"balanced_kmeans needs 1 <= num_clusters <= {n}, got {num_clusters}")
  size_max = -(-n // num_clusters) if size_max is None else size_max
  if not 0 <= size_min <= size_max or num_clusters * size_min > n or num_clusters * size_max < n:
    raise ValueError(f"cluster sizes [{size_min}, {size_max}] cannot hold {n} points in "
                     f"{num_clusters} clusters")
  rng = np.random.default_rng(seed)
  centroids = x[rng.choice(n, num_clusters, replace=False)]
  labels = np.full(n, -1)
  required = np.arange(size_max) < size_min  # [size_max] slots that carry the bonus
  for _ in range(iterations):
    cost = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)  # [N, C]
    bonus = (cost.max() + 1.0) * n
    slots = np.repeat(cost, size_max, axis=1) - bonus * np.tile(required, num_clusters)
    _, slot = linear_sum_assignment(slots)
    new = slot // size_max
    if np.array_equal(new, labels):
      break
    labels = new
    centroids = np.stack([x[labels == c].mean(0) if (labels == c).any() else centroids[c]
                          for c in range(num_clusters)])
  return labels.astype(np.int32)


def letter_group_sizes(codebook_size: int, num_groups: int) -> tuple[int, int]:
  """(size_min, size_max) of LETTER's constrained k-means over a codebook: min(K // (2C), 10)
  and 6C, as in the official trainer (10 and 60 for K = 256, C = 10)."""
  return min(codebook_size // (2 * num_groups), 10), min(6 * num_groups, codebook_size)


def code_usage(codes: np.ndarray, codebook_size: int) -> dict[str, list[float]]:
  """Per-level diagnostics of codes [N, L]: fraction of codes used and perplexity.

  Perplexity = exp(entropy of the empirical code distribution); K means uniform usage, 1 means
  collapse onto a single code.
  """
  codes = np.asarray(codes)
  usage, perplexity = [], []
  for level in range(codes.shape[1]):
    counts = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    usage.append(float((counts > 0).mean()))
    perplexity.append(float(np.exp(-(nz * np.log(nz)).sum())))
  return {"usage": usage, "perplexity": perplexity}
