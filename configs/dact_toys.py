"""DACT and every TIGER-backbone baseline of its paper (continual) on Amazon 2014 Toys.

Settings and presets ("" = the paper's, "cpu" = a 2-core CPU, "smoke" = a few steps per stage):
`genrec_jax.config.continual_settings`.
"""

from genrec_jax.config import method_config


def get_config(preset: str = ""):
  return method_config("continual", "toys", preset)
