"""Continual pipeline: DACT and every TIGER-backbone baseline of its paper across periods.

Protocol (PROTOCOLS.md section 2): the interactions are cut in time into D0..D4; period 0
pre-trains the CF model (SASRec), the collaborative tokenizer (RQ-VAE + LETTER InfoNCE) and the
T5 recommender; each later period t adapts them with a method's three rules and is evaluated on
its test targets with its own identifier table.

A method is a set of three rules (`Rules`, one per method in `METHOD_RULES`):
  tokenizer   frozen | naive (fine-tune on period t) | dact (CDIM, differentiated update) |
              reformer (fine-tune on period t with old items held at their identifiers' codes)
  identifiers keep (old identifiers fixed, new items encoded) | reencode (all items anew) |
              reformer (old fixed, new items from the updated tokenizer) |
              hierarchical (DACT's relaxed-to-strict reassignment)
  recommender frozen | finetune (from period t-1, on D_t) | retrain (from scratch, D_0..D_t) |
              peso (finetune with PESO's proximal term towards the period t-1 adapters) |
              lsat (LSAT's long- and short-term adapters, `methods.lsat`)
The recommender is TIGER's T5 or, with grm.backbone="lcrec", LC-Rec (a Qwen2 LLM with LoRA,
`training.lcrec`): the same rules apply to its adapters and identifier rows; peso and lsat are
the LoRA baselines of DACT Table 3.
Chains shared by several methods (the CF model, the naively fine-tuned tokenizer, identifier
tables) are computed once. Every stage is checkpointed with Orbax under
WORKDIR/checkpoints/..., so an interrupted run resumes in the period where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from genrec_jax.config import check_config
from genrec_jax.data import append_interactions, read_interactions
from genrec_jax.data.periods import (SECONDS_PER_DAY, Period, continual_split, period_summary,
                                     retrain_samples)
from genrec_jax.data.splits import subsample
from genrec_jax.evaluation.metrics import metrics_from_ranks, target_ranks
from genrec_jax.evaluation.report import write_report
from genrec_jax.stages import (epoch_loop, grm_trainer, item_features, load_dataset, rqvae_config,
                               sasrec_trainer, start_run, tokenizer_train_config, write_json)
from genrec_jax.tokenizers import reassign
from genrec_jax.tokenizers.dact import CDIM, DACTConfig, finetune_tokenizer
from genrec_jax.tokenizers.identifiers import IdentifierTable, assign_dedup, write_identifiers_csv
from genrec_jax.tokenizers.quantizer import code_usage
from genrec_jax.tokenizers.rqvae import RQVAE
from genrec_jax.training.checkpoint import restore_or_run
from genrec_jax.training.grm import GRMTrainer
from genrec_jax.training.sharding import make_mesh
from genrec_jax.training.tokenizer import encode_items, train_tokenizer

@dataclasses.dataclass(frozen=True)
class Rules:
  """How a continual method adapts each part in period t (values: the module docstring)."""

  tokenizer: str
  identifiers: str
  recommender: str


METHOD_RULES = {  # keys: config.CONTINUAL_METHODS
    "frozen": Rules(tokenizer="frozen", identifiers="keep", recommender="frozen"),
    "ft_tok": Rules(tokenizer="naive", identifiers="reencode", recommender="frozen"),
    "ft_grm": Rules(tokenizer="frozen", identifiers="keep", recommender="finetune"),
    "ft_both": Rules(tokenizer="naive", identifiers="reencode", recommender="finetune"),
    "ft_tok_rt_grm": Rules(tokenizer="naive", identifiers="reencode", recommender="retrain"),
    "reformer": Rules(tokenizer="reformer", identifiers="reformer", recommender="finetune"),
    "dact": Rules(tokenizer="dact", identifiers="hierarchical", recommender="finetune"),
    "lsat": Rules(tokenizer="frozen", identifiers="keep", recommender="lsat"),
    "peso": Rules(tokenizer="frozen", identifiers="keep", recommender="peso"),
}


@nnx.jit
def _quantized(tokenizer: RQVAE, features: jax.Array) -> jax.Array:
  """Quantized latents [N, d] of item vectors [N, D_in]."""
  return tokenizer(features).quant.quantized


class ContinualRun:
  """State and stages of one continual run (one dataset, several methods)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    check_config(config)  # unknown methods, missing files, CF vs latent size, ...
    self.config, self.workdir = config, workdir
    self.mesh = mesh or make_mesh()
    self.inter = load_dataset(config, workdir)
    # Appended periods: new users/items get the next indices, so stored state stays valid.
    self.item_chunks = [self.inter.item_ids]  # raw ids of the items each data file added
    appended_after = []
    for path in config.continual.new_periods:
      appended_after.append(int(self.inter.timestamp.max()) // SECONDS_PER_DAY)
      known = self.inter.num_items
      self.inter = append_interactions(self.inter, read_interactions(path, config.data.format))
      self.item_chunks.append(self.inter.item_ids[known:])
    self.periods: list[Period] = continual_split(
        self.inter, tuple(config.continual.fractions), config.data.max_history,
        config.sasrec.max_len, tuple(appended_after), config.continual.min_test_history)
    self.num_items = self.inter.num_items
    base_periods = len(config.continual.fractions) + 1
    # Rows of the CF item table in period t: every item of the original data, then the items of
    # each appended period from that period on.
    chunk_ends = np.cumsum([len(c) for c in self.item_chunks])
    self.cf_rows = [int(chunk_ends[max(0, t - base_periods + 1)])
                    for t in range(len(self.periods))]
    self.tokenizer_cfg = config.tokenizer
    self.dedup_size = self.tokenizer_cfg.dedup_size
    self.level_sizes = ((self.tokenizer_cfg.codebook_size,) * self.tokenizer_cfg.num_levels
                        + (self.dedup_size,))
    self.dact_cfg = DACTConfig(**config.continual.dact.to_dict())
    self.recommender: GRMTrainer | None = None  # built once the vocabulary is known
    self.cf: list[np.ndarray] = []
    self.tokenizers: dict[tuple[str, int], tuple[RQVAE, CDIM | None]] = {}
    self.tokenizer_seconds: dict[tuple[str, int], float] = {}
    self.tables: dict[tuple[str, str, int], IdentifierTable] = {}

  # ----------------------------------------------------------------------------- helpers
  def ckpt_dir(self, *parts: str) -> str:
    return os.path.join(self.workdir, "checkpoints", *parts)

  def catalog_features(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalog item indices, semantic features, period-t CF embeddings) of period t."""
    catalog = self.periods[t].catalog
    return catalog, self.features[catalog], self.cf[t][catalog]

  def encode(self, tokenizer: RQVAE, t: int) -> np.ndarray:
    return encode_items(tokenizer, self.catalog_features(t)[1])

  def tokenizer_inputs(self) -> np.ndarray:
    """Tokenizer input vector of every item [num_items, D] (`embeddings.source`).

    "minilm": item text (cached per data file, so appending periods is cheap); "file": the
    user's vectors (one row per item in sorted raw-id order, appended items included); "cf"
    (data without item text, TIGER-SAS): the period-0 CF embeddings, and for an item new in
    period t its period-t CF embedding (an item's vector is fixed once it has appeared).
    """
    source = self.config.embeddings.source
    if source == "minilm":
      return np.concatenate([item_features(self.config, ids, None)
                             for ids in self.item_chunks])
    if source == "cf":
      features = self.cf[0].copy()
      for t in range(1, len(self.periods)):
        new = self.periods[t].new_items
        features[new] = self.cf[t][new]
      return features
    vectors = item_features(self.config, self.inter.item_ids, None)
    return vectors[np.argsort(np.argsort(self.inter.item_ids, kind="stable"))]

  # ------------------------------------------------------------------------------ stages
  def train_cf_chain(self) -> None:
    """SASRec (32-d) trained on D0, then fine-tuned on every D_t; cf[t] = its item table.

    The item table covers every item of the original data from period 0 on, but only the
    items seen up to period t take part in period t's softmax and ranking (`known_items`),
    and the rows of the items new in period t are freshly initialised before fine-tuning
    (METHODS.md section 4); an appended period's new items get new rows
    (`SASRecTrainer.grow_item_table`).
    """
    trainer, params = None, None
    for t, period in enumerate(self.periods):
      if trainer is None or trainer.model_cfg.num_items != self.cf_rows[t]:
        trainer = sasrec_trainer(self.config, self.cf_rows[t], self.mesh)
        if params is not None:
          params = trainer.grow_item_table(params)
      loop_cfg = None if t == 0 else epoch_loop(
          self.config, self.config.continual.cf_finetune_epochs, eval_every=1, patience=2)
      if t > 0:
        params = trainer.reset_item_rows(params, period.new_items, self.config.seed + t)
      known = np.zeros(self.cf_rows[t], bool)
      known[period.catalog] = True
      start = time.time()
      params, _ = trainer.train(period.cf_windows, period.valid,
                                self.ckpt_dir("cf", f"period_{t}"), params=params,
                                loop_cfg=loop_cfg, known_items=known)
      table = trainer.item_embeddings(params)  # [cf_rows[t], d], padded to every item
      self.cf.append(np.pad(table, ((0, self.num_items - table.shape[0]), (0, 0))))
      logging.info("[cf] period %d: %.1fs", t, time.time() - start)

  def tokenizer_state(self, rule: str, t: int) -> tuple[RQVAE, CDIM | None]:
    """The tokenizer (and CDIM) of chain `rule` after period t, trained once and cached."""
    key = ("frozen", 0) if rule == "frozen" or t == 0 else (rule, t)
    if key in self.tokenizers:
      return self.tokenizers[key]
    _, features, cf = self.catalog_features(key[1])
    model_cfg = rqvae_config(self.config, features.shape[1])
    template = RQVAE(model_cfg, rngs=nnx.Rngs(0))
    cdim_template = CDIM.from_config(model_cfg.latent_dim, self.dact_cfg, rngs=nnx.Rngs(0))

    def run():
      start = time.time()
      if key[1] == 0:
        model, _ = train_tokenizer(model_cfg, tokenizer_train_config(self.config), features,
                                   cf, seed=self.config.seed)
        cdim = None
      else:
        previous, cdim = self.tokenizer_state(key[0], key[1] - 1)
        fixed_codes = (self.held_codes(key[1]) if key[0] == "reformer" else None)
        model, cdim, _ = finetune_tokenizer(
            previous, features, cf, self.dact_cfg, key[0], cdim=cdim,
            seed=self.config.seed + key[1], fixed_codes=fixed_codes)
      return ({"tokenizer": nnx.state(model),
               "cdim": nnx.state(cdim if cdim is not None else cdim_template)},
              {"seconds": time.time() - start})

    items, meta = restore_or_run(
        self.ckpt_dir("tokenizer", f"{key[0]}_{key[1]}"),
        {"tokenizer": nnx.state(template), "cdim": nnx.state(cdim_template)}, run)
    nnx.update(template, items["tokenizer"])
    nnx.update(cdim_template, items["cdim"])
    state = (template, cdim_template if key[0] == "dact" else None)
    seconds = meta["seconds"]
    self.tokenizers[key] = state
    self.tokenizer_seconds[key] = seconds
    return state

  def held_codes(self, t: int) -> np.ndarray:
    """Reformer at period t: the L codes each catalog item keeps from the period t-1 Reformer
    table, -1 rows for items new in period t -> int [C_t, L]."""
    previous = self.identifier_table("reformer", "reformer", t - 1)
    catalog = self.periods[t].catalog
    codes = np.full((len(catalog), self.tokenizer_cfg.num_levels), -1, np.int32)
    rows = np.searchsorted(catalog, previous.item)  # catalogs are sorted and only grow
    codes[rows] = previous.codes[:, :-1]
    return codes

  def identifier_table(self, tok_rule: str, id_rule: str, t: int) -> IdentifierTable:
    """Identifier table of period t under a (tokenizer rule, identifier rule) chain."""
    key = (tok_rule, id_rule, t)
    if key in self.tables:
      return self.tables[key]
    catalog = self.periods[t].catalog
    if t == 0:
      codes = self.encode(self.tokenizer_state("frozen", 0)[0], 0)
      table = IdentifierTable(assign_dedup(codes, self.dedup_size), catalog, self.level_sizes)
    else:
      previous = self.identifier_table(tok_rule, id_rule, t - 1)
      codes = self.encode(self.tokenizer_state(tok_rule, t)[0], t)
      if id_rule == "keep":
        table = reassign.keep_and_extend(previous, catalog, codes)
      elif id_rule == "reencode":
        table = reassign.reencode_all(codes, catalog, self.dedup_size,
                                      self.tokenizer_cfg.codebook_size)
      elif id_rule == "reformer":
        table = reassign.keep_and_extend(previous, catalog, codes)
      elif id_rule == "hierarchical":
        table = reassign.hierarchical_reassign(previous, catalog, codes)
      else:
        raise ValueError(f"unknown identifier rule {id_rule!r}")
    if table.duplicates():
      raise AssertionError(f"{key}: {table.duplicates()} duplicated identifiers")
    self.tables[key] = table
    return table

  def cf_alignment(self, tokenizer: RQVAE, t: int) -> float:
    """Mean cosine between each item's quantized latent and its period-t CF embedding."""
    _, features, cf = self.catalog_features(t)
    q = np.asarray(_quantized(tokenizer, jnp.asarray(features)))
    q = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-8)
    c = cf / (np.linalg.norm(cf, axis=1, keepdims=True) + 1e-8)
    return float(np.mean(np.sum(q * c, axis=1)))

  def evaluate(self, params, table: IdentifierTable, t: int, rank=None) -> dict:
    """Test metrics of period t (`period_metrics`) of the recommender over `table`; `rank`
    (samples -> rankings) replaces the recommender's own ranking (LSAT's two adapters)."""
    test = self.periods[t].test
    if rank is None:
      return self.period_metrics(self.recommender.rank(params, table, self.num_items, test), t)
    return self.period_metrics(rank(test), t)

  def period_metrics(self, ranked: np.ndarray, t: int) -> dict:
    """Test metrics of period t from rankings int [S, beam] of its test samples: all
    targets, warm (items known before t) and cold (new)."""
    test = self.periods[t].test
    ranks = target_ranks(ranked, test.target)
    cold = np.isin(test.target, self.periods[t].new_items)
    out = {"test": metrics_from_ranks(ranks)}
    for name, mask in (("warm", ~cold), ("cold", cold)):
      out[name] = metrics_from_ranks(ranks[mask]) if mask.any() else {}
      out[name]["users"] = int(mask.sum())
    return out

  def train_grm(self, name: str, table: IdentifierTable, t: int, params, mode: str,
                cumulative: bool = False):
    """Period-t recommender under `mode` (frozen | finetune | peso | retrain) -> (params,
    seconds). `cumulative` fine-tunes on D_0..D_t instead of D_t, with the epoch budget of
    training on all data so far (`continual.retrain_epochs`; LSAT's long-term adapter)."""
    if mode == "frozen":
      return params, 0.0
    c = self.config.continual
    period = self.periods[t]
    context = None
    if mode in ("finetune", "peso"):
      train = retrain_samples(self.periods, t) if cumulative else period.train
      loop_cfg = epoch_loop(self.config, c.retrain_epochs if cumulative else c.finetune_epochs,
                            c.finetune_eval_every, c.patience, seed=self.config.seed + t)
      if mode == "peso":
        context = self.recommender.proximal_context(params, c.peso.weight)
    elif mode == "retrain":
      train, params, loop_cfg = retrain_samples(self.periods, t), None, epoch_loop(
          self.config, c.retrain_epochs, c.finetune_eval_every, c.patience,
          seed=self.config.seed + t, max_train_seconds=c.retrain_max_minutes * 60 or None)
    else:
      raise ValueError(f"unknown recommender rule {mode!r}")
    start = time.time()
    selection = subsample(period.valid, self.config.grm.valid_users, self.config.seed)
    params, _ = self.recommender.train(table, self.num_items, train, selection,
                                       self.ckpt_dir(name, f"period_{t}", "grm"),
                                       params=params, loop_cfg=loop_cfg, context=context)
    return params, time.time() - start

  # ----------------------------------------------------------------------------- driver
  def run(self) -> dict:
    t0 = time.time()
    summary = period_summary(self.periods)
    for row in summary:
      logging.info("[periods] D%d %s .. %s: %d interactions, %d/%d/%d train/valid/test, "
                   "catalog %d (%d new)", row["period"], row["first_day"], row["last_day"],
                   row["interactions"], row["train"], row["valid"], row["test"],
                   row["catalog"], row["new_items"])
    results = {"dataset": {"name": self.config.data.name, **self.inter.stats()},
               "method": "continual", "periods": summary, "config": self.config.to_dict(),
               "methods": {}, "timing": {}}
    start = time.time()
    self.train_cf_chain()
    results["timing"]["cf"] = time.time() - start
    self.features = self.tokenizer_inputs()

    base_table = self.identifier_table("frozen", "keep", 0)
    self.recommender = grm_trainer(self.config, base_table.vocab_size, self.mesh)
    start = time.time()
    base_params, base_state = self.recommender.train(
        base_table, self.num_items, self.periods[0].train,
        subsample(self.periods[0].valid, self.config.grm.valid_users, self.config.seed),
        self.ckpt_dir("period_0", "grm"))
    results["period_0"] = cached_row(
        os.path.join(self.workdir, "period_0", "result.json"),
        lambda: {**self.evaluate(base_params, base_table, 0),
                 "best_epoch": base_state["best_epoch"] + 1,
                 "seconds": time.time() - start,
                 "tokenizer_seconds": self.tokenizer_seconds[("frozen", 0)],
                 "code_usage": code_usage(base_table.codes[:, :-1],
                                          self.tokenizer_cfg.codebook_size)})
    logging.info("[period 0] test %s", _fmt(results["period_0"]["test"]))
    results["timing"]["period_0"] = time.time() - start

    for name in self.config.continual.methods:
      if name == "pit":  # its own composition (genrec_jax.methods.pit)
        from genrec_jax.methods import pit
        results["methods"][name] = pit.continual(self, base_params, base_table)
      else:
        results["methods"][name] = self.run_method(name, base_params, base_table)
      write_json(os.path.join(self.workdir, "results.json"), results)
    results["analyses"] = analyses(results)
    results["timing"]["total"] = time.time() - t0
    write_json(os.path.join(self.workdir, "results.json"), results)
    write_report(results, self.workdir)
    return results

  def run_method(self, name: str, base_params, base_table: IdentifierTable) -> dict:
    rules = METHOD_RULES[name]
    tok_rule, id_rule, grm_rule = rules.tokenizer, rules.identifiers, rules.recommender
    out_dir = os.path.join(self.workdir, name)
    write_identifiers_csv(os.path.join(out_dir, "period_0", "identifiers.csv"), base_table,
                          self.inter.item_ids)
    params, previous, rows = base_params, base_table, []
    for t in range(1, len(self.periods)):
      start = time.time()
      table = self.identifier_table(tok_rule, id_rule, t)
      tokenizer_seconds = (0.0 if tok_rule == "frozen"
                           else self.tokenizer_seconds[(tok_rule, t)])
      rank = None
      if grm_rule == "lsat":  # two adapters; its own ranking (genrec_jax.methods.lsat)
        from genrec_jax.methods import lsat
        params, rank, grm_seconds = lsat.adapt(self, name, table, t, params, base_params)
      else:
        params, grm_seconds = self.train_grm(name, table, t, params, grm_rule)
      row = cached_row(os.path.join(out_dir, f"period_{t}", "result.json"), lambda: {
          "period": t, **self.evaluate(params, table, t, rank),
          "code_change": reassign.code_change_rates(previous, table),
          "seconds": tokenizer_seconds + grm_seconds,
          "tokenizer_seconds": tokenizer_seconds, "grm_seconds": grm_seconds,
          "cf_alignment": self.cf_alignment(self.tokenizer_state(tok_rule, t)[0], t),
          "identifiers": {"items": int(table.codes.shape[0]),
                          "duplicates": table.duplicates(),
                          "max_dedup_digit": int(table.codes[:, -1].max())}})
      write_identifiers_csv(os.path.join(out_dir, f"period_{t}", "identifiers.csv"), table,
                            self.inter.item_ids)
      logging.info("[%s] period %d test %s | code change overall %.3f | %.0fs", name, t,
                   _fmt(row["test"]), row["code_change"]["overall"], time.time() - start)
      rows.append(row)
      previous = table
    return {"rules": dataclasses.asdict(rules),
            "periods": rows}


def cached_row(path: str, compute) -> dict:
  """The results row stored at `path` by an earlier run of this workdir, else `compute()`,
  stored there (a resumed or extended run re-evaluates nothing it already evaluated)."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  row = compute()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_json(path, row)
  return row


def analyses(results: dict) -> dict:
  """Cross-method summaries: mean code change, mean N@10, time relative to ft_grm."""
  methods = results["methods"]
  out = {"mean_test": {}, "mean_code_change": {}, "relative_time": {}}
  for name, m in methods.items():
    rows = m["periods"]
    out["mean_test"][name] = {k: float(np.mean([r["test"][k] for r in rows]))
                              for k in rows[0]["test"]}
    out["mean_code_change"][name] = {k: float(np.mean([r["code_change"][k] for r in rows]))
                                     for k in rows[0]["code_change"] if k != "items"}
  if "ft_grm" in methods:
    base = sum(r["seconds"] for r in methods["ft_grm"]["periods"])
    for name, m in methods.items():
      out["relative_time"][name] = sum(r["seconds"] for r in m["periods"]) / max(base, 1e-9)
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured method across the periods; writes WORKDIR/results.json."""
  mesh = start_run(config, workdir, ("continual.methods", "continual.new_periods"))
  return ContinualRun(config, workdir, mesh).run()


def _fmt(metrics: dict) -> str:
  return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("@10"))
