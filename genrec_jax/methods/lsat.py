"""LSAT: long- and short-term LoRA adapters (a continual baseline of DACT Table 3).

LSAT (Shi et al. 2024, "Preliminary study on incremental learning for LLM-based recommender
systems") keeps two adapters on the frozen LLM, with the tokenizer and the identifiers fixed
(DACT runs it with a frozen tokenizer):
- the long-term adapter is trained on all periods so far (METHODS.md; the DACT paper:
  "cumulatively updating another LoRA module for long-term preferences"): in period t it
  continues from period t-1's on D_0..D_t with the epoch budget of training on all data
  (`continual.retrain_epochs`; `continual.lsat.long_term_data="all"`, the default). "period"
  continues it on D_t alone, which makes it the ft_grm model;
- the short-term adapter is trained from scratch on D_t alone: the initial adapters (B zero, a
  neutral update; the A every adapter of the run starts from) on the period-0 model;
- inference combines them (`continual.lsat.combine`): "merge" averages the two entry-wise,
  weight * long + (1 - weight) * short (`lora.merge_adapters`), or "scores" mixes the two
  models' log-probabilities at every decoding step with the same weights.

Our choices where LSAT (which used text prompts and no added tokens) is silent: the identifier
rows train with each adapter, as the adapters do, and "merge" merges them entry-wise as well;
the short-term adapter starts from the period-0 model's identifier rows. The long-term
parameters are what the next period continues from.
"""

from __future__ import annotations

from genrec_jax.recommenders.lora import merge_adapters
from genrec_jax.tokenizers.identifiers import IdentifierTable
from genrec_jax.training.lcrec import FINE_TUNED


def adapt(run, name: str, table: IdentifierTable, t: int, long_params, base_params):
  """Period t of the `lsat` row of a continual run (`methods.dact.ContinualRun`) ->
  (long-term params, rank: samples -> rankings int [S, beam], training seconds)."""
  cfg = run.config.continual.lsat
  recommender = run.recommender
  long_params, long_seconds = run.train_grm(
      name, table, t, long_params, "finetune", cumulative=cfg.long_term_data == "all")
  fresh = recommender.with_adapters(base_params, recommender.adapters(recommender.init_params))
  short_params, short_seconds = run.train_grm(f"{name}_short", table, t, fresh, "finetune")
  if cfg.combine == "merge":
    merged = {**long_params, **{g: merge_adapters(long_params[g], short_params[g], cfg.weight)
                                for g in FINE_TUNED}}

    def rank(samples):
      return recommender.rank(merged, table, run.num_items, samples)
  else:
    def rank(samples):
      return recommender.rank_mixture((long_params, short_params),
                                      (cfg.weight, 1.0 - cfg.weight), table, run.num_items,
                                      samples)
  return long_params, rank, long_seconds + short_seconds
