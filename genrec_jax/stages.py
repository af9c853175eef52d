"""Stages shared by every method: run setup, data, the CF model, tokenizer inputs, the
tokenizer, the recommender, results.

Each stage is a library function that a method module (`genrec_jax.methods`) composes; stages
that train are resumable from WORKDIR (`training.checkpoint.restore_or_run` for stages computed
at once, the epoch loop's checkpoints for trained models). Outputs: WORKDIR/results.json,
WORKDIR/config.json, WORKDIR/checkpoints/<stage>.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from genrec_jax.config import ConfigError, check_config
from genrec_jax.data import leave_one_out, load_interactions
from genrec_jax.data.interactions import Interactions, index_interactions, k_core_filter
from genrec_jax.data.splits import StaticSplit, subsample, training_windows
from genrec_jax.recommenders.hf_checkpoint import load_qwen2
from genrec_jax.recommenders.lcrec import checkpoint_prompt_tokens, word_prompt_tokens
from genrec_jax.recommenders.lora import LoRAConfig
from genrec_jax.recommenders.qwen2 import Qwen2, Qwen2Config
from genrec_jax.recommenders.sasrec import SASRecConfig
from genrec_jax.recommenders.t5 import T5Config
from genrec_jax.tokenizers.identifiers import IdentifierTable, write_identifiers_csv
from genrec_jax.tokenizers.quantizer import ResidualQuantizer
from genrec_jax.tokenizers.rqkmeans import fit_rq_kmeans
from genrec_jax.tokenizers.rqvae import RQVAE, RQVAEConfig
from genrec_jax.training.checkpoint import restore_or_run
from genrec_jax.training.grm import GRMTrainConfig, GRMTrainer
from genrec_jax.training.lcrec import LCRecTrainer
from genrec_jax.training.loop import LoopConfig
from genrec_jax.training.sasrec import SASRecTrainConfig, SASRecTrainer
from genrec_jax.training.sharding import make_mesh
from genrec_jax.training.tokenizer import (TokenizerRegularizer, TokenizerTrainConfig,
                                           assign_identifiers, final_temperature,
                                           identifiers_from_codes, train_tokenizer)


class Timer:
  """Seconds per stage for results.json's `timing`: `lap(name)` records the time since the
  previous lap (or the start)."""

  def __init__(self):
    self.start = self.last = time.time()
    self.seconds: dict[str, float] = {}

  def lap(self, name: str) -> None:
    now = time.time()
    self.seconds[name] = now - self.last
    self.last = now

  def summary(self) -> dict[str, float]:
    return {**self.seconds, "total": time.time() - self.start}


def start_run(config: ml_collections.ConfigDict, workdir: str,
              may_change: tuple[str, ...] = ()) -> jax.sharding.Mesh:
  """Checks the config (before anything is written: a bad config leaves nothing behind),
  creates WORKDIR, checks it against a stored run's config and returns the device mesh."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(config, workdir, may_change)
  mesh = make_mesh()
  platform = jax.devices()[0].platform
  logging.info("devices: %d x %s, mesh %s", jax.device_count(), platform, dict(mesh.shape))
  if platform == "cpu" and jax.local_device_count() != config.cpu_devices:
    logging.warning("config.cpu_devices=%d but JAX runs %d CPU devices: call "
                    "genrec_jax.training.sharding.use_cpu_devices(%d) before JAX starts "
                    "(genrec_jax.main does)", config.cpu_devices, jax.local_device_count(),
                    config.cpu_devices)
  return mesh


def static_data(config: ml_collections.ConfigDict, workdir: str
                ) -> tuple[Interactions, StaticSplit, dict]:
  """The dataset and its leave-one-out split (PROTOCOLS.md section 1), with the results
  header (dataset statistics, method, config, devices)."""
  inter = load_dataset(config, workdir)
  stats = inter.stats()
  logging.info("[data] %s: %d users, %d items, %d interactions", config.data.name,
               stats["users"], stats["items"], stats["interactions"])
  split = leave_one_out(inter, config.data.max_history)
  logging.info("[data] samples: %d train, %d valid, %d test", len(split.train),
               len(split.valid), len(split.test))
  results = {"dataset": {"name": config.data.name, **stats}, "method": config.method,
             "config": config.to_dict(), "devices": jax.device_count()}
  return inter, split, results


def cf_model(config: ml_collections.ConfigDict, inter: Interactions, mesh, workdir: str
             ) -> tuple[np.ndarray, dict]:
  """SASRec on every user's training windows (stage `sasrec`): its item embeddings
  [num_items, hidden_dim] (collaborative signal, or CF tokenizer inputs) and its
  validation/test metrics (the discriminative baseline)."""
  trainer = sasrec_trainer(config, inter.num_items, mesh)
  long_split = leave_one_out(inter, config.sasrec.max_len)
  params, loop_state = trainer.train(training_windows(inter, config.sasrec.max_len),
                                     long_split.valid,
                                     os.path.join(workdir, "checkpoints", "sasrec"))
  metrics = {"valid": trainer.evaluate(params, long_split.valid),
             "test": trainer.evaluate(params, long_split.test),
             "best_epoch": loop_state["best_epoch"] + 1}
  logging.info("[sasrec] test %s", fmt(metrics["test"]))
  return trainer.item_embeddings(params), metrics


def item_tokenizer(config: ml_collections.ConfigDict, inter: Interactions, workdir: str,
                   cf: np.ndarray | None, timer: Timer,
                   regularizer: TokenizerRegularizer | None = None
                   ) -> tuple[IdentifierTable, dict, RQVAE | ResidualQuantizer, np.ndarray]:
  """Tokenizer inputs (timed as `embeddings`), the trained tokenizer (with a method's
  `regularizer` terms) and its identifier table (stage `tokenizer`,
  WORKDIR/identifiers.csv). Returns the table, the tokenizer's statistics, the tokenizer (the
  RQ-VAE, or with `tokenizer.kind=rqkmeans` the quantizer) and its inputs
  [num_items, D_in]."""
  features = item_features(config, inter.item_ids, cf)
  timer.lap("embeddings")
  table, stats, model = train_or_restore_tokenizer(config, workdir, features, cf, regularizer)
  write_identifiers_csv(os.path.join(workdir, "identifiers.csv"), table, inter.item_ids)
  timer.lap("tokenizer")
  return table, {**stats, "input": config.embeddings.source}, model, features


@dataclasses.dataclass
class JointInputs:
  """What a stage training tokenizer and recommender together starts from (ETEGRec,
  UniGRec): the device mesh and timer, the dataset and its split, the results so far, the
  SASRec item embeddings `cf` [num_items, d], the pretrained tokenizer with its identifier
  table and inputs `features` [num_items, D_in], and the validation users of model
  selection."""

  mesh: Any
  timer: Timer
  inter: Interactions
  split: StaticSplit
  results: dict
  cf: np.ndarray
  table: IdentifierTable
  tokenizer: RQVAE
  features: np.ndarray
  selection: Any


def epoch_loop(config: ml_collections.ConfigDict, epochs: int, eval_every: int, patience: int,
               seed: int | None = None, **options) -> LoopConfig:
  """An epoch loop seeded with `seed` (default the run's) that saves as often as
  `checkpoint_minutes` asks; `options`: further `LoopConfig` fields."""
  return LoopConfig(epochs=epochs, eval_every=eval_every, patience=patience,
                    seed=config.seed if seed is None else seed,
                    checkpoint_seconds=config.checkpoint_minutes * 60, **options)


def selection_loop(config: ml_collections.ConfigDict, epochs: int, eval_every: int,
                   patience: int) -> LoopConfig:
  """An epoch loop that selects on the recommender's validation metric (`grm.select_metric`),
  seeded with the run's seed: the joint and second stages of ETEGRec and UniGRec."""
  return epoch_loop(config, epochs, eval_every, patience, select_metric=config.grm.select_metric)


def joint_inputs(config: ml_collections.ConfigDict, workdir: str) -> JointInputs:
  """The stages before a joint stage: data, SASRec (its test metrics become the `sasrec`
  baseline of the results), the pretrained tokenizer (`item_tokenizer`)."""
  mesh = start_run(config, workdir)
  timer = Timer()
  inter, split, results = static_data(config, workdir)
  timer.lap("data")
  cf, sasrec_metrics = cf_model(config, inter, mesh, workdir)
  results["baselines"] = {"sasrec": sasrec_metrics}
  timer.lap("sasrec")
  table, results["tokenizer"], tokenizer, features = item_tokenizer(config, inter, workdir, cf,
                                                                    timer)
  return JointInputs(mesh, timer, inter, split, results, cf, table, tokenizer, features,
                     subsample(split.valid, config.grm.valid_users, config.seed))


def generative_recommender(config: ml_collections.ConfigDict, table: IdentifierTable,
                           split: StaticSplit, mesh, workdir: str, timer: Timer) -> dict:
  """The T5 recommender over `table` (stage `grm`): trained with model selection on
  `grm.valid_users` validation users (timed as `grm_train`), then tested with beam search
  (`grm_eval`). Returns the metrics and the per-epoch history."""
  trainer = grm_trainer(config, table.vocab_size, mesh)
  selection = subsample(split.valid, config.grm.valid_users, config.seed)
  params, loop_state = trainer.train(table, split.num_items, split.train, selection,
                                     os.path.join(workdir, "checkpoints", "grm"))
  timer.lap("grm_train")
  metrics = {"valid": trainer.evaluate(params, table, split.num_items, selection),
             "valid_users": len(selection),
             "test": trainer.evaluate(params, table, split.num_items, split.test),
             "best_epoch": loop_state["best_epoch"] + 1,
             "epochs_run": loop_state["epoch"] + 1}
  timer.lap("grm_eval")
  logging.info("[grm] test %s", fmt(metrics["test"]))
  return {"metrics": metrics, "grm_history": loop_state["history"]}


def finish(results: dict, timer: Timer, workdir: str) -> dict:
  """Adds the timing and writes WORKDIR/results.json (atomically); returns the results."""
  results["timing"] = timer.summary()
  write_json(os.path.join(workdir, "results.json"), results)
  logging.info("results written to %s", os.path.join(workdir, "results.json"))
  return results


def load_dataset(config: ml_collections.ConfigDict, workdir: str) -> Interactions:
  """Interactions after the k-core filter, read directly or through TFDS array_record."""
  data = config.data
  if not data.use_tfds:
    return load_interactions(data.path, data.format, data.min_count)
  from genrec_jax.data import tfds_builder  # imported lazily: TFDS is slow to import
  tfds_dir = data.tfds_dir or os.path.join(workdir, "tfds")
  builder_config, manual_dir = tfds_builder.config_for_file(data.name, data.path, data.format)
  tfds_builder.prepare_tfds(builder_config, manual_dir, tfds_dir)
  raw = tfds_builder.load_tfds_interactions(builder_config.name, tfds_dir)
  return index_interactions(k_core_filter(raw, data.min_count))


def sasrec_trainer(config, num_items: int, mesh) -> SASRecTrainer:
  s = config.sasrec
  model_cfg = SASRecConfig(num_items=num_items, hidden_dim=s.hidden_dim,
                           num_layers=s.num_layers, num_heads=s.num_heads, max_len=s.max_len,
                           dropout_rate=s.dropout_rate)
  buckets = tuple(b for b in (5, 10, 20) if b < s.max_len) + (s.max_len,)
  train_cfg = SASRecTrainConfig(
      loss=s.loss, learning_rate=s.learning_rate, batch_size=s.batch_size,
      length_buckets=buckets, steps_per_dispatch=s.steps_per_dispatch,
      loop=epoch_loop(config, s.epochs, s.eval_every, s.patience))
  return SASRecTrainer(model_cfg, train_cfg, mesh, seed=config.seed)


def grm_trainer(config, vocab_size: int, mesh) -> GRMTrainer:
  """The recommender's trainer for an identifier vocabulary of `vocab_size` tokens (pad
  included): TIGER's T5, or LC-Rec (`grm.backbone`)."""
  if config.grm.backbone == "lcrec":
    return lcrec_trainer(config, vocab_size, mesh)
  return GRMTrainer(grm_model_config(config, vocab_size), grm_train_config(config), mesh,
                    seed=config.seed)


def lcrec_trainer(config, vocab_size: int, mesh) -> LCRecTrainer:
  """LC-Rec over a Qwen2 backbone: the checkpoint of `grm.checkpoint` with its tokenizer, or
  a random backbone of the grm.lcrec sizes with the word-level stand-in prompt."""
  g, lc = config.grm, config.grm.lcrec
  if g.checkpoint == "random":
    backbone = Qwen2(Qwen2Config(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size, num_layers=lc.num_layers,
        num_heads=lc.num_heads, num_kv_heads=lc.num_kv_heads, rope_theta=lc.rope_theta,
        tie_word_embeddings=lc.tie_word_embeddings, dtype=lc.dtype,
        param_dtype=lc.param_dtype), rngs=nnx.Rngs(config.seed))
    prompt = word_prompt_tokens(lc.vocab_size, lc.prompt)
  else:
    backbone = load_qwen2(g.checkpoint, dtype=lc.dtype, param_dtype=lc.param_dtype)
    prompt = checkpoint_prompt_tokens(g.checkpoint, lc.prompt)
  logging.info("[grm] LC-Rec backbone %s: %s", g.checkpoint, backbone.cfg)
  return LCRecTrainer(backbone, vocab_size - 1, prompt,
                      LoRAConfig(rank=lc.lora_rank, alpha=lc.lora_alpha,
                                 dropout=lc.lora_dropout),
                      grm_train_config(config), mesh, seed=config.seed,
                      train_vocabulary=lc.train_vocabulary,
                      train_backbone_from_init=lc.train_backbone_from_init,
                      param_sharding=lc.param_sharding)


def grm_model_config(config, vocab_size: int) -> T5Config:
  g = config.grm
  return T5Config(vocab_size=vocab_size, d_model=g.d_model, d_ff=g.d_ff,
                  num_heads=g.num_heads, d_kv=g.d_kv, num_encoder_layers=g.num_encoder_layers,
                  num_decoder_layers=g.num_decoder_layers, dropout_rate=g.dropout_rate,
                  matmul_dtype=g.matmul_dtype)


def grm_train_config(config) -> GRMTrainConfig:
  g = config.grm
  tok = config.tokenizer
  level_sizes = (tok.codebook_size,) * tok.num_levels + (tok.dedup_size,)
  return GRMTrainConfig(
      learning_rate=g.learning_rate, weight_decay=g.weight_decay, warmup_steps=g.warmup_steps,
      grad_clip=g.grad_clip, loss_reduction=g.loss_reduction,
      batch_grouping=g.batch_grouping, batch_size=g.batch_size,
      steps_per_dispatch=g.steps_per_dispatch, eval_batch_size=g.eval_batch_size,
      beam_size=g.beam_size, constrained=g.constrained,
      level_softmax=level_sizes if g.level_softmax else (),
      length_buckets=tuple(g.length_buckets),
      loop=epoch_loop(config, g.epochs, g.eval_every, g.patience, select_metric=g.select_metric,
                      max_train_seconds=g.max_train_minutes * 60 or None))


def rqvae_config(config, input_dim: int) -> RQVAEConfig:
  tok = config.tokenizer
  return RQVAEConfig(
      input_dim=input_dim, hidden_dims=tuple(tok.hidden_dims), latent_dim=tok.latent_dim,
      num_levels=tok.num_levels, codebook_size=tok.codebook_size, beta=tok.beta,
      loss_reduction=tok.loss_reduction, detach_residual=tok.detach_residual,
      cf_weight=tok.cf_weight, cf_temperature=tok.cf_temperature,
      cf_similarity=tok.cf_similarity, sinkhorn_epsilon=tok.sinkhorn_epsilon, soft=tok.soft,
      uniformity_weight=tok.uniformity_weight, uniformity_reduction=tok.uniformity_reduction)


def tokenizer_train_config(config) -> TokenizerTrainConfig:
  tok = config.tokenizer
  return TokenizerTrainConfig(
      length=tok.train_length, unit=tok.train_unit, batch_size=tok.batch_size,
      learning_rate=tok.learning_rate, weight_decay=tok.weight_decay,
      kmeans_iterations=tok.kmeans_iterations,
      kmeans_refresh_steps=tuple(tok.kmeans_refresh_steps), selection=tok.selection,
      eval_every=tok.eval_every, steps_per_dispatch=tok.steps_per_dispatch,
      temperature_start=tok.temperature_start, temperature_end=tok.temperature_end,
      warmup_units=tok.warmup_units, linear_decay=tok.linear_decay, grad_clip=tok.grad_clip)


def item_features(config, item_ids: np.ndarray, cf: np.ndarray | None) -> np.ndarray:
  """Tokenizer input vectors [len(item_ids), D] for raw item ids (in item-index order)."""
  source = config.embeddings.source
  if source == "cf":
    if cf is None:
      raise ValueError("embeddings.source='cf' needs a trained SASRec (method letter, or set "
                       "tokenizer.cf_weight)")
    return cf
  from genrec_jax import text  # imported lazily: loads the sentence encoder's tokenizer
  if source == "file":
    return text.load_embedding_file(config.embeddings.file, len(item_ids))
  if source == "minilm":
    return text.semantic_embeddings(config.data.items_csv, [str(i) for i in item_ids],
                                    config.embeddings.cache_dir)
  raise ValueError(f"embeddings.source must be 'minilm', 'file' or 'cf', got {source!r}")


def train_or_restore_tokenizer(config, workdir: str, features: np.ndarray,
                               cf: np.ndarray | None,
                               regularizer: TokenizerRegularizer | None = None
                               ) -> tuple[IdentifierTable, dict, RQVAE]:
  """Stage `tokenizer`: trains the RQ-VAE once; later runs restore weights and code table.
  Returns the identifier table, the training statistics and the tokenizer."""
  tok = config.tokenizer
  if tok.kind == "rqkmeans":
    return train_or_restore_rq_kmeans(config, workdir, features)
  model_cfg = rqvae_config(config, features.shape[1])
  n, depth = features.shape[0], tok.num_levels + 1

  def run():
    model, train_stats = train_tokenizer(model_cfg, tokenizer_train_config(config), features, cf,
                                         seed=config.seed, regularizer=regularizer)
    table, stats = assign_identifiers(model, features, tok.dedup_size,
                                      final_temperature(tokenizer_train_config(config)))
    return ({"tokenizer": nnx.state(model),
             "code_table": {"codes": table.codes, "item": table.item}},
            {**stats, **train_stats})

  model = RQVAE(model_cfg, rngs=nnx.Rngs(0))
  templates = {"tokenizer": nnx.state(model),
               "code_table": {"codes": np.zeros((n, depth), np.int32),
                              "item": np.zeros((n,), np.int32)}}
  items, stats = restore_or_run(os.path.join(workdir, "checkpoints", "tokenizer"), templates,
                                run)
  nnx.update(model, items["tokenizer"])
  return stored_table(config, items["code_table"]), stats, model


def stored_table(config, code_table: dict) -> IdentifierTable:
  """The identifier table of a tokenizer checkpoint's `code_table` item (codes with the dedup
  digit, item of each row); its dedup vocabulary as grown by `identifiers_from_codes`."""
  tok = config.tokenizer
  codes = np.asarray(code_table["codes"])
  dedup_size = max(tok.dedup_size, int(codes[:, -1].max()) + 1)
  return IdentifierTable(codes, np.asarray(code_table["item"]),
                         (tok.codebook_size,) * tok.num_levels + (dedup_size,))


def train_or_restore_rq_kmeans(config, workdir: str, features: np.ndarray
                               ) -> tuple[IdentifierTable, dict, ResidualQuantizer]:
  """Stage `tokenizer` with `tokenizer.kind=rqkmeans` (`tokenizers.rqkmeans`): residual
  mini-batch k-means over the tokenizer inputs, `tokenizer.train_length` steps of
  `tokenizer.batch_size` vectors per level; later runs restore the codebooks and code table.
  Returns the table, the statistics and the quantizer (its codebooks encode new items)."""
  tok = config.tokenizer
  n, dim = features.shape

  def run():
    t0 = time.time()
    quantizer, codes = fit_rq_kmeans(features, tok.num_levels, tok.codebook_size, config.seed,
                                     batch_size=tok.batch_size, steps=tok.train_length)
    table, stats = identifiers_from_codes(codes, tok.codebook_size, tok.dedup_size)
    return ({"quantizer": {"codebooks": np.asarray(quantizer.codebooks[...])},
             "code_table": {"codes": table.codes, "item": table.item}},
            {**stats, "seconds": time.time() - t0})

  templates = {"quantizer": {"codebooks": np.zeros((tok.num_levels, tok.codebook_size, dim),
                                                   np.float32)},
               "code_table": {"codes": np.zeros((n, tok.num_levels + 1), np.int32),
                              "item": np.zeros((n,), np.int32)}}
  items, stats = restore_or_run(os.path.join(workdir, "checkpoints", "tokenizer"), templates,
                                run)
  quantizer = ResidualQuantizer(tok.num_levels, tok.codebook_size, dim, rngs=nnx.Rngs(0))
  quantizer.codebooks[...] = jnp.asarray(items["quantizer"]["codebooks"])
  return stored_table(config, items["code_table"]), stats, quantizer


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str,
                         may_change: tuple[str, ...] = ()) -> None:
  """Stores the run's config in WORKDIR/config.json, or checks that it matches the stored one.

  Checkpoints and stored results of a workdir belong to one config: a rerun with other
  settings would silently mix stale state into its results. Fields in `may_change` (dotted
  paths, e.g. adding continual methods or periods), the local cache directories and the
  checkpoint period (which changes no number) may differ.
  Raises ValueError naming the differing fields.
  """
  def comparable(c):
    d = json.loads(json.dumps(c.to_dict(), default=_json_default))
    for field in may_change + ("compilation_cache_dir", "embeddings.cache_dir",
                               "checkpoint_minutes"):
      *parents, leaf = field.split(".")
      node = d
      for name in parents:
        node = node.get(name, {})
      node.pop(leaf, None)
    return d
  path = os.path.join(workdir, "config.json")
  current = comparable(config)
  if not (os.path.exists(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    write_json(path, current)  # nothing stored yet: (re)start with this config
    return
  with open(path) as f:
    diffs = _differences(json.load(f), current)
  if diffs:
    raise ConfigError(f"{workdir} holds a run made with another config ({'; '.join(diffs[:5])});"
                     " use a new --workdir, or the stored config")


def _differences(a, b, prefix="") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b))
            for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
  return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def write_json(path: str, payload: dict) -> None:
  """Atomic JSON write (no half-written results after a crash)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(value):
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, (np.ndarray, tuple)):
    return list(value)
  raise TypeError(f"cannot serialise {type(value)}")




def fmt(metrics: dict) -> str:
  return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
