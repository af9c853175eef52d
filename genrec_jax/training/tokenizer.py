"""Training of the RQ-VAE tokenizer and assignment of item identifiers.

Items are few (about 12k), so the tokenizer trains on random batches of the item set for a
length counted in `unit`s: "epochs" (passes over the items, N // batch_size batches each; the
TIGER paper and the LETTER / DACT code: 20k epochs) or "steps" (batches; the DACT paper's
20k steps). METHODS.md section 1: AdamW lr 1e-3, batch 1024, k-means init per level; optionally
fitted again after warm-up steps (`kmeans_refresh_steps`). A method adds its own loss terms
with a `TokenizerRegularizer` (LETTER's codeword diversity), whose non-trained inputs (codeword
groups) are recomputed from the model every epoch or every `refresh_steps` steps.
`selection="min_collision"` keeps the parameters with the lowest
collision rate among evaluations every `eval_every` units (the LETTER code's checkpoint rule);
"last" keeps the final ones (TIGER, DACT).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from genrec_jax.data.batching import item_batches
from genrec_jax.tokenizers.identifiers import (IdentifierTable, assign_dedup, collision_rate,
                                               one_to_one_table)
from genrec_jax.tokenizers.quantizer import code_usage
from genrec_jax.tokenizers.rqvae import RQVAE, RQVAEConfig, RQVAEOutput, rqvae_losses
from genrec_jax.training import loop
from genrec_jax.training.sharding import make_mesh, replicate
from genrec_jax.training.trainer import MODEL_GROUP, Trainer

UNITS = ("steps", "epochs")
SELECTIONS = ("last", "min_collision")


@dataclasses.dataclass(frozen=True)
class TokenizerTrainConfig:
  """Optimisation settings of the tokenizer.

  Attributes:
    length: training length, in `unit`s.
    unit: "steps" (batches) or "epochs" (N // batch_size batches each).
    batch_size, learning_rate, weight_decay: AdamW on random item batches.
    kmeans_iterations: Lloyd iterations of the per-level k-means initialisation.
    kmeans_refresh_steps: steps at which the k-means initialisation is fitted again.
    selection: "last" or "min_collision" (lowest collision rate among evaluations).
    eval_every: units between collision-rate evaluations for "min_collision".
    log_every: steps between progress lines.
    steps_per_dispatch: updates per compiled call (a `lax.scan` over stacked item batches; the
      same updates as one per call, for accelerators where a call costs more than a step).
    temperature_start, temperature_end: the quantizer's temperature, annealed linearly per
      unit (`temperature_at`): a soft tokenizer's softmax(-d / T) (UniGRec: 0.01 -> 0.001
      over the pretraining epochs); equal values keep it constant.
    warmup_units, linear_decay, grad_clip: the learning rate rises linearly over
      `warmup_units` units, then stays constant or (`linear_decay`) falls linearly to 0 at the
      end; global-norm clipping at grad_clip (0 = none). UniGRec's code: 50 epochs, linear,
      1.0.
  """

  length: int = 20000
  unit: str = "steps"
  batch_size: int = 1024
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  kmeans_iterations: int = 50
  kmeans_refresh_steps: tuple[int, ...] = ()
  selection: str = "last"
  eval_every: int = 2000
  log_every: int = 500
  steps_per_dispatch: int = 1  # updates per compiled call (`loop.fit_steps`)
  temperature_start: float = 1.0
  temperature_end: float = 1.0
  warmup_units: int = 0
  linear_decay: bool = False
  grad_clip: float = 0.0

  def steps_per_unit(self, num_items: int) -> int:
    """Batches in one unit: 1 for steps, N // batch_size for epochs (at least 1)."""
    return 1 if self.unit == "steps" else max(1, num_items // min(self.batch_size, num_items))

  def check(self) -> None:
    if self.unit not in UNITS:
      raise ValueError(f"tokenizer.train_unit must be one of {UNITS}, got {self.unit!r}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"tokenizer.selection must be one of {SELECTIONS}, got "
                       f"{self.selection!r}")
    if self.length < 1 or self.batch_size < 1:
      raise ValueError(f"tokenizer.train_length and batch_size must be >= 1, got "
                       f"{self.length}, {self.batch_size}")
    if min(self.temperature_start, self.temperature_end) <= 0:
      raise ValueError(f"tokenizer temperatures must be > 0, got {self.temperature_start}, "
                       f"{self.temperature_end}")
    if not 0 <= self.warmup_units < self.length or self.grad_clip < 0:
      raise ValueError(f"tokenizer.warmup_units must lie in [0, train_length) and grad_clip "
                       f"be >= 0, got {self.warmup_units}, {self.grad_clip}")
    if self.selection == "min_collision" and self.eval_every < 1:
      raise ValueError(f"tokenizer.eval_every must be >= 1 with selection 'min_collision', "
                       f"got {self.eval_every}")


def temperature_at(cfg: TokenizerTrainConfig, unit: int) -> float:
  """The temperature of training unit `unit` (0-based): start + (end - start) * unit / length,
  linear per unit as UniGRec's code (its last epoch runs just above the end value)."""
  return cfg.temperature_start + (cfg.temperature_end - cfg.temperature_start) * unit / cfg.length


def final_temperature(cfg: TokenizerTrainConfig) -> float:
  """The temperature of the last training unit: the one the identifiers are encoded at and a
  joint stage starts from (UniGRec)."""
  return temperature_at(cfg, cfg.length - 1)


def tokenizer_optimizer(cfg: TokenizerTrainConfig, per_unit: int) -> optax.GradientTransformation:
  """AdamW at cfg.learning_rate after `warmup_units` of linear warm-up, constant or decaying
  linearly to 0 at the last step, with optional global-norm clipping."""
  steps, warmup = cfg.length * per_unit, cfg.warmup_units * per_unit
  after = (optax.linear_schedule(cfg.learning_rate, 0.0, steps - warmup) if cfg.linear_decay
           else optax.constant_schedule(cfg.learning_rate))
  schedule = after if warmup == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])
  adamw = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw


class TokenizerRegularizer(Protocol):
  """A method's own tokenizer loss terms (LETTER's diversity: `genrec_jax.methods.letter`).

  `context(model, step)` computes the terms' non-trained inputs (a dict of device arrays) from
  the model on the host, at step 0 and then every `refresh_steps` steps (0 = every epoch);
  `loss(model, output, context, key)` returns (weighted term, parts) inside the train step.
  """

  refresh_steps: int

  def context(self, model: RQVAE, step: int) -> dict: ...

  def loss(self, model: RQVAE, output: RQVAEOutput, context: dict, key: jax.Array
           ) -> tuple[jax.Array, dict]: ...


def train_tokenizer(model_cfg: RQVAEConfig, cfg: TokenizerTrainConfig, features: np.ndarray,
                    cf: np.ndarray | None = None, seed: int = 0, mesh=None,
                    regularizer: TokenizerRegularizer | None = None) -> tuple[RQVAE, dict]:
  """Trains an RQ-VAE on item vectors features [N, D_in] (cf [N, d] for the collaborative
  term) with the shared train step (`training.trainer.Trainer`; `mesh` default: every
  device), plus a method's `regularizer` terms.

  Returns the selected model and a dict of training diagnostics (`loop.fit_steps`: final
  losses, steps, seconds, steps/s; with "min_collision" selection the evaluated collision rates,
  "collision_evaluations", and the chosen step).
  """
  cfg.check()
  features = np.asarray(features, np.float32)
  if not np.isfinite(features).all():
    raise ValueError("tokenizer input features contain NaN or inf")
  if features.shape[1] != model_cfg.input_dim:
    raise ValueError(f"tokenizer input_dim {model_cfg.input_dim} != feature size "
                     f"{features.shape[1]}")
  if model_cfg.cf_weight > 0:
    if cf is None or cf.shape != (features.shape[0], model_cfg.latent_dim):
      raise ValueError(f"collaborative regularization needs CF embeddings of shape "
                       f"[{features.shape[0]}, {model_cfg.latent_dim}] (latent_dim), got "
                       f"{None if cf is None else cf.shape}")
  n = features.shape[0]
  if n < model_cfg.codebook_size:
    raise ValueError(f"{n} items are fewer than the codebook size {model_cfg.codebook_size}")
  per_unit = cfg.steps_per_unit(n)
  steps = cfg.length * per_unit
  if any(not 0 < s < steps for s in cfg.kmeans_refresh_steps):
    raise ValueError(f"kmeans_refresh_steps must lie in (0, {steps}) (training steps), got "
                     f"{cfg.kmeans_refresh_steps}")
  key = jax.random.key(seed)
  model = RQVAE(model_cfg, rngs=nnx.Rngs(seed))
  x_all = jnp.asarray(features)
  model.quantizer.init_kmeans(model.encoder(x_all), jax.random.fold_in(key, 1),
                              iterations=cfg.kmeans_iterations)
  mesh = mesh or make_mesh()
  use_cf = model_cfg.cf_weight > 0

  def loss_fn(model, batch, step_key, context):
    idx = batch["idx"]
    extra = None if regularizer is None else (
        lambda m, out: regularizer.loss(m, out, context["regularizer"], step_key))
    return rqvae_losses(model, context["x"][idx], context["cf"][idx] if use_cf else None, extra,
                        temperature=context["temperature"])

  trainer = Trainer(model, loss_fn, tokenizer_optimizer(cfg, per_unit), mesh)
  context = replicate({"x": x_all, "cf": jnp.asarray(cf if use_cf else np.zeros((n, 1)),
                                                     jnp.float32),
                       "temperature": jnp.float32(temperature_at(cfg, 0))}, mesh)
  refresh_every = (regularizer.refresh_steps if regularizer else 0) or max(
      1, n // min(cfg.batch_size, n))
  annealed = cfg.temperature_start != cfg.temperature_end

  def before_step(i, params):
    if i in cfg.kmeans_refresh_steps:
      # The first updates move the encoder away from the latents the codebooks were fitted to,
      # and most level-1 codes die; fitting them again once the encoder has moved keeps them.
      model = trainer.merge(params)
      model.quantizer.init_kmeans(model.encoder(x_all), jax.random.fold_in(key, 3 + i),
                                  iterations=cfg.kmeans_iterations)
      params = replicate({MODEL_GROUP: nnx.state(model)}, mesh)
    if regularizer is not None and i % refresh_every == 0:
      context["regularizer"] = replicate(regularizer.context(trainer.merge(params), i), mesh)
    if annealed and i % per_unit == 0:
      context["temperature"] = replicate(jnp.float32(temperature_at(cfg, i // per_unit)), mesh)
    return params

  def refresh_at(i):
    return (i in cfg.kmeans_refresh_steps or (regularizer is not None and i % refresh_every == 0)
            or (annealed and i % per_unit == 0))

  def train_step(params, opt_state, batch, i):
    return trainer.item_update(params, opt_state, batch, STEP_KEY_OFFSET + i, key, context,
                               cfg.steps_per_dispatch)

  def collision(params):
    return {"collision_rate": collision_rate(encode_items(
        trainer.merge(params), features, float(context["temperature"])))}

  select = cfg.selection == "min_collision"
  params, stats = loop.fit_steps(
      name="tokenizer", params=trainer.init_params,
      opt_state=trainer.init_opt_state(trainer.init_params), train_step=train_step,
      batches=item_batches(n, cfg.batch_size, seed), steps=steps, log_every=cfg.log_every,
      before_step=before_step, evaluate=collision if select else None,
      eval_every=cfg.eval_every * per_unit, select_metric="collision_rate",
      steps_per_dispatch=cfg.steps_per_dispatch, refresh_at=refresh_at)
  if select:
    stats["collision_evaluations"] = stats.pop("evaluations")
  return trainer.merge(params), stats


STEP_KEY_OFFSET = 10_000_000  # step i's key is fold_in(key, STEP_KEY_OFFSET + i)


@nnx.jit
def _encode(model: RQVAE, x: jax.Array, temperature: jax.Array) -> jax.Array:
  return model.encode(x, temperature)


def encode_items(model: RQVAE, features: np.ndarray, temperature: float = 1.0,
                 batch_size: int = 4096) -> np.ndarray:
  """Codes int32 [N, L] of every item (argmin assignment; a soft tokenizer's at
  `temperature`)."""
  t = jnp.float32(temperature)
  return np.concatenate([np.asarray(_encode(model, jnp.asarray(features[i:i + batch_size]), t))
                         for i in range(0, len(features), batch_size)])


def assign_identifiers(model: RQVAE, features: np.ndarray, dedup_size: int,
                       temperature: float = 1.0) -> tuple[IdentifierTable, dict]:
  """One unique identifier per item plus diagnostics (`identifiers_from_codes`) from the
  tokenizer's codes of every item (a soft tokenizer's at `temperature`)."""
  table, stats = identifiers_from_codes(encode_items(model, features, temperature),
                                        model.cfg.codebook_size, dedup_size)
  if model.cfg.soft:
    stats["temperature"] = temperature  # the soft tokenizer's, the identifiers' encoding
  return table, stats


def identifiers_from_codes(codes: np.ndarray, codebook_size: int, dedup_size: int
                           ) -> tuple[IdentifierTable, dict]:
  """The identifier table of codes int [N, L] (a dedup digit appended) and its diagnostics
  (usage, perplexity, collisions). When more items share one code sequence than `dedup_size`
  digits tell apart, the dedup vocabulary grows to the largest group (with a warning) instead
  of stopping the run."""
  largest = int(np.unique(codes, axis=0, return_counts=True)[1].max())
  if largest > dedup_size:
    logging.warning("[tokenizer] %d items share one code sequence, more than tokenizer."
                    "dedup_size=%d: the dedup vocabulary grows to %d", largest, dedup_size,
                    largest)
    dedup_size = largest
  table = one_to_one_table(assign_dedup(codes, dedup_size), codebook_size, dedup_size)
  usage = code_usage(codes, codebook_size)
  stats = {"collision_rate": collision_rate(codes),
           "max_dedup_digit": int(table.codes[:, -1].max()),
           "code_usage": usage["usage"], "code_perplexity": usage["perplexity"],
           "duplicates": table.duplicates()}
  logging.info("[tokenizer] identifiers: collision rate %.4f, max dedup %d, perplexity %s",
               stats["collision_rate"], stats["max_dedup_digit"],
               [round(p, 1) for p in usage["perplexity"]])
  return table, stats
