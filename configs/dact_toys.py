"""DACT and every TIGER-backbone baseline of its paper on Amazon 2014 Toys (continual).

The settings and presets ("" = the paper, "cpu" = a 2-core CPU) are those of
`genrec_jax.config.dact_config`.
"""

from genrec_jax.config import dact_config


def get_config(preset: str = ""):
  return dact_config("toys", preset)
