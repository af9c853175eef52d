"""UniGRec: soft identifiers trained end to end with the generative recommender.

METHODS.md section 7; the abstract (../shared/papers/unigrec_abstract.txt); a reading of the
official code with file references: experiments/unigrec_toys_cpu/official_code_reading.md.
Stages: data, SASRec (the frozen collaborative teacher), the soft tokenizer pretrained on the
item texts, the joint stage (this module), the second stage.

**Soft tokenizer** (`RQVAE` with `tokenizer.soft`, `ResidualQuantizer(soft=True)`): at each
level p_l = softmax(-||v_l - e^l_k||^2 / T), soft code q_l = p_l E_l, next residual
v_{l+1} = v_l - q_l (not detached), reconstruction from sum_l q_l; no VQ or commitment loss;
the hard code is argmax p_l along those residuals. Pretraining minimises the reconstruction
(mean squared error) plus 1e-4 x the codeword uniformity (`rqvae.codeword_uniformity`, the
negative entropy of the batch's average p_l, one term per level summed; the official code
averages the levels: `tokenizer.uniformity_reduction="mean"`), with T annealed linearly per
epoch from 0.01 to 0.001 (`training.tokenizer.temperature_at`), AdamW 1e-3 with 50 warm-up
epochs and linear decay, clipping 1.0 (the official script).

**Joint stage** (`UniGRec`, three groups of the shared `Trainer`): the `tokenizer`, the
`recommender` (T5 plus the distillation adapters) and the `assignment`, the non-trained
state: the identifier map (hard codes + dedup digit, the decoder's targets) and the soft
tokenizer's temperature. Every history item enters the encoder as its L soft identifier
positions, p_l times level l's token rows (`grm.soft_identifier_inputs`), so the
recommendation loss reaches the tokenizer's encoder and codebooks; the decoder predicts the
target's hard identifier. Objective (`unigrec_loss`, the official weights):

  0.5 L_recon + L_rec + a (0.01 L_token + 0.1 L_repr),   a = 0 for the first 10 epochs,

- L_recon: the mean of the soft reconstruction errors of the history items and of the targets
  (the official code's average; its history term also counts the zero padding rows, ours only
  real items);
- L_token (token-level distillation): symmetric KL, over the first row of each distinct
  target, between the per-level code distributions of the pooled encoder state (masked mean,
  `sequence_adapter` MLP to the latent size) and of the teacher's target embedding
  (`teacher_adapter` MLP), both through the tokenizer's quantizer with hard residuals,
  softmax(-d) (the official code takes softmax(+d): `unigrec.distill_logit_sign="code"`),
  averaged over levels as the official code (`distill_level_reduction="sum"` sums);
- L_repr (representation-level distillation): symmetric InfoNCE (cosine, tau 0.07, the two
  directions summed) between the decoder's start state (`decoder_adapter`, a Linear to the
  teacher's size) and the teacher's target embedding, over the same rows.

Both groups update in every step (two AdamW: T5 lr 5e-3, tokenizer 2e-7, weight decay 0.05,
linear warm-up over 10 % of the budget then constant, clipping 1.0). After every epoch the
identifiers are recomputed from the tokenizer; an item whose codes did not change keeps its
dedup digit, and when more items share one code sequence than the dedup vocabulary holds the
previous identifiers are kept for that epoch (`refresh_identifiers`; the official code stops
with an error above 100). Early stopping on validation NDCG@10. Then the second stage: the
tokenizer frozen, no distillation, the recommender alone (AdamW 4e-4 constant, up to 100
epochs), the encoder still reading soft identifiers.

**Temperature in the joint stage.** The official code keeps the pretraining's last temperature
(about 1e-3) fixed through the joint stage, the second stage and inference (the default);
`unigrec.joint_temperature_end` > 0 anneals on, linearly from there to that value over the
joint epochs. The refresh after epoch e encodes the identifiers at epoch e + 1's temperature
and stores both in the model state, so the validation after epoch e, the checkpoint and the
next epoch use that pair (the history's `temperature` of epoch e is T(e + 1)).

The paper (an abstract here) does not say how the token-level KL reduces its levels: the
official code's mean is the default (`unigrec.distill_level_reduction="sum"` sums, as
ETEGRec's paper does for its SIA).

Differences from the official code that are not options:
- the distillation adapters are trained with the recommender (the official code leaves them
  out of every optimizer, at their random initialisation);
- the pooled encoder state is a masked mean over real positions (the official mask indexing
  zeroes the last two rows of each batch and keeps padding);
- gradient clipping is per parameter group (the official code clips one global norm over the
  tokenizer and the T5, which the tokenizer's 1/T-scaled gradients dominate);
- an item whose codes did not change keeps its dedup digit at a refresh (the official code
  renumbers every group in item order each epoch);
- pretraining keeps its last parameters (the official code keeps the lowest training loss
  among checkpoints every 50 epochs), and its k-means initialisation fits all items' latents
  level by level with hard residuals (the official code: the first batch of 1,024, soft
  residuals at T = 0.01);
- no uniformity term in the joint stage (the official code computes one with weight 0);
- every encoder position of an item is one of its L code levels, with no dedup position (as
  the official code);
- the dedup vocabulary grows instead of failing when the pretrained tokenizer collides more
  than `tokenizer.dedup_size` items.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

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
from genrec_jax.tokenizers.quantizer import code_usage
from genrec_jax.tokenizers.rqvae import MLP, RQVAE
from genrec_jax.training.alignment import (first_occurrence, level_log_probs, masked_mean,
                                          symmetric_info_nce, symmetric_kl)
from genrec_jax.training.grm import (beam_rank, device_trie, identifier_nll, beam_metrics,
                                     ranking_options, rank_samples, soft_identifier_inputs,
                                     target_tokens, weighted_mean)
from genrec_jax.training.optim import make_optimizer
from genrec_jax.training.sharding import replicate, sharded_training_batches
from genrec_jax.training.tokenizer import encode_items, final_temperature
from genrec_jax.training.trainer import Trainer

TOKENIZER, RECOMMENDER, ASSIGNMENT = "tokenizer", "recommender", "assignment"


def halving_dims(d_in: int, d_out: int) -> tuple[int, ...]:
  """Layer sizes of an adapter MLP from d_in to d_out, halving while above d_out (the official
  adapters: 128-64-32 and 256-128-64-32)."""
  dims = [d_in]
  while dims[-1] // 2 > d_out:
    dims.append(dims[-1] // 2)
  return tuple(dims) + (d_out,)


class Recommender(nnx.Module):
  """The T5 and the distillation adapters: `sequence_adapter` (pooled encoder state -> the
  tokenizer's latent), `teacher_adapter` (teacher embedding -> latent), `decoder_adapter`
  (decoder start state -> the teacher's size)."""

  def __init__(self, t5_cfg: T5Config, latent_dim: int, teacher_dim: int, *, rngs: nnx.Rngs):
    self.t5 = T5(t5_cfg, rngs=rngs)
    self.sequence_adapter = MLP(halving_dims(t5_cfg.d_model, latent_dim), rngs)
    self.teacher_adapter = MLP(halving_dims(teacher_dim, latent_dim), rngs)
    self.decoder_adapter = nnx.Linear(t5_cfg.d_model, teacher_dim, rngs=rngs)


class Temperature(nnx.Variable):
  """The soft tokenizer's temperature in a model's state (float32 scalar), never trained."""


class Assignment(nnx.Module):
  """The joint model's non-trained state: the identifier map int32 [num_items, D] (GRM tokens)
  and the temperature the soft identifiers are computed at."""

  def __init__(self, item_tokens: np.ndarray, temperature: float):
    self.tokens = Identifiers(jnp.asarray(item_tokens, jnp.int32))
    self.temperature = Temperature(jnp.float32(temperature))


class UniGRec(nnx.Module):
  """Soft tokenizer, recommender and assignment: the three groups of the joint stage."""

  def __init__(self, tokenizer: RQVAE, recommender: Recommender, item_tokens: np.ndarray,
               temperature: float):
    self.tokenizer = tokenizer
    self.recommender = recommender
    self.assignment = Assignment(item_tokens, temperature)

  def encode_history(self, history: jax.Array, features: jax.Array, offsets: tuple[int, ...],
                     key: jax.Array | None = None):
    """Encoder states of histories int [B, H] (-1 = padding) read as soft identifiers.

    features: float [num_items, D_in], the tokenizer's inputs. Returns (states
    [B, H * L, d_model], mask bool [B, H * L], the items' tokenizer inputs [B * H, D_in] and
    their `RQVAEOutput`)."""
    b, h = history.shape
    x = features[jnp.maximum(history, 0)].reshape(b * h, -1)
    out = self.tokenizer(x, temperature=self.assignment.temperature[...])
    probs = jnp.exp(out.quant.log_probs).reshape(b, h, *out.quant.log_probs.shape[1:])
    t5 = self.recommender.t5
    vectors, mask = soft_identifier_inputs(t5, probs, history, offsets)
    encoded, mask = t5.encode(None, key, embeddings=vectors, mask=mask)
    return encoded, mask, x, out


@dataclasses.dataclass(frozen=True)
class JointConfig:
  """Weights and forms of the joint objective (`unigrec_loss`)."""

  recon_weight: float = 0.5
  token_weight: float = 0.01
  representation_weight: float = 0.1
  temperature: float = 0.07  # InfoNCE
  logit_sign: str = "distance"  # token-level KL: softmax(-d) | "code": softmax(+d)
  level_reduction: str = "mean"  # token-level KL over levels: "mean" (official) | "sum"
  rec_reduction: str = "mean"  # L_rec over target tokens (`identifier_nll`)
  level_sizes: tuple[int, ...] = ()  # one softmax per identifier position (grm.level_softmax)
  code_offsets: tuple[int, ...] = ()  # GRM token of code 0 at each code level


def row_mse(x: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Squared reconstruction error per row [B], averaged over dimensions (F.mse_loss)."""
  return jnp.mean((x - reconstruction) ** 2, axis=-1)


def unigrec_loss(model: UniGRec, batch: dict, key: jax.Array | None, context: dict,
                 cfg: JointConfig) -> tuple[jax.Array, dict]:
  """recon_weight L_recon + L_rec + a (token_weight L_token + representation_weight L_repr)
  of one batch (the module docstring); a term whose weight is 0 is not computed.

  batch: `history` int32 [B, slots] and `target` int32 [B] item indices (-1 = padding /
  filler), `weight` float [B] (0 = filler row), `distill` float [B] (a: 1 after the
  distillation warm-up, else 0; equal on every row); context: `features` float
  [num_items, D_in] (the tokenizer's inputs) and `teacher` float [num_items, d_t] (the frozen
  SASRec item embeddings). Returns (loss, parts).
  """
  encoder_key, decoder_key = (None, None) if key is None else jax.random.split(key)
  encoded, mask, x_history, out_history = model.encode_history(
      batch["history"], context["features"], cfg.code_offsets, encoder_key)
  t5 = model.recommender.t5
  targets, decoder_inputs = target_tokens(batch["target"], model.assignment.tokens[...])
  states = t5.decoder_states(encoded, mask, decoder_inputs, decoder_key)  # [B, D, d_model]
  nll = identifier_nll(t5.logits(states), targets, cfg.rec_reduction, cfg.level_sizes)
  parts = {"rec": weighted_mean(nll, batch["weight"])}
  total = parts["rec"]
  target = jnp.maximum(batch["target"], 0)
  if cfg.recon_weight > 0:
    x_target = context["features"][target]
    out_target = model.tokenizer(x_target, temperature=model.assignment.temperature[...])
    real_history = ((batch["history"] >= 0) & (batch["weight"] > 0)[:, None]).reshape(-1)
    real_history = real_history.astype(jnp.float32)
    parts["recon"] = 0.5 * (
        weighted_mean(row_mse(x_history, out_history.reconstruction), real_history)
        + weighted_mean(row_mse(x_target, out_target.reconstruction), batch["weight"]))
    total += cfg.recon_weight * parts["recon"]
  rows = first_occurrence(jnp.where(batch["weight"] > 0, batch["target"], -1))
  teacher = context["teacher"][target]
  distill = jnp.max(batch["distill"])
  recommender = model.recommender
  if cfg.token_weight > 0:
    quantizer = model.tokenizer.quantizer
    student = recommender.sequence_adapter(masked_mean(encoded, mask))
    parts["token_kl"] = symmetric_kl(
        level_log_probs(quantizer, recommender.teacher_adapter(teacher), cfg.logit_sign),
        level_log_probs(quantizer, student, cfg.logit_sign), rows, cfg.level_reduction)
    total += distill * cfg.token_weight * parts["token_kl"]
  if cfg.representation_weight > 0:
    parts["repr_nce"] = symmetric_info_nce(recommender.decoder_adapter(states[:, 0]), teacher,
                                           rows, cfg.temperature)
    total += distill * cfg.representation_weight * parts["repr_nce"]
  return total, parts


def joint_temperature(start: float, end: float, epoch: int, epochs: int) -> float:
  """The temperature of joint epoch `epoch`: `start` (the pretraining's last) throughout when
  end is 0 (official code), else linear from start to end over the epochs."""
  return start if end == 0 else start + (end - start) * epoch / epochs


class JointStage:
  """The joint stage of one run and its second stage: the model built from the pretrained
  soft tokenizer and its identifiers, the trainers, the per-epoch identifier refresh and the
  evaluation with soft history inputs.

  Args:
    config: the run's config (`unigrec`, `grm`, `tokenizer` fields).
    tokenizer: the pretrained soft RQ-VAE.
    table: its identifiers, one per item (row i = item i).
    features: float [num_items, D_in], the tokenizer's inputs (item text vectors).
    teacher: float [num_items, d_t], the SASRec teacher's item embeddings.
    split: the leave-one-out split.
    mesh: the device mesh.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: RQVAE,
               table: IdentifierTable, features: np.ndarray, teacher: np.ndarray, split, mesh):
    u = self.settings = config.unigrec
    self.config, self.split, self.mesh = config, split, mesh
    self.num_items = split.num_items
    self.level_sizes, self.offsets = tuple(table.level_sizes), table.offsets
    self.features = features
    self.start_temperature = final_temperature(stages.tokenizer_train_config(config))
    self.grm_cfg = grm_cfg = stages.grm_train_config(config)
    steps = len(bucketed_batches(split.train.lengths, grm_cfg.batch_size,
                                 grm_cfg.length_buckets, seed=config.seed,
                                 grouping=grm_cfg.batch_grouping))
    model_cfg = stages.grm_model_config(config, table.vocab_size)
    recommender = Recommender(model_cfg, tokenizer.cfg.latent_dim, teacher.shape[1],
                              rngs=nnx.Rngs(config.seed))
    model = UniGRec(tokenizer, recommender, table.item_tokens(self.num_items),
                    self.temperature(0))
    self.objective = JointConfig(
        recon_weight=u.recon_weight, token_weight=u.token_weight,
        representation_weight=u.representation_weight, temperature=u.distill_temperature,
        logit_sign=u.distill_logit_sign, level_reduction=u.distill_level_reduction,
        rec_reduction=grm_cfg.loss_reduction,
        level_sizes=self.level_sizes if grm_cfg.level_softmax else (),
        code_offsets=tuple(int(o) for o in table.offsets[:-1]))
    warmup = int(u.warmup_fraction * u.epochs * steps)
    self.trainer = Trainer(
        model, functools.partial(unigrec_loss, cfg=self.objective),
        {TOKENIZER: make_optimizer(u.tokenizer_lr, u.weight_decay, warmup, u.grad_clip),
         RECOMMENDER: make_optimizer(u.recommender_lr, u.weight_decay, warmup, u.grad_clip),
         ASSIGNMENT: optax.set_to_zero()}, mesh)
    self.context = {"features": jnp.asarray(features, jnp.float32),
                    "teacher": jnp.asarray(teacher, jnp.float32)}
    self._features = replicate(self.context["features"], mesh)
    self._rank = jax.jit(self._rank_batch, static_argnames=(
        "offsets", "level_sizes", "beam_size", "constrained", "level_softmax"))

  def temperature(self, epoch: int) -> float:
    return joint_temperature(self.start_temperature, self.settings.joint_temperature_end, epoch,
                             self.settings.epochs)

  def table(self, params) -> IdentifierTable:
    """The identifier table held in the parameters (row i = item i)."""
    tokens = np.asarray(jax.device_get(params[ASSIGNMENT][ASSIGNMENT]["tokens"][...]))
    return IdentifierTable(tokens - self.offsets[None, :],
                           np.arange(self.num_items, dtype=np.int32), self.level_sizes)

  def refresh(self, epoch: int, params) -> tuple[dict, dict]:
    """After every joint epoch: the next epoch's temperature, every item's codes from the
    tokenizer at it and the new identifiers (`refresh_identifiers`), written into the
    parameters; returns them with the identifier statistics (code change, collision rate
    before the dedup digit, codeword usage and perplexity per level)."""
    temperature = self.temperature(epoch + 1)
    model = self.trainer.merge(params)
    codes = encode_items(model.tokenizer, self.features, temperature)
    identifiers, stats = refresh_identifiers(codes, self.table(params).codes,
                                             self.level_sizes[-1])
    usage = code_usage(codes, self.level_sizes[0])
    stats.update(code_usage=usage["usage"], code_perplexity=usage["perplexity"],
                 temperature=temperature)
    model.assignment.tokens[...] = jnp.asarray(identifiers + self.offsets[None, :], jnp.int32)
    model.assignment.temperature[...] = jnp.float32(temperature)
    params = {**params, ASSIGNMENT: replicate(
        nnx.state(model, lambda path, _: path[0] == ASSIGNMENT), self.mesh)}
    logging.info("[unigrec] epoch %d identifiers: %.1f %% of items changed codes, collision "
                 "rate %.4f, perplexity %s, T %.3g", epoch + 1, 100 * stats["code_change"],
                 stats["collision_rate"], [round(p, 1) for p in usage["perplexity"]],
                 temperature)
    return params, stats

  def epoch_batches(self, epoch: int, distill: bool = True):
    cfg = self.grm_cfg
    on = distill and epoch >= self.settings.warmup_epochs
    return sharded_training_batches(
        self.split.train, cfg.batch_size, cfg.length_buckets, self.mesh, seed=self.config.seed,
        epoch=epoch, grouping=cfg.batch_grouping, steps_per_dispatch=cfg.steps_per_dispatch,
        constants={"distill": float(on)})

  def _rank_batch(self, params, history, features, trie, **static):
    model = self.trainer.merge(params)
    encoded, mask, _, _ = model.encode_history(history, features,
                                               tuple(static["offsets"][:-1]))
    return beam_rank(model.recommender.t5, encoded, mask, trie, **static)

  def evaluate(self, params, samples, constrained: bool | None = None) -> dict:
    """Recall/NDCG@{5,10,20} of beam search with soft history inputs (`constrained` default:
    grm.constrained; False = the paper's free beams, an invalid identifier a miss)."""
    t0 = time.time()
    table = self.table(params)
    static = ranking_options(table, self.grm_cfg, constrained=constrained)
    trie = device_trie(table, self.num_items, self.mesh)
    ranked = rank_samples(
        lambda history: self._rank(params, history, self._features, trie, **static)[0],
        samples, self.grm_cfg.eval_batch_size, self.grm_cfg.length_buckets,
        static["beam_size"], self.mesh)
    return beam_metrics(ranked, samples, time.time() - t0)

  def fit(self, selection, checkpoint_dir: str, interrupt_after_epoch: int | None = None):
    """The joint stage with model selection on `selection`: (best parameters, loop state)."""
    u = self.settings
    return self.trainer.fit(
        name="unigrec", epoch_batches=self.epoch_batches,
        evaluate=lambda p: self.evaluate(p, selection),
        loop_cfg=stages.selection_loop(self.config, u.epochs, u.eval_every, u.patience),
        checkpoint_dir=checkpoint_dir, context=self.context,
        trainable=(TOKENIZER, RECOMMENDER), after_epoch=self.refresh,
        interrupt_after_epoch=interrupt_after_epoch)

  def finetune(self, params, selection, checkpoint_dir: str,
               interrupt_after_epoch: int | None = None):
    """The second stage from the joint parameters: the recommender alone on L_rec (tokenizer,
    identifiers and temperature fixed, no distillation), AdamW at unigrec.finetune_lr,
    constant; (best parameters, loop state)."""
    u = self.settings
    objective = dataclasses.replace(self.objective, recon_weight=0.0, token_weight=0.0,
                                    representation_weight=0.0)
    trainer = Trainer(self.trainer.merge(params), functools.partial(unigrec_loss, cfg=objective),
                      {TOKENIZER: optax.set_to_zero(),
                       RECOMMENDER: make_optimizer(u.finetune_lr, u.weight_decay, 0, u.grad_clip),
                       ASSIGNMENT: optax.set_to_zero()}, self.mesh)
    return trainer.fit(
        name="unigrec_finetune", epoch_batches=functools.partial(self.epoch_batches,
                                                                 distill=False),
        evaluate=lambda p: self.evaluate(p, selection),
        loop_cfg=stages.selection_loop(self.config, u.finetune_epochs, 1, u.finetune_patience),
        checkpoint_dir=checkpoint_dir, context=self.context, trainable=(RECOMMENDER,),
        interrupt_after_epoch=interrupt_after_epoch)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Data, the SASRec teacher, the soft tokenizer, the joint stage, the second stage, tested
  with unconstrained (the paper's protocol) and trie-constrained beam search."""
  start = stages.joint_inputs(config, workdir)  # the SASRec embeddings are the teacher
  inter, split, results, timer = start.inter, start.split, start.results, start.timer
  selection = start.selection
  joint = JointStage(config, start.tokenizer, start.table, start.features, start.cf, split,
                     start.mesh)
  params, state = joint.fit(selection, os.path.join(workdir, "checkpoints", "joint"))
  results["joint"] = {"history": state["history"], "best_epoch": state["best_epoch"] + 1,
                      "valid": joint.evaluate(params, selection),
                      "test": joint.evaluate(params, split.test)}
  timer.lap("joint")
  metrics = {}
  if config.unigrec.finetune_epochs > 0:
    params, rec_state = joint.finetune(params, selection,
                                       os.path.join(workdir, "checkpoints", "finetune"))
    results["finetune_history"] = rec_state["history"]
    metrics["best_epoch"] = rec_state["best_epoch"] + 1
  timer.lap("finetune")
  final = joint.table(params)
  write_identifiers_csv(os.path.join(workdir, "identifiers.csv"), final, inter.item_ids)
  metrics.update(valid=joint.evaluate(params, selection), valid_users=len(selection))
  for name, constrained in (("test_unconstrained", False), ("test_constrained", True)):
    metrics[name] = joint.evaluate(params, split.test, constrained)
  metrics["test"] = metrics["test_constrained" if config.grm.constrained
                            else "test_unconstrained"]
  results["metrics"] = metrics
  timer.lap("grm_eval")
  logging.info("[unigrec] test %s", stages.fmt(metrics["test"]))
  return stages.finish(results, timer, workdir)
