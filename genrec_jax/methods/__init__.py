"""Methods, one module each: the method's own math and how its stages compose.

`config.method` selects a module through `REGISTRY`; every module has
`run(config, workdir) -> results` and writes WORKDIR/results.json. Stages shared by several
methods (data, CF model, tokenizer, recommender, results) are library functions in
`genrec_jax.stages`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import ml_collections

from genrec_jax.config import ConfigError

# config.method -> module of genrec_jax.methods ("continual": DACT with its baselines).
REGISTRY = {"tiger": "tiger", "letter": "letter", "sasrec": "sasrec", "continual": "dact",
            "etegrec": "etegrec", "unigrec": "unigrec", "pit": "pit"}


def method_module(name: str) -> ModuleType:
  """The module of method `name`, imported on first use."""
  if name not in REGISTRY:
    raise ConfigError(f"method={name!r} is not one of {tuple(REGISTRY)}")
  return importlib.import_module(f"genrec_jax.methods.{REGISTRY[name]}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.method` in WORKDIR; returns its results (also in WORKDIR/results.json)."""
  return method_module(config.method).run(config, workdir)
