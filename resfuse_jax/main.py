"""Trains and evaluates a model: ``python -m resfuse_jax.main --config=configs/phantom.py``.

Only parses flags, starts the multi-process runtime when asked, and calls
``train.train_and_evaluate``.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resfuse_jax import cli, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/brats.py:resfuse", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() (SLURM, Kubernetes or the "
  "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info(
    "JAX process %d/%d, local devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
  """Console-script entry point (``resfuse-train``)."""
  cli.run(main)


if __name__ == "__main__":
  run()
