"""LETTER (Wang et al., 2024; METHODS.md section 2): TIGER with a learnable tokenizer.

Beside TIGER's reconstruction and quantization losses the tokenizer
  - aligns the quantized latents with SASRec's collaborative embeddings (InfoNCE with in-batch
    negatives, weight `tokenizer.cf_weight`; the term is shared with DACT's base tokenizer and
    lives in `tokenizers.rqvae`; LETTER's code uses dot products, `cf_similarity="dot"`),
  - spreads the codewords with a diversity loss (this module): each level's codewords are
    clustered into `tokenizer.diversity_groups` groups of 10..60 codewords by constrained
    k-means, refreshed every epoch as in the LETTER code; for an item assigned code k, a random
    other codeword of k's group is the positive among all codewords (weight
    `tokenizer.diversity_weight`, 1e-4),
  - assigns last-level codes by balanced Sinkhorn-Knopp while training
    (`tokenizer.sinkhorn_epsilon`), and keeps the checkpoint with the fewest collisions
    (`tokenizer.selection="min_collision"`).
The stages are TIGER's, with the CF model always trained.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genrec_jax.methods import tiger
from genrec_jax.tokenizers.quantizer import QuantizerOutput, balanced_kmeans, letter_group_sizes
from genrec_jax.tokenizers.rqvae import RQVAE, RQVAEOutput


def diversity_loss(quant: QuantizerOutput, codebooks: jax.Array, groups: jax.Array,
                   key: jax.Array) -> jax.Array:
  """LETTER's code diversity loss.

  For an item assigned code k at level l, a random other codeword of k's group (groups: int32
  [L, K] from k-means over the level's codewords) is the positive; all codewords of the level
  are candidates (dot products, temperature 1, self masked). As in the LETTER code, the query
  is the raw assigned codeword, so the loss shapes the codebook only (no gradient reaches the
  encoder, whose codes come from an argmin). Items whose group has no other member are skipped.
  """
  num_levels, k = groups.shape
  total = 0.0
  for level in range(num_levels):
    code = quant.codes[:, level]
    query = codebooks[level][code]
    same = groups[level][code][:, None] == groups[level][None, :]
    not_self = jnp.arange(k)[None, :] != code[:, None]
    eligible = same & not_self
    noise = jax.random.gumbel(jax.random.fold_in(key, level), eligible.shape)
    positive = jnp.argmax(jnp.where(eligible, noise, -jnp.inf), axis=-1)
    logits = jnp.where(not_self, query @ codebooks[level].T, -1e9)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), positive[:, None], 1)[:, 0]
    valid = eligible.any(-1)
    total += jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)
  return total / num_levels


def codeword_groups(codebooks: np.ndarray, num_groups: int, seed: int) -> np.ndarray:
  """Constrained k-means group label of every codeword, int32 [L, K] for codebooks [L, K, d]
  (group sizes as in the LETTER code: `letter_group_sizes`)."""
  books = np.asarray(codebooks)
  size_min, size_max = letter_group_sizes(books.shape[1], num_groups)
  return np.stack([balanced_kmeans(book, num_groups, seed=seed + level, size_min=size_min,
                                   size_max=size_max) for level, book in enumerate(books)])


@dataclasses.dataclass(frozen=True)
class DiversityRegularizer:
  """LETTER's diversity term for `training.tokenizer.train_tokenizer` (a
  `TokenizerRegularizer`): weight * `diversity_loss`, groups refreshed every epoch
  (`refresh_steps` = 0) or every `refresh_steps` steps."""

  weight: float
  num_groups: int = 10
  seed: int = 0
  refresh_steps: int = 0

  def context(self, model: RQVAE, step: int) -> dict:
    books = np.asarray(jax.device_get(model.quantizer.codebooks[...]))
    if not 1 < self.num_groups < books.shape[1]:
      raise ValueError(f"tokenizer.diversity_groups must be in (1, codebook_size="
                       f"{books.shape[1]}), got {self.num_groups}")
    return {"groups": jnp.asarray(codeword_groups(books, self.num_groups, self.seed + step))}

  def loss(self, model: RQVAE, output: RQVAEOutput, context: dict, key: jax.Array
           ) -> tuple[jax.Array, dict]:
    value = diversity_loss(output.quant, model.quantizer.codebooks[...], context["groups"], key)
    return self.weight * value, {"diversity": value}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  regularizer = None
  if config.tokenizer.diversity_weight > 0:
    regularizer = DiversityRegularizer(config.tokenizer.diversity_weight,
                                       config.tokenizer.diversity_groups, config.seed)
  return tiger.run(config, workdir, collaborative=True, regularizer=regularizer)
