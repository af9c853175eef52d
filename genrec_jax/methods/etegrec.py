"""ETEGRec (Liu et al., 2025): item tokenizer and generative recommender trained end to end.

METHODS.md section 6; the paper (../shared/papers/etegrec.txt, eqs. 14-16 and section 3.4); a
reading of the official code with file references: experiments/etegrec_toys_cpu/
official_code_reading.md. Stages: data, SASRec (its item embeddings are the tokenizer's
input), the RQ-VAE pretrained on them, the joint stage (this module), the second stage.

The joint model (`ETEGRec`) holds three parameter groups of the shared `Trainer`: the
`tokenizer` (RQ-VAE), the `recommender` (T5 with the two adapters of the alignment losses) and
the `identifiers` (the item -> token map, int32, never trained: it sits in the model state so
that it is looked up inside the compiled step and saved with every checkpoint). The objective
(`etegrec_loss`) is L_REC + L_SQ + a * (mu L_SIA + lambda L_PSA), a = 0 during the alignment
warm-up; each epoch updates only its phase's group, so a recommender epoch minimises
L_REC + mu L_SIA + lambda L_PSA over the recommender and a tokenizer epoch L_SQ + mu L_SIA +
lambda L_PSA over the tokenizer (eq. 17-18): the other group gets no gradient and keeps its
optimizer state. Alternating cycles of C epochs start with a tokenizer epoch; after every
tokenizer epoch the identifiers are recomputed (`refresh_identifiers`), and an item whose codes
did not change keeps its dedup digit (the official code renumbers every digit each cycle and
fails above 256 collisions). Then the second stage: the tokenizer frozen, the recommender alone
on L_REC (lr 5e-4, cosine), as the official code.

Sequence-item alignment (SIA, eq. 15): the per-level code distributions of the target item's
CF embedding through the tokenizer, P_z, and of the pooled encoder state through the residual
quantizer, P_zE, are pulled together by a symmetric KL, KL(P_z || P_zE) + KL(P_zE || P_z),
summed over levels (the paper; the official code averages over levels: `level_reduction`).
The distributions are softmax(-||r - e||^2) at each level (the paper's eq. 6); the official code
uses softmax(+||r - e||^2), `logit_sign="code"`. Between levels the quantizer hands on the hard
residual without gradient (`ResidualQuantizer`, as the official code), so only level 1 sends
gradient into the pooled state and the tokenizer's encoder.

Preference-semantic alignment (PSA, eq. 16): symmetric InfoNCE, with cosine similarity at
temperature 0.07, between the tokenizer's reconstruction of the target and the decoder's start
state (both the CF size after the adapter); the two directions are summed, each averaged over
the rows taken part. Negatives are the other rows taken part: the official code keeps the first
row of each distinct target item of the batch (`first_occurrence`), so that an item is never
its own negative. L_SQ (reconstruction + quantization, means over dimensions and levels as the
official code) is taken over the same rows.

Differences from the official code kept as options (the paper's choice is the default): the SIA
sign and level reduction above; mu = 3e-4 (SIA) and lambda = 1e-4 (PSA) as the paper's best,
which the official config swaps (`etegrec.sia_weight`, `etegrec.psa_weight`). Differences not
kept: the T5 output logits are the decoder state times the tied table with T5's d_model^-0.5
rescale (the official code omits the rescale); the tables of the identifier positions are
ranges of one embedding table (`IdentifierTable.offsets`) with one softmax per position
(`grm.level_softmax`), which is the same function as separate tables.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from genrec_jax import stages
from genrec_jax.data.batching import bucketed_batches
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.tokenizers.identifiers import (IdentifierTable, Identifiers, refresh_identifiers,
                                               write_identifiers_csv)
from genrec_jax.tokenizers.rqvae import RQVAE
from genrec_jax.training.alignment import (first_occurrence, level_log_probs, masked_mean,
                                          symmetric_info_nce, symmetric_kl)
from genrec_jax.training.grm import (GRMTrainer, identifier_inputs, identifier_nll,
                                     target_tokens, weighted_mean)
from genrec_jax.training.optim import make_optimizer
from genrec_jax.training.sharding import replicate, sharded_training_batches
from genrec_jax.training.tokenizer import encode_items
from genrec_jax.training.trainer import Trainer

# --- The joint model -------------------------------------------------------------------------

TOKENIZER, RECOMMENDER, IDENTIFIERS = "tokenizer", "recommender", "identifiers"


class Recommender(nnx.Module):
  """ETEGRec's recommender group: the T5 and the adapters of the alignment losses, one Linear
  each as in the official code: `encoder_adapter` maps the pooled encoder state to the
  tokenizer's latent (z_E, SIA), `decoder_adapter` the decoder's start state to the CF size
  (h_D, PSA)."""

  def __init__(self, t5_cfg: T5Config, latent_dim: int, cf_dim: int, *, rngs: nnx.Rngs):
    self.t5 = T5(t5_cfg, rngs=rngs)
    self.encoder_adapter = nnx.Linear(t5_cfg.d_model, latent_dim, rngs=rngs)
    self.decoder_adapter = nnx.Linear(t5_cfg.d_model, cf_dim, rngs=rngs)


class ETEGRec(nnx.Module):
  """Tokenizer, recommender and the identifier map: the three groups of the joint stage."""

  def __init__(self, tokenizer: RQVAE, recommender: Recommender, item_tokens: np.ndarray):
    self.tokenizer = tokenizer
    self.recommender = recommender
    self.identifiers = Identifiers(jnp.asarray(item_tokens, jnp.int32))


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
  """Weights and forms of the joint objective (`etegrec_loss`)."""

  sia_weight: float = 3e-4  # mu (the paper's best; the official config: 1e-4)
  psa_weight: float = 1e-4  # lambda (the paper's best; the official config: 3e-4)
  temperature: float = 0.07  # PSA
  logit_sign: str = "distance"  # SIA distributions: "distance" (paper) | "code"
  level_reduction: str = "sum"  # SIA over levels: "sum" (paper) | "mean" (official code)
  rec_reduction: str = "mean"  # L_REC over target tokens (`identifier_nll`)
  level_sizes: tuple[int, ...] = ()  # one softmax per identifier position (per-level tables)


def semantic_quantization_loss(x: jax.Array, output, beta: float) -> jax.Array:
  """Per-row L_SQ [B] of tokenizer inputs x [B, D_in] and their `RQVAEOutput`: the squared
  reconstruction error and the RQ loss ||sg(v_l) - e_l||^2 + beta ||v_l - sg(e_l)||^2, each
  averaged over dimensions (and levels), as the official code's F.mse_loss terms."""
  v, e = output.quant.residuals, output.quant.codewords  # [B, L, d]
  recon = jnp.mean((x - output.reconstruction) ** 2, axis=-1)
  codebook = jnp.mean((jax.lax.stop_gradient(v) - e) ** 2, axis=(-2, -1))
  commitment = jnp.mean((v - jax.lax.stop_gradient(e)) ** 2, axis=(-2, -1))
  return recon + codebook + beta * commitment


def etegrec_loss(model: ETEGRec, batch: dict, key: jax.Array | None, context: dict,
                 cfg: AlignmentConfig) -> tuple[jax.Array, dict]:
  """L_REC + L_SQ + a (mu L_SIA + lambda L_PSA) of one batch (the module docstring).

  batch: `history` int32 [B, slots] and `target` int32 [B] item indices (-1 = padding /
  filler), `weight` float [B] (0 = filler row), `align` float [B] (a: 1 after the alignment
  warm-up, else 0; equal on every row); context: `cf` float [num_items, d_cf], the frozen
  SASRec item embeddings (the tokenizer's inputs). L_REC averages over real samples; L_SQ,
  SIA and PSA over the first row of each distinct target. Returns (loss, parts).
  """
  t5 = model.recommender.t5
  item_tokens = model.identifiers[...]
  targets, decoder_inputs = target_tokens(batch["target"], item_tokens)
  encoder_key, decoder_key = (None, None) if key is None else jax.random.split(key)
  encoded, mask = t5.encode(identifier_inputs(batch["history"], item_tokens), encoder_key)
  states = t5.decoder_states(encoded, mask, decoder_inputs, decoder_key)  # [B, D, d_model]
  nll = identifier_nll(t5.logits(states), targets, cfg.rec_reduction, cfg.level_sizes)
  rec = weighted_mean(nll, batch["weight"])

  rows = first_occurrence(jnp.where(batch["weight"] > 0, batch["target"], -1))
  x = context["cf"][jnp.maximum(batch["target"], 0)]
  out = model.tokenizer(x)
  sq = weighted_mean(semantic_quantization_loss(x, out, model.tokenizer.cfg.beta),
                     rows.astype(jnp.float32))
  quantizer = model.tokenizer.quantizer
  sequence = model.recommender.encoder_adapter(masked_mean(encoded, mask))  # z_E
  sia = symmetric_kl(level_log_probs(quantizer, out.latent, cfg.logit_sign),
                     level_log_probs(quantizer, sequence, cfg.logit_sign), rows,
                     cfg.level_reduction)
  preference = model.recommender.decoder_adapter(states[:, 0])  # h_D
  psa = symmetric_info_nce(out.reconstruction, preference, rows, cfg.temperature)
  align = jnp.max(batch["align"])
  total = rec + sq + align * (cfg.sia_weight * sia + cfg.psa_weight * psa)
  return total, {"rec": rec, "sq": sq, "sia": sia, "psa": psa}


def phase_groups(epoch: int, cycle: int, alternate: bool) -> tuple[str, ...]:
  """The groups an epoch trains: cycles of `cycle` epochs, one tokenizer epoch then
  cycle - 1 recommender epochs; both groups every epoch without alternation (w/o AT)."""
  if not alternate:
    return (TOKENIZER, RECOMMENDER)
  return (TOKENIZER,) if epoch % cycle == 0 else (RECOMMENDER,)


def epochs_training(group: str, epochs: int, cycle: int, alternate: bool) -> int:
  """How many of `epochs` epochs train `group` (its schedule's length)."""
  return sum(group in phase_groups(e, cycle, alternate) for e in range(epochs))


class JointStage:
  """The joint stage of one run: the model built from the pretrained tokenizer and its
  identifiers, the trainer of its three groups, and what the epoch loop calls (the phase of
  an epoch, the identifier refresh after a tokenizer epoch, validation). Also builds the
  recommender-only trainers of the second stage and of the w/o ETE ablation.

  Args:
    config: the run's config (`etegrec`, `grm`, `tokenizer` fields).
    tokenizer: the pretrained RQ-VAE (its weights start the joint stage).
    table: the pretrained tokenizer's identifiers, one per item (row i = item i).
    features: float [num_items, d_cf], the tokenizer's inputs (SASRec item embeddings).
    split: the leave-one-out split (its training samples).
    mesh: the device mesh.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: RQVAE,
               table: IdentifierTable, features: np.ndarray, split, mesh):
    e = self.settings = config.etegrec
    self.config, self.split, self.mesh = config, split, mesh
    self.num_items = split.num_items
    self.level_sizes, self.offsets = tuple(table.level_sizes), table.offsets
    self.features = features
    grm_cfg = stages.grm_train_config(config)
    self.grm_cfg = grm_cfg
    steps = len(bucketed_batches(split.train.lengths, grm_cfg.batch_size,
                                 grm_cfg.length_buckets, seed=config.seed,
                                 grouping=grm_cfg.batch_grouping))
    self.steps_per_epoch = steps
    model_cfg = stages.grm_model_config(config, table.vocab_size)
    recommender = Recommender(model_cfg, tokenizer.cfg.latent_dim, features.shape[1],
                              rngs=nnx.Rngs(config.seed))
    model = ETEGRec(tokenizer, recommender, table.item_tokens(self.num_items))
    alignment = AlignmentConfig(
        sia_weight=e.sia_weight, psa_weight=e.psa_weight, temperature=e.psa_temperature,
        logit_sign=e.sia_logit_sign, level_reduction=e.sia_level_reduction,
        rec_reduction=grm_cfg.loss_reduction, level_sizes=tuple(grm_cfg.level_softmax))

    def optimizer(group, learning_rate, warmup):
      updates = epochs_training(group, e.epochs, e.cycle, e.alternate) * steps
      return make_optimizer(learning_rate, e.weight_decay, warmup, e.grad_clip,
                            max(updates - warmup, 1))

    self.trainer = Trainer(
        model, functools.partial(etegrec_loss, cfg=alignment),
        {TOKENIZER: optimizer(TOKENIZER, e.tokenizer_lr, e.tokenizer_warmup_steps),
         RECOMMENDER: optimizer(RECOMMENDER, e.recommender_lr, e.recommender_warmup_steps),
         IDENTIFIERS: optax.set_to_zero()}, mesh)
    # The second stage: the recommender alone on L_REC from the joint stage's (official code).
    self.finetune = GRMTrainer(model_cfg, dataclasses.replace(
        grm_cfg, learning_rate=e.finetune_lr, weight_decay=e.weight_decay, warmup_steps=0,
        grad_clip=e.grad_clip, decay_steps=max(e.finetune_epochs * steps, 1),
        loop=stages.selection_loop(config, max(e.finetune_epochs, 1), 1, e.finetune_patience)),
        mesh, seed=config.seed)
    # w/o ETE: a fresh recommender on the final identifiers, with the joint stage's settings.
    self.retrain = GRMTrainer(model_cfg, dataclasses.replace(
        grm_cfg, learning_rate=e.recommender_lr, weight_decay=e.weight_decay,
        warmup_steps=e.recommender_warmup_steps, grad_clip=e.grad_clip,
        decay_steps=max(e.epochs * steps - e.recommender_warmup_steps, 1),
        loop=stages.selection_loop(config, e.epochs, e.eval_every, e.patience)),
        mesh, seed=config.seed + 1)

  def phase(self, epoch: int) -> tuple[str, ...]:
    return phase_groups(epoch, self.settings.cycle, self.settings.alternate)

  def table(self, params) -> IdentifierTable:
    """The identifier table held in the joint parameters (row i = item i)."""
    tokens = np.asarray(jax.device_get(jax.tree.leaves(params[IDENTIFIERS])[0]))
    return IdentifierTable(tokens - self.offsets[None, :], np.arange(self.num_items,
                                                                     dtype=np.int32),
                           self.level_sizes)

  @staticmethod
  def recommender_params(params) -> dict:
    """The T5 parameters of the joint parameters, as a `GRMTrainer` takes them."""
    return {"model": params[RECOMMENDER][RECOMMENDER]["t5"]}

  def refresh(self, epoch: int, params) -> tuple[dict, dict]:
    """After a tokenizer epoch: every item's codes from the updated tokenizer and its new
    identifier (`refresh_identifiers`), written into the parameters; other epochs: nothing."""
    if TOKENIZER not in self.phase(epoch):
      return params, {}
    codes = encode_items(self.trainer.merge(params).tokenizer, self.features)
    identifiers, stats = refresh_identifiers(codes, self.table(params).codes,
                                             self.config.tokenizer.dedup_size)
    tokens = jnp.asarray(identifiers + self.offsets[None, :], jnp.int32)
    params = dict(params)
    params[IDENTIFIERS] = replicate(jax.tree.map(lambda _: tokens, params[IDENTIFIERS]),
                                    self.mesh)
    logging.info("[etegrec] epoch %d identifiers: %.1f %% of items changed codes, collision "
                 "rate %.4f, max dedup digit %d", epoch + 1, 100 * stats["code_change"],
                 stats["collision_rate"], stats["max_dedup_digit"])
    return params, stats

  def epoch_batches(self, epoch: int):
    cfg = self.grm_cfg
    return sharded_training_batches(
        self.split.train, cfg.batch_size, cfg.length_buckets, self.mesh, seed=self.config.seed,
        epoch=epoch, grouping=cfg.batch_grouping, steps_per_dispatch=cfg.steps_per_dispatch,
        constants={"align": float(epoch >= self.settings.align_warmup_epochs)})

  def evaluate(self, params, samples, constrained: bool | None = None) -> dict:
    return self.finetune.evaluate(self.recommender_params(params), self.table(params),
                                  self.num_items, samples, constrained)

  def fit(self, selection, checkpoint_dir: str, interrupt_after_epoch: int | None = None):
    """The alternating (or joint) stage with model selection on `selection`; returns (best
    joint parameters, loop state)."""
    e = self.settings
    return self.trainer.fit(
        name="etegrec", epoch_batches=self.epoch_batches,
        evaluate=lambda p: self.evaluate(p, selection),
        loop_cfg=stages.selection_loop(self.config, e.epochs, e.eval_every, e.patience),
        checkpoint_dir=checkpoint_dir, context={"cf": jnp.asarray(self.features)},
        trainable=self.phase, after_epoch=self.refresh,
        interrupt_after_epoch=interrupt_after_epoch)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Data, SASRec, the pretrained tokenizer, the joint stage, the second stage (or w/o ETE's
  fresh recommender), tested with constrained and unconstrained beam search."""
  e = config.etegrec
  start = stages.joint_inputs(config, workdir)
  inter, split, results, timer = start.inter, start.split, start.results, start.timer
  selection = start.selection
  joint = JointStage(config, start.tokenizer, start.table, start.features, split, start.mesh)
  params, state = joint.fit(selection, os.path.join(workdir, "checkpoints", "joint"))
  final = joint.table(params)
  write_identifiers_csv(os.path.join(workdir, "identifiers.csv"), final, inter.item_ids)
  results["joint"] = {"history": state["history"], "best_epoch": state["best_epoch"] + 1,
                      "valid": joint.evaluate(params, selection),
                      "test": joint.evaluate(params, split.test)}
  timer.lap("joint")
  if not e.end_to_end:  # w/o ETE: a fresh recommender on the final identifiers
    recommender, rec_state = joint.retrain.train(
        final, split.num_items, split.train, selection,
        os.path.join(workdir, "checkpoints", "retrain"))
  elif e.finetune_epochs > 0:
    recommender, rec_state = joint.finetune.train(
        final, split.num_items, split.train, selection,
        os.path.join(workdir, "checkpoints", "finetune"), params=joint.recommender_params(params))
  else:
    recommender, rec_state = joint.recommender_params(params), None
  timer.lap("recommender")
  ranker = joint.finetune
  metrics = {"valid": ranker.evaluate(recommender, final, split.num_items, selection),
             "valid_users": len(selection)}
  for name, constrained in (("test_unconstrained", False), ("test_constrained", True)):
    metrics[name] = ranker.evaluate(recommender, final, split.num_items, split.test,
                                    constrained)
  metrics["test"] = metrics["test_constrained" if config.grm.constrained
                            else "test_unconstrained"]
  if rec_state is not None:
    results["recommender_history"] = rec_state["history"]
    metrics["best_epoch"] = rec_state["best_epoch"] + 1
  results["metrics"] = metrics
  timer.lap("grm_eval")
  logging.info("[etegrec] test %s", stages.fmt(metrics["test"]))
  return stages.finish(results, timer, workdir)
