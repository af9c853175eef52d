"""TIGER on Amazon 2014 Beauty: RQ-VAE over MiniLM item text (title + categories), then T5.

Presets: default = paper settings (4+4 layers, d_model 128, d_ff 1024, lr 1e-4, batch 256, up to
200 epochs, patience 15, beam 20); "cpu" = a small model for a 2-core CPU (~15 minutes).
"""

from genrec_jax.config import apply_preset, base_config, dataset_paths


def get_config(preset: str = ""):
  c = base_config()
  c.method = "tiger"
  dataset_paths(c, "beauty")
  return apply_preset(c, preset)
