"""DACT: drift-aware continual fine-tuning of an RQ-VAE tokenizer (METHODS.md section 5).

Every piece of DACT's tokenizer-side math lives in this module; the identifier step
(relaxed-to-strict reassignment) is in `genrec_jax.tokenizers.reassign`.

Per period t >= 1, starting from the period t-1 tokenizer (and CDIM from t-1 when t > 1):

1. With the frozen t-1 tokenizer, once for all N items of the period: old latents
   o = encoder_{t-1}(x) [N, d] and the level-1 teacher distribution
   log p_old(k|i) = log_softmax_k(-||o_i - e^1_{t-1,k}||^2 / T) [N, K] (`teacher_targets`).
2. Train the tokenizer and the Collaborative Drift Identification Module (CDIM) jointly for
   `steps` steps on random batches of all N items with

     L = L_D + lambda_s L_S + lambda_g KL(p_old || p_cur) + confidence_weight * mean(g^2)

   (`dact_loss`). CDIM's drift confidence g in (0, 1) picks the top-rho fraction of each batch
   as drifting (hard mask m); a straight-through mask m_st = m - sg(g) + g mixes latents

     z_new = o (1 - m_st) + m_st r      (drifting items free, stationary ones at o)
     z_old = o m_st + (1 - m_st) r      (stationary items free but anchored, drifting at o)

   and L_D / L_S are the tokenizer objective (reconstruction + RQ loss + alpha InfoNCE(q, cf))
   on z_new / z_old, L_S with the anchor mse(z_old, o). Gradients of the losses through m_st
   are CDIM's only training signal: keeping an item whose latent wants to move in the
   stationary set costs anchor loss, so CDIM learns to rank such (drifting) items high.

Paper vs official code (github.com/HomesAmaranta/DACT), and what is implemented here:
- Differentiated update: the paper writes L_D over the drifting set and L_S over the
  stationary set; the code (followed here) sends every item of the batch through both paths by
  mixing latents with m_st, as above. In the forward pass a drifting item contributes its
  current latent to L_D and its old latent to L_S (and vice versa for stationary items).
- Anchor: mse(z_old, o), a mean over batch and latent dimensions (code); the paper writes
  ||r_i - o_i||^2 over stationary items. In the forward pass both are the same up to scale.
- Stability KL: KL(p_old || p_cur) over every item of the batch, level 1 only; p_cur from the
  current encoder latent r (not the mixed z) and the current level-1 codebook. The code divides
  the per-item KL by K (`F.kl_div(...).mean(-1)`), which makes lambda_g = 5 act like 5 / K;
  `kl_average_over_codes=True` reproduces that, False gives the paper's plain KL.
- Loss scales follow the tokenizer being fine-tuned (its `loss_reduction`, its InfoNCE
  temperature and similarity), so fine-tuning optimises the objective the tokenizer was trained
  with. The DACT configs use loss_reduction "mean", the official code's scale: mean-reduced
  MSE and the RQ loss averaged over levels, cosine InfoNCE at temperature 1.
- Schedule: AdamW, linear warm-up then linear decay to 0 (the code's
  `get_linear_schedule_with_warmup`), global-norm clipping at 1. The code warms up for 50 of
  5,000 epochs (1 %), hence `warmup_steps=50` for the paper's 5,000 steps. Batches are
  fixed-size random slices of a per-epoch permutation (`data.batching.item_batches`: the last
  partial batch of an epoch is dropped, which keeps one compiled step).
- Top-rho: k = max(1, floor(rho B)) items of each batch (code: `int(topk * B)`); ties go to
  the lower batch position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genrec_jax.data.batching import item_batches
from genrec_jax.tokenizers.quantizer import squared_distances, squared_error
from genrec_jax.tokenizers.rqvae import RQVAE, info_nce
from genrec_jax.training import loop
from genrec_jax.training.sharding import make_mesh, replicate
from genrec_jax.training.trainer import Trainer

MODES = ("naive", "dact", "reformer")


@dataclasses.dataclass(frozen=True)
class DACTConfig:
  """Hyperparameters of DACT's tokenizer fine-tuning (defaults: the official code).

  Attributes:
    rho: fraction of each batch selected as drifting (top-rho of g).
    tau: temperature of CDIM's attention over memory slots.
    num_slots: M, number of key / value memory slots.
    value_dim: size of a value slot (CDIM hidden size, 64).
    cdim_hidden: hidden width of CDIM's output MLP (value_dim -> cdim_hidden -> 1).
    stationary_weight: lambda_s, weight of the stationary-path loss L_S.
    anchor_weight: lambda_anchor, weight of mse(z_old, o) inside L_S.
    kl_weight: lambda_g, weight of the level-1 stability KL.
    kl_temperature: T of p(k|i) = softmax_k(-||r_i - e^1_k||^2 / T).
    kl_average_over_codes: divide the per-item KL by K as the official code does.
    confidence_weight: weight of mean(g^2), which keeps confidences from saturating. The
      official 1e-3 is relative to the official loss scale (mean-reduced MSE, alpha 0.02,
      cosine InfoNCE at temperature 1). Where the losses pull harder on g, g saturates near 1
      for every item (watch "mean_confidence") and the top-rho ranking carries no
      information: on the planted-drift test (alpha 1, InfoNCE temperature 0.1) 1e-3 leaves
      precision@|drifting| at chance, 1.0 gives about 0.7.
    cf_weight: alpha, weight of the collaborative InfoNCE on each path (and in naive FT).
    steps, batch_size, learning_rate, weight_decay, warmup_steps, grad_clip: optimisation
      (AdamW, linear warm-up then linear decay to 0, global-norm clipping).
    log_every: steps between progress log lines.
  """

  rho: float = 0.3
  tau: float = 0.1
  num_slots: int = 32
  value_dim: int = 64
  cdim_hidden: int = 32
  stationary_weight: float = 0.1
  anchor_weight: float = 1.0
  kl_weight: float = 5.0
  kl_temperature: float = 1.0
  kl_average_over_codes: bool = True
  confidence_weight: float = 1e-3
  cf_weight: float = 0.02
  steps: int = 5000
  batch_size: int = 1024
  learning_rate: float = 1e-4
  weight_decay: float = 1e-4
  warmup_steps: int = 50
  grad_clip: float = 1.0
  log_every: int = 500
  steps_per_dispatch: int = 1  # updates per compiled call (`loop.fit_steps`; same updates)


def _normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero), as torch's F.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CDIM(nnx.Module):
  """Collaborative Drift Identification Module: per-item drift confidence g in (0, 1).

  Query q = normalize([o * c, n * c, o - n]) [B, 3d] with o = normalize(old latent),
  n = normalize(sg(current latent)), c = normalize(CF embedding), all of size d. Attention
  over M memory keys a = softmax(q normalize(K)^T / tau) [B, M] reads h = a V [B, value_dim];
  g = sigmoid(MLP(LayerNorm(h))), MLP value_dim -> hidden -> GELU -> 1.

  Keys [M, 3d] start orthogonal (orthonormal rows when M <= 3d, else orthonormal columns),
  values [M, value_dim] Glorot-normal, as in the official code. GELU is the exact (erf) form,
  LayerNorm epsilon 1e-5 (PyTorch defaults).
  """

  def __init__(self, latent_dim: int, *, num_slots: int = 32, value_dim: int = 64,
               hidden_dim: int = 32, tau: float = 0.1, rngs: nnx.Rngs):
    if latent_dim < 1 or num_slots < 1 or value_dim < 1 or hidden_dim < 1 or tau <= 0:
      raise ValueError(f"CDIM needs positive sizes and tau; got latent_dim={latent_dim}, "
                       f"num_slots={num_slots}, value_dim={value_dim}, hidden_dim={hidden_dim},"
                       f" tau={tau}")
    self.latent_dim = latent_dim
    self.tau = tau
    self.keys = nnx.Param(nnx.initializers.orthogonal()(rngs.params(),
                                                        (num_slots, 3 * latent_dim)))
    self.values = nnx.Param(nnx.initializers.glorot_normal()(rngs.params(),
                                                             (num_slots, value_dim)))
    self.norm = nnx.LayerNorm(value_dim, epsilon=1e-5, rngs=rngs)
    self.hidden = nnx.Linear(value_dim, hidden_dim, rngs=rngs)
    self.out = nnx.Linear(hidden_dim, 1, rngs=rngs)

  @classmethod
  def from_config(cls, latent_dim: int, cfg: DACTConfig, *, rngs: nnx.Rngs) -> CDIM:
    """A fresh CDIM with the sizes and temperature of `cfg` (period t = 1)."""
    return cls(latent_dim, num_slots=cfg.num_slots, value_dim=cfg.value_dim,
               hidden_dim=cfg.cdim_hidden, tau=cfg.tau, rngs=rngs)

  def __call__(self, old_latent: jax.Array, latent: jax.Array, cf: jax.Array) -> jax.Array:
    """Drift confidence g [B] from old_latent, latent and cf, each [B, d]."""
    for name, value in (("old_latent", old_latent), ("latent", latent), ("cf", cf)):
      if value.ndim != 2 or value.shape[-1] != self.latent_dim:
        raise ValueError(f"CDIM expects {name} of shape [batch, {self.latent_dim}] (the latent "
                         f"size; CF embeddings must have the tokenizer's latent size), got "
                         f"{value.shape}")
    o = _normalize(old_latent)
    n = _normalize(jax.lax.stop_gradient(latent))
    c = _normalize(cf)
    query = _normalize(jnp.concatenate([o * c, n * c, o - n], axis=-1))
    attention = jax.nn.softmax(query @ _normalize(self.keys[...]).T / self.tau, axis=-1)
    h = self.norm(attention @ self.values[...])
    logit = self.out(jax.nn.gelu(self.hidden(h), approximate=False))
    return jax.nn.sigmoid(logit[:, 0])


def select_drifting(confidence: jax.Array, rho: float) -> tuple[jax.Array, jax.Array]:
  """Top-rho items of a batch by confidence g [B] -> (hard mask m [B], straight-through m_st).

  m is 1 for the k = max(1, floor(rho B)) most confident items; m_st = m - sg(g) + g equals m
  in value and has the gradient of g, so losses on the mixed latents reach CDIM.
  """
  batch = confidence.shape[0]
  k = max(1, int(rho * batch))
  _, top = jax.lax.top_k(confidence, k)
  hard = jnp.zeros_like(confidence).at[top].set(1.0)
  return hard, hard - jax.lax.stop_gradient(confidence) + confidence


def _tokenizer_objective(tokenizer: RQVAE, x: jax.Array, latent: jax.Array, cf: jax.Array,
                         cf_weight: float, forced_codes: jax.Array | None = None
                         ) -> dict[str, jax.Array]:
  """Reconstruction, RQ and collaborative losses of items x [B, D] quantized from latent [B, d]
  (rows of forced_codes [B, L] that are >= 0 quantize to those codes instead of the nearest).

  Returns scalars "recon", "quant", "cf" and "objective" = recon + quant + cf_weight * cf.
  """
  cfg = tokenizer.cfg
  quant = tokenizer.quantizer(latent, forced_codes=forced_codes)
  parts = {"recon": squared_error(x, tokenizer.decoder(quant.quantized), cfg.loss_reduction),
           "quant": quant.loss}
  parts["cf"] = (info_nce(quant.quantized, cf, cfg.cf_temperature, cfg.cf_similarity)
                 if cf_weight > 0 else jnp.zeros(()))
  parts["objective"] = parts["recon"] + parts["quant"] + cf_weight * parts["cf"]
  return parts


def level1_log_probs(tokenizer: RQVAE, latent: jax.Array, temperature: float) -> jax.Array:
  """log softmax_k(-||r - e^1_k||^2 / T) for latents r [B, d] -> [B, K]."""
  dist = squared_distances(latent, tokenizer.quantizer.codebooks[0])
  return jax.nn.log_softmax(-dist / temperature, axis=-1)


def stability_kl(old_log_probs: jax.Array, new_log_probs: jax.Array,
                 average_over_codes: bool) -> jax.Array:
  """mean_i KL(p_old(.|i) || p_cur(.|i)) over [B, K] log-probabilities (divided by K if set)."""
  per_item = jnp.sum(jnp.exp(old_log_probs) * (old_log_probs - new_log_probs), axis=-1)
  if average_over_codes:
    per_item = per_item / old_log_probs.shape[-1]
  return jnp.mean(per_item)


def dact_loss(tokenizer: RQVAE, cdim: CDIM, x: jax.Array, cf: jax.Array, old_latent: jax.Array,
              old_level1_log_probs: jax.Array, cfg: DACTConfig
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DACT's fine-tuning objective on one batch (see the module docstring).

  Args:
    tokenizer: the tokenizer being fine-tuned.
    cdim: the drift identification module trained with it.
    x: [B, D_in] item semantic vectors.
    cf: [B, d] current-period CF embeddings (d = the tokenizer's latent size).
    old_latent: [B, d] latents of the frozen period t-1 encoder.
    old_level1_log_probs: [B, K] teacher level-1 log-probabilities at `cfg.kl_temperature`.
    cfg: loss weights.

  Returns:
    total loss and its parts: "drifting" (L_D) with "recon/quant/cf_drifting", "stationary"
    (L_S, anchor included) with "recon/quant/cf_stationary" and "anchor", "kl", "confidence"
    (mean g^2), "mean_confidence" (mean g) and "total".
  """
  latent = tokenizer.encoder(x)
  confidence = cdim(old_latent, latent, cf)
  _, mask = select_drifting(confidence, cfg.rho)
  mask = mask[:, None]
  z_new = old_latent * (1.0 - mask) + mask * latent
  z_old = old_latent * mask + (1.0 - mask) * latent
  drifting = _tokenizer_objective(tokenizer, x, z_new, cf, cfg.cf_weight)
  stationary = _tokenizer_objective(tokenizer, x, z_old, cf, cfg.cf_weight)
  anchor = jnp.mean((z_old - old_latent) ** 2)
  kl = stability_kl(old_level1_log_probs,
                    level1_log_probs(tokenizer, latent, cfg.kl_temperature),
                    cfg.kl_average_over_codes)
  confidence_penalty = jnp.mean(confidence ** 2)
  loss_drifting = drifting["objective"]
  loss_stationary = stationary["objective"] + cfg.anchor_weight * anchor
  total = (loss_drifting + cfg.stationary_weight * loss_stationary + cfg.kl_weight * kl +
           cfg.confidence_weight * confidence_penalty)
  parts = {f"{name}_drifting": drifting[name] for name in ("recon", "quant", "cf")}
  parts.update({f"{name}_stationary": stationary[name] for name in ("recon", "quant", "cf")})
  parts.update(drifting=loss_drifting, stationary=loss_stationary, anchor=anchor, kl=kl,
               confidence=confidence_penalty, mean_confidence=jnp.mean(confidence),
               total=total)
  return total, parts


def naive_finetune_loss(tokenizer: RQVAE, x: jax.Array, cf: jax.Array | None, cfg: DACTConfig,
                        fixed_codes: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Plain tokenizer loss recon + RQ + alpha InfoNCE(q, cf) of naive fine-tuning and Reformer.

  Equals `rqvae_losses` of a tokenizer without diversity loss whose cf_weight is
  `cfg.cf_weight`; alpha is taken from `cfg` so that naive and DACT fine-tuning share it.
  x: [B, D_in]; cf: [B, d] (may be None when cfg.cf_weight is 0); fixed_codes: int [B, L],
  the held assignments of old items (Reformer), -1 for items quantized freely.
  """
  latent = tokenizer.encoder(x)
  parts = _tokenizer_objective(tokenizer, x, latent,
                               cf if cf is not None else jnp.zeros_like(latent), cfg.cf_weight,
                               fixed_codes)
  parts["total"] = parts.pop("objective")
  return parts["total"], parts


def _batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int = 4096) -> list:
  """fn applied to aligned row chunks of `arrays`; returns the list of outputs."""
  n = arrays[0].shape[0]
  return [fn(*(jnp.asarray(a[i:i + batch_size]) for a in arrays))
          for i in range(0, n, batch_size)]


def teacher_targets(tokenizer: RQVAE, features: np.ndarray, temperature: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Old latents o [N, d] and level-1 teacher log-probs [N, K] of the frozen tokenizer."""
  @nnx.jit
  def forward(model, x):
    latent = model.encoder(x)
    return latent, level1_log_probs(model, latent, temperature)

  outs = _batched(lambda x: forward(tokenizer, x), (np.asarray(features, np.float32),))
  return (np.concatenate([np.asarray(o[0]) for o in outs]),
          np.concatenate([np.asarray(o[1]) for o in outs]))


def drift_confidence(tokenizer: RQVAE, cdim: CDIM, features: np.ndarray, cf: np.ndarray,
                     old_latent: np.ndarray) -> np.ndarray:
  """CDIM's drift confidence g [N] of every item (analysis and tests; unused at inference).

  features [N, D_in] go through the current tokenizer's encoder; cf and old_latent are [N, d].
  """
  forward = nnx.jit(lambda tok, gate, x, c, o: gate(o, tok.encoder(x), c))
  outs = _batched(lambda x, c, o: forward(tokenizer, cdim, x, c, o),
                  (np.asarray(features, np.float32), np.asarray(cf, np.float32),
                   np.asarray(old_latent, np.float32)))
  return np.concatenate([np.asarray(g) for g in outs])


def _optimizer(cfg: DACTConfig) -> optax.GradientTransformation:
  """Clipping, then AdamW with linear warm-up to cfg.learning_rate and linear decay to 0."""
  warmup = min(max(cfg.warmup_steps, 1), cfg.steps)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup),
       optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.steps - warmup, 1))],
      [warmup])
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))


def finetune_tokenizer(tokenizer: RQVAE, features: np.ndarray, cf: np.ndarray | None,
                       cfg: DACTConfig, mode: str, cdim: CDIM | None = None, seed: int = 0,
                       fixed_codes: np.ndarray | None = None, mesh=None
                       ) -> tuple[RQVAE, CDIM | None, dict]:
  """Fine-tunes the period t-1 tokenizer on the N items of period t.

  The inputs are left untouched: a new tokenizer (and, in "dact" mode, a new CDIM) is
  returned, so the period t-1 tokenizer stays available as the frozen teacher and for the
  frozen-tokenizer baseline.

  Args:
    tokenizer: the period t-1 tokenizer.
    features: [N, D_in] semantic vectors of every item of period t (new items included).
    cf: [N, d] period-t CF embeddings, d = the tokenizer's latent size (None only in "naive"
      mode with cfg.cf_weight == 0).
    cfg: hyperparameters.
    mode: "naive" (plain tokenizer loss), "reformer" (the same loss with the old items held
      at their identifiers' codes, `fixed_codes`) or "dact" (`dact_loss`).
    cdim: the period t-1 CDIM to warm-start from (t > 1); None creates a fresh one (t = 1).
      Ignored and returned unchanged in the other modes.
    seed: seeds the fresh CDIM and the batch order.
    fixed_codes: "reformer" only: int [N, L], the codes each old item keeps (its identifier
      without the dedup digit), -1 rows for items new in period t.
    mesh: devices of the shared train step (`training.trainer.Trainer`; default: all).

  Returns:
    (fine-tuned tokenizer, trained CDIM or `cdim` in naive mode, stats) where stats holds
    "final_losses" (parts of the last batch), "seconds" (total), "steps_per_second" (after
    the first, compiling, step) and "steps" (`training.loop.fit_steps`).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  mesh = mesh or make_mesh()
  features = np.asarray(features, np.float32)
  n, latent_dim = features.shape[0], tokenizer.cfg.latent_dim
  if features.ndim != 2 or features.shape[1] != tokenizer.cfg.input_dim:
    raise ValueError(f"features must be [N, {tokenizer.cfg.input_dim}], got {features.shape}")
  if not np.isfinite(features).all():
    raise ValueError("tokenizer input features contain NaN or inf")
  needs_cf = mode == "dact" or cfg.cf_weight > 0
  if needs_cf and (cf is None or np.shape(cf) != (n, latent_dim)):
    raise ValueError(f"{mode} fine-tuning needs CF embeddings of shape [{n}, {latent_dim}] "
                     f"(the tokenizer's latent size), got {None if cf is None else np.shape(cf)}")
  if cfg.steps < 1:
    raise ValueError(f"steps must be >= 1, got {cfg.steps}")
  cf = np.zeros((n, latent_dim), np.float32) if cf is None else np.asarray(cf, np.float32)
  levels = tokenizer.cfg.num_levels
  if mode == "reformer":
    if fixed_codes is None or np.shape(fixed_codes) != (n, levels):
      raise ValueError(f"reformer fine-tuning needs fixed_codes of shape [{n}, {levels}], got "
                       f"{None if fixed_codes is None else np.shape(fixed_codes)}")
    fixed_codes = np.asarray(fixed_codes, np.int32)
  else:
    fixed_codes = np.full((n, levels), -1, np.int32)
  if mode == "dact":
    if cdim is None:
      cdim = CDIM.from_config(latent_dim, cfg, rngs=nnx.Rngs(seed))
    elif cdim.latent_dim != latent_dim:
      raise ValueError(f"warm-started CDIM has latent size {cdim.latent_dim}, the tokenizer "
                       f"{latent_dim}")
    old_latent, teacher = teacher_targets(tokenizer, features, cfg.kl_temperature)
    modules = (tokenizer, cdim)
  else:
    old_latent = teacher = np.zeros((n, 1), np.float32)  # placeholders, unused by the loss
    modules = (tokenizer,)
  names = ("x", "cf", "old_latent", "teacher", "fixed_codes")
  data = replicate(dict(zip(names, (jnp.asarray(a) for a in (features, cf, old_latent, teacher,
                                                              fixed_codes)))), mesh)

  def loss_fn(merged, batch, key, data):
    x, c, o, p_old, fixed = (data[name][batch["idx"]] for name in names)
    if mode == "dact":
      return dact_loss(merged[0], merged[1], x, c, o, p_old, cfg)
    return naive_finetune_loss(merged[0], x, c, cfg, fixed)

  trainer = Trainer(modules, loss_fn, _optimizer(cfg), mesh)

  def train_step(params, opt_state, batch, step):  # the losses draw no random numbers
    return trainer.item_update(params, opt_state, batch, step, None, data,
                               cfg.steps_per_dispatch)

  params, stats = loop.fit_steps(
      name=f"dact:{mode}", params=trainer.init_params,
      opt_state=trainer.init_opt_state(trainer.init_params), train_step=train_step,
      batches=item_batches(n, cfg.batch_size, seed), steps=cfg.steps, log_every=cfg.log_every,
      steps_per_dispatch=cfg.steps_per_dispatch)
  merged = trainer.merge(params)
  return merged[0], merged[1] if mode == "dact" else cdim, stats
