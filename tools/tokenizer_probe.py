"""Trains only the tokenizer of a config and reports its identifier diagnostics.

The quick way to compare tokenizer settings (loss scale, residual gradient, training length)
without training a recommender: per-level code usage and perplexity, the collision rate before
the dedup digit, the largest dedup digit and the training time, as one JSON line per run.

  python tools/tokenizer_probe.py --config=configs/tiger_toys.py:cpu \
      --config.tokenizer.detach_residual=False --json_out=experiments/tokenizer_probes.jsonl

Configs whose tokenizer needs collaborative embeddings (cf_weight > 0, embeddings.source=cf)
are out of scope: use the pipeline, which trains the CF model first.
"""

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from genrec_jax.config import check_config
from genrec_jax.logs import setup_logging
from genrec_jax.stages import item_features, load_dataset, rqvae_config, tokenizer_train_config
from genrec_jax.training.tokenizer import assign_identifiers, final_temperature, train_tokenizer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally `path:preset`.",
                                lock_config=True)
flags.DEFINE_string("json_out", "", "Append the result as one JSON line to this file.")
flags.DEFINE_string("label", "", "Free-text label stored with the result.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  setup_logging()
  config = FLAGS.config
  check_config(config)
  if config.tokenizer.cf_weight > 0 or config.embeddings.source == "cf":
    raise app.UsageError("the probe trains tokenizers without CF embeddings; use the pipeline")
  inter = load_dataset(config, "/tmp")
  features = item_features(config, inter.item_ids, None)
  train_cfg = tokenizer_train_config(config)
  start = time.time()
  model, train_stats = train_tokenizer(rqvae_config(config, features.shape[1]),
                                       train_cfg, features,
                                       seed=config.seed)
  _, stats = assign_identifiers(model, features, config.tokenizer.dedup_size,
                                final_temperature(train_cfg))
  t = config.tokenizer
  result = {
      "label": FLAGS.label, "dataset": config.data.name, "seed": config.seed,
      "tokenizer": {k: t[k] for k in ("loss_reduction", "detach_residual", "train_length",
                                      "train_unit", "learning_rate", "batch_size",
                                      "num_levels", "codebook_size", "soft",
                                      "temperature_start", "temperature_end",
                                      "uniformity_weight")},
      "steps": train_stats["steps"], "seconds": round(time.time() - start, 1),
      "collision_rate": stats["collision_rate"], "max_dedup_digit": stats["max_dedup_digit"],
      "code_usage": stats["code_usage"], "code_perplexity": stats["code_perplexity"],
      "final_losses": train_stats["final_losses"]}
  print(json.dumps(result))
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    with open(FLAGS.json_out, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)
