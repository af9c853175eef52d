"""TIGER (Rajput et al., 2023; METHODS.md sections 1 and 3, PROTOCOLS.md section 1).

An RQ-VAE turns every item's content vector into L residual codes plus a dedup digit (its
semantic ID); a T5 encoder-decoder reads the user's history as identifier tokens and generates
the next item's identifier, decoded into items by trie-constrained beam search. Stages: data,
(with `embeddings.source=cf` or `tokenizer.cf_weight` > 0: the SASRec CF model, TIGER-SAS),
tokenizer, recommender.
"""

from __future__ import annotations

import ml_collections

from genrec_jax import stages
from genrec_jax.training.tokenizer import TokenizerRegularizer


def run(config: ml_collections.ConfigDict, workdir: str, collaborative: bool = False,
        regularizer: TokenizerRegularizer | None = None) -> dict:
  """TIGER's two stages; `collaborative` trains the CF model first and `regularizer` adds a
  method's tokenizer terms (LETTER uses both)."""
  mesh = stages.start_run(config, workdir)
  timer = stages.Timer()
  inter, split, results = stages.static_data(config, workdir)
  timer.lap("data")
  cf = None
  if collaborative or config.embeddings.source == "cf" or config.tokenizer.cf_weight > 0:
    cf, sasrec_metrics = stages.cf_model(config, inter, mesh, workdir)
    results["baselines"] = {"sasrec": sasrec_metrics}
    timer.lap("sasrec")
  table, results["tokenizer"], _, _ = stages.item_tokenizer(config, inter, workdir, cf, timer,
                                                            regularizer)
  results.update(stages.generative_recommender(config, table, split, mesh, workdir, timer))
  return stages.finish(results, timer, workdir)
