"""RQ-VAE item tokenizer (TIGER), with the collaborative regularizer of LETTER and DACT.

x [B, D_in] --encoder MLP--> r [B, d] --ResidualQuantizer--> q [B, d] --decoder MLP--> x_hat.

Losses (METHODS.md sections 1-2):
  reconstruction  ||x - x_hat||^2 (mean over the batch)
  quantization    per level ||sg(v_l) - e_l||^2 + beta ||v_l - sg(e_l)||^2
  collaborative   InfoNCE(q_i, cf_i) over the batch (LETTER; DACT's base tokenizer, alpha 0.02)
  method terms    a method adds its own terms through `rqvae_losses(regularizer=...)` (LETTER's
                  codeword diversity, `genrec_jax.methods.letter`)
One scale for reconstruction and quantization (`loss_reduction`): "sum" = squared norms over
dimensions, levels summed (TIGER paper); "mean" = averages over dimensions and levels
(F.mse_loss in the LETTER and DACT code, whose RQ loss is the mean of the level losses).
While training, LETTER also assigns last-level codes by balanced Sinkhorn assignment over the
batch (`sinkhorn_epsilon`); identifiers are always encoded by argmin.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.tokenizers.quantizer import QuantizerOutput, ResidualQuantizer, squared_error


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  """Architecture and loss weights of the tokenizer."""

  input_dim: int
  hidden_dims: tuple[int, ...] = (512, 256, 128, 64)
  latent_dim: int = 32
  num_levels: int = 3
  codebook_size: int = 256
  beta: float = 0.25
  loss_reduction: str = "sum"  # "sum" (TIGER paper norms) | "mean" (LETTER / DACT code)
  detach_residual: bool = True  # reference RQ-VAE: no gradient through the passed residual
  cf_weight: float = 0.0  # alpha of the collaborative InfoNCE (0 = TIGER)
  cf_temperature: float = 1.0
  cf_similarity: str = "cosine"  # "cosine" (DACT code) or "dot" (LETTER code)
  sinkhorn_epsilon: float = 0.0  # LETTER: 0.003, balanced last-level codes while training
  sinkhorn_iterations: int = 50
  dropout_rate: float = 0.0
  soft: bool = False  # UniGRec: soft codes p_l E_l at a temperature, no VQ / commitment loss
  uniformity_weight: float = 0.0  # UniGRec: weight of the codeword-usage negative entropy
  uniformity_reduction: str = "sum"  # over levels: "sum" (the paper's per-level term) | "mean"
  #   (the official code)


class MLP(nnx.Module):
  """ReLU MLP over `dims` (no activation after the last layer)."""

  def __init__(self, dims: tuple[int, ...], rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


@dataclasses.dataclass
class RQVAEOutput:
  """Forward pass over B items: latent r [B, d], quantizer output, reconstruction [B, D_in]."""

  latent: jax.Array
  quant: QuantizerOutput
  reconstruction: jax.Array


class RQVAE(nnx.Module):
  """Encoder MLP + ResidualQuantizer + mirrored decoder MLP."""

  def __init__(self, cfg: RQVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dims = (cfg.input_dim,) + tuple(cfg.hidden_dims) + (cfg.latent_dim,)
    self.encoder = MLP(dims, rngs)
    self.quantizer = ResidualQuantizer(cfg.num_levels, cfg.codebook_size, cfg.latent_dim,
                                       beta=cfg.beta, loss_reduction=cfg.loss_reduction,
                                       detach_residual=cfg.detach_residual, rngs=rngs)
    self.decoder = MLP(dims[::-1], rngs)

  def __call__(self, x: jax.Array, *, temperature: float | jax.Array = 1.0,
               training: bool = False) -> RQVAEOutput:
    """Items [B, D_in] -> latent, quantizer output, reconstruction. With `training` and
    cfg.sinkhorn_epsilon > 0, the last level's codes come from balanced Sinkhorn assignment
    over the batch (LETTER); otherwise every level uses argmin. A soft tokenizer (cfg.soft)
    reconstructs from the soft codes at `temperature` (its hard codes are argmax p_l along
    the soft residuals)."""
    latent = self.encoder(x)
    epsilons = None
    if training and self.cfg.sinkhorn_epsilon > 0:
      epsilons = (0.0,) * (self.cfg.num_levels - 1) + (self.cfg.sinkhorn_epsilon,)
    quant = self.quantizer(latent, temperature=temperature, soft=self.cfg.soft,
                           sinkhorn_epsilons=epsilons,
                           sinkhorn_iterations=self.cfg.sinkhorn_iterations)
    return RQVAEOutput(latent, quant, self.decoder(quant.quantized))

  def encode(self, x: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """Item vectors [B, D_in] -> codes int32 [B, L] (argmin; a soft tokenizer's along its soft
    residuals at `temperature`)."""
    return self.quantizer(self.encoder(x), temperature=temperature, soft=self.cfg.soft).codes


def info_nce(a: jax.Array, b: jax.Array, temperature: float, similarity: str = "cosine"
             ) -> jax.Array:
  """Cross-entropy of sim(a_i, b_j) / temperature with the diagonal as positives; a, b [B, d]."""
  if similarity == "cosine":
    a = a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-8)
    b = b / (jnp.linalg.norm(b, axis=-1, keepdims=True) + 1e-8)
  elif similarity != "dot":
    raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
  logits = a @ b.T / temperature
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))


def codeword_uniformity(log_probs: jax.Array, reduction: str = "sum") -> jax.Array:
  """UniGRec's codeword uniformity term: per level sum_k qbar_k log qbar_k, the negative entropy
  of the batch's average assignment qbar = mean_b p_l(b) (log_probs [B, L, K]), summed over
  levels ("sum", one term per level as the paper writes it) or averaged ("mean", the official
  code). Minimising it spreads the batch over the codewords; its minimum is -log K per level."""
  if reduction not in ("sum", "mean"):
    raise ValueError(f"uniformity reduction must be 'sum' or 'mean', got {reduction!r}")
  usage = jnp.mean(jnp.exp(log_probs), axis=0)  # [L, K]
  per_level = jnp.sum(usage * jnp.log(usage + 1e-10), axis=-1)
  return per_level.sum() if reduction == "sum" else per_level.mean()


def rqvae_losses(model: RQVAE, x: jax.Array, cf: jax.Array | None = None,
                 regularizer: Callable[[RQVAE, RQVAEOutput], tuple[jax.Array, dict]] | None = None,
                 temperature: float | jax.Array = 1.0
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total tokenizer loss and its parts for items x [B, D_in] (cf [B, d_cf] for the
  collaborative term). `regularizer(model, output) -> (weighted term, parts)` adds a method's
  own terms (its parts are reported beside reconstruction, quantization and cf). A soft
  tokenizer runs at `temperature` and has no quantization loss; its uniformity term is
  `codeword_uniformity` of the batch."""
  cfg = model.cfg
  out = model(x, temperature=temperature, training=True)
  parts = {"recon": squared_error(x, out.reconstruction, cfg.loss_reduction)}
  total = parts["recon"]
  if not cfg.soft:
    parts["quant"] = out.quant.loss
    total += parts["quant"]
  if cfg.uniformity_weight > 0:
    parts["uniformity"] = codeword_uniformity(out.quant.log_probs, cfg.uniformity_reduction)
    total += cfg.uniformity_weight * parts["uniformity"]
  if cfg.cf_weight > 0:
    if cf is None:
      raise ValueError("cf_weight > 0 needs collaborative embeddings")
    parts["cf"] = info_nce(out.quant.quantized, cf, cfg.cf_temperature, cfg.cf_similarity)
    total += cfg.cf_weight * parts["cf"]
  if regularizer is not None:
    term, extra = regularizer(model, out)
    total += term
    parts.update(extra)
  parts["total"] = total
  return total, parts
