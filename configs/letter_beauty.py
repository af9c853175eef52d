"""LETTER-TIGER on Amazon 2014 Beauty: RQ-VAE with collaborative and diversity regularization.

SASRec (CE, 32-d) is trained first; its item embeddings are the collaborative signal of the
InfoNCE term (alpha = 0.02 as in DACT's base tokenizer; LETTER searches 0.01-0.1) and it is
reported as the discriminative baseline. Diversity weight 1e-4 (LETTER). 4 code levels as in
LETTER's paper. Presets as in tiger_beauty.py.
"""

from genrec_jax.config import apply_preset, base_config, dataset_paths


def get_config(preset: str = ""):
  c = base_config()
  c.method = "letter"
  dataset_paths(c, "beauty")
  c.tokenizer.num_levels = 4
  c.tokenizer.selection = "min_collision"  # the LETTER code keeps the lowest-collision model
  c.tokenizer.loss_reduction = "mean"  # the LETTER code: F.mse_loss, RQ loss averaged over levels
  c.tokenizer.cf_weight = 0.02
  c.tokenizer.diversity_weight = 1e-4
  c.tokenizer.sinkhorn_epsilon = 0.003  # LETTER: balanced last-level codes while training
  return apply_preset(c, preset)
