"""Logging set-up: the library's progress lines at INFO, third-party internals hidden."""

from __future__ import annotations

import logging as py_logging

from absl import logging

_QUIET_SOURCES = ("orbax", "tensorflow_datasets", "etils")


class _QuietThirdParty(py_logging.Filter):
  """Drops INFO/DEBUG records emitted from noisy libraries (Orbax logs every array write)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(f"/{name}/" in record.pathname for name in _QUIET_SOURCES)


def setup_logging() -> None:
  """INFO for genrec_jax progress; Orbax/TFDS internals only from WARNING up."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietThirdParty) for f in handler.filters):
    handler.addFilter(_QuietThirdParty())
  for logger in (py_logging.getLogger("absl"),):
    if not any(isinstance(f, _QuietThirdParty) for f in logger.filters):
      logger.addFilter(_QuietThirdParty())
