"""SASRec (Kang and McAuley, 2018), the discriminative baseline: a causal self-attention model
over item embeddings ranked against the full catalog, trained with full-softmax
cross-entropy (`sasrec.loss="ce"`) or the original one-negative BCE ("bce").
"""

from __future__ import annotations

import ml_collections

from genrec_jax import stages


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = stages.start_run(config, workdir)
  timer = stages.Timer()
  inter, _, results = stages.static_data(config, workdir)
  timer.lap("data")
  _, results["metrics"] = stages.cf_model(config, inter, mesh, workdir)
  timer.lap("sasrec")
  return stages.finish(results, timer, workdir)
