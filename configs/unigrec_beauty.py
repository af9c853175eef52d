"""UniGRec on Amazon 2014 Beauty.

Settings and presets ("" = the paper's, "cpu" = a 2-core CPU, "smoke" = a few steps per stage):
`genrec_jax.config.unigrec_settings`.
"""

from genrec_jax.config import method_config


def get_config(preset: str = ""):
  return method_config("unigrec", "beauty", preset)
