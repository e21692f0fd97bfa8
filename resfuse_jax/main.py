"""Trains and evaluates a model: ``python -m resfuse_jax.main --config=configs/phantom.py``.

Only parses flags, starts the multi-process runtime when asked, and calls
``train.train_and_evaluate`` (``--folds``: ``train.train_folds``; with ``--plan``:
``planning.planner.plan_and_train``).
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resfuse_jax import cli, train, workdir
from resfuse_jax.planning import planner

FLAGS = flags.FLAGS
ENV_KEYS = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` from explicit flags, the JAX_* environment, or the cluster."""
  explicit = {k: FLAGS[k].value for k in ENV_KEYS if FLAGS[k].value is not None}
  if not explicit and not FLAGS.distributed:
    return
  if not explicit:
    explicit = {k: os.environ[v] for k, v in ENV_KEYS.items() if v in os.environ}
  if explicit and set(explicit) != set(ENV_KEYS):
    missing = sorted(ENV_KEYS[k] for k in set(ENV_KEYS) - set(explicit))
    raise app.UsageError(
      f"a multi-process run needs a coordinator address, process count and process id; "
      f"missing {missing} (or the matching --flags)"
    )
  if explicit:
    jax.distributed.initialize(
      coordinator_address=explicit["coordinator_address"],
      num_processes=int(explicit["num_processes"]),
      process_id=int(explicit["process_id"]),
    )
  else:  # SLURM, Open MPI or a Kubernetes JobSet: JAX reads the cluster's own environment
    jax.distributed.initialize()


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  cli.define_config_flag(
    "Config file or shipped config name, then :model,options, e.g. brats:resfuse or "
    "configs/brats.py:resfuse",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
  flags.DEFINE_bool(
    "distributed",
    False,
    "Start JAX's multi-controller runtime, detecting the cluster (SLURM, Open MPI, Kubernetes "
    "JobSet) or reading JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.",
  )
  flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (implies --distributed)."
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  cli.define_cache_dir_flag()
  flags.DEFINE_string(
    "plan",
    None,
    "Plan the training geometry first: 'auto' (fingerprint the data and measure the step on "
    "this device, as python -m resfuse_jax.plan does) or a plan.json file. Values given as "
    "--config.KEY=... win over the plan; W/plan.json records both. A resumed run keeps W's plan.",
  )
  flags.DEFINE_string(
    "folds",
    None,
    "Cross-validation: 'all' (every fold of config.data.num_folds) or fold numbers such as "
    "0,1, each trained into W/fold_<k>/ (resumable on its own; finished folds are skipped), "
    "then the pooled out-of-fold results and post-processing written to W. Without it, one "
    "run of config.data.fold into W.",
  )
  flags.DEFINE_float(
    "memory_gb", None, "With --plan=auto: the memory budget in GiB (default: the device's)."
  )
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.apply_cache_dir_flag(FLAGS.config)
  initialize_distributed()
  logging.info(
    "JAX process %d/%d, local devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  folds = None
  if FLAGS.folds is not None:
    folds = workdir.parse_folds(FLAGS.folds, FLAGS.config.data.num_folds)
  if FLAGS.plan:
    explicit = config_flags.get_override_values(FLAGS["config"])
    planner.plan_and_train(
      FLAGS.config, FLAGS.workdir, FLAGS.plan, explicit, folds=folds, memory_gb=FLAGS.memory_gb
    )
  elif folds is not None:
    train.train_folds(FLAGS.config, FLAGS.workdir, folds)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
  """Console-script entry point (``resfuse-train``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
