"""Entry point: `python -m genrec_jax.main --config=configs/tiger_toys.py:cpu --workdir=DIR`.

Any config field can be overridden, e.g. `--config.grm.epochs=5 --config.seed=1`. Running again
with the same workdir resumes from the last checkpoint of the interrupted stage.
"""

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from genrec_jax.config import ConfigError
from genrec_jax.data import DataError
from genrec_jax.logs import setup_logging
from genrec_jax import methods
from genrec_jax.training.sharding import use_cpu_devices

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally `path:preset`.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_logging()
  use_cpu_devices(FLAGS.config.cpu_devices)
  if FLAGS.config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.config.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    methods.run(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DataError) as error:  # a mistake in the input: one line, no traceback
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
