"""PIT on Amazon 2014 Toys.

Settings and presets ("" = the paper's where known, else ours; "cpu" = a 2-core CPU, "smoke" =
a few steps per stage): `genrec_jax.config.pit_settings`.
"""

from genrec_jax.config import method_config


def get_config(preset: str = ""):
  return method_config("pit", "toys", preset)
