"""Builds the preprocessed cache ahead of training: ``python -m resfuse_jax.preprocess``.

  python -m resfuse_jax.preprocess --config=configs/brats.py \
      --config.data.root=/data/BraTS2023 --workers=8

Training builds (or reuses) the same cache by itself; running this first lets
a cluster job start training at once. Interrupted runs resume. A cached case
whose arrays do not match their recorded shape, dtype, size and (the first time a
process opens it) SHA-256 is rebuilt; ``--verify`` checks every hash again.
"""

from __future__ import annotations

from absl import app, flags

from resfuse_jax import cli, data, files, workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  cli.define_config_flag("Config file or shipped config name, e.g. brats or configs/brats.py")
  flags.DEFINE_integer("workers", None, "Parallel processes (default: data.preprocess_workers).")
  flags.DEFINE_bool(
    "verify",
    False,
    "Check every cached array against its SHA-256 again (each is checked once per process anyway); rebuild those that differ.",
  )
  cli.define_cache_dir_flag()
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.apply_cache_dir_flag(FLAGS.config)
  out, good, bad = data.prepare(FLAGS.config.data, workers=FLAGS.workers, verify=FLAGS.verify)
  if bad:
    files.write_json(out / workdir.BAD_CASES, bad)
  print(
    f"{len(good)} cases ready in {out}"
    + (f"; {len(bad)} skipped, see {out / workdir.BAD_CASES}" if bad else "")
  )


def run():
  """Console-script entry point (``resfuse-preprocess``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
