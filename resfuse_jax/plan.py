"""Plans the training geometry from the data and the device: ``python -m resfuse_jax.plan``.

  python -m resfuse_jax.plan --config=configs/manifest.py \
      --config.data.manifest=/data/inhouse/cases.csv --memory_gb=24 --output=plan.json

Fingerprints the dataset (cached beside the preprocessed cache), derives target spacing,
patch, pooling per axis, features and batch after nnU-Net v2's rules, and checks that the
step fits by compiling it (XLA's memory analysis) and, on a CPU, timing one step. Values
given as ``--config.KEY=...`` are kept. Train with it: ``main --plan=plan.json``.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from resfuse_jax import cli, workdir
from resfuse_jax.planning import planner

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  cli.define_config_flag("Config file or shipped config name, e.g. manifest")
  flags.DEFINE_float(
    "memory_gb",
    None,
    "Memory budget in GiB (default: 0.85 x the device's own limit: bytes_limit on a GPU, "
    "available RAM on a CPU), minus the training set when it will be device-resident.",
  )
  flags.DEFINE_string("output", workdir.PLAN, "Where to write the plan (JSON).")
  flags.DEFINE_float(
    "max_step_s",
    planner.DEFAULT_MAX_STEP_S,
    "On a CPU: the longest training step the plan may choose, in seconds (0: no cap).",
  )
  cli.define_cache_dir_flag()
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.apply_cache_dir_flag(FLAGS.config)
  planner.plan_to_file(
    FLAGS.config,
    FLAGS.output,
    memory_gb=FLAGS.memory_gb,
    max_step_s=FLAGS.max_step_s,
    explicit=config_flags.get_override_values(FLAGS["config"]),
  )


def run():
  """Console-script entry point (``resfuse-plan``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
