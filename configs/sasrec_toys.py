"""SASRec on Amazon 2014 Toys: the discriminative full-catalog baseline (full-softmax CE).

64-d, 2 blocks, max length 50; leave-one-out with the same metrics as the generative models.
Presets: default = up to 200 epochs (patience 5 evaluations); "cpu" = 30 epochs (~11 minutes).
"""

from genrec_jax.config import apply_preset, base_config, dataset_paths


def get_config(preset: str = ""):
  c = base_config()
  c.method = "sasrec"
  dataset_paths(c, "toys")
  c.sasrec.hidden_dim = 64
  c.sasrec.num_heads = 2
  apply_preset(c, preset)
  if preset == "cpu":  # SASRec alone: spend the CPU budget on it (~20 s per epoch)
    c.sasrec.epochs = 30
  return c
