"""Trains and compares models on one dataset: ``python -m resfuse_jax.compare``.

  python -m resfuse_jax.compare --config=configs/phantom.py \
      --models=resfuse,resunet,resunet_early,a2fnet,tsf_seq2seq,lits --workdir=runs/compare
  python -m resfuse_jax.compare --config=configs/phantom.py --models=resfuse,resunet_early \
      --sweep=data.misregistration_mm=0,2.25,4.5 --seeds=0,1,2 --workdir=runs/sweep
  python -m resfuse_jax.compare --config=configs/brats.py --models=resfuse,resunet \
      --folds=all --workdir=runs/cv   # every model a 5-fold cross-validation

What it trains, reads and writes: ``resfuse_jax.comparison``.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from resfuse_jax import cli, comparison, workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called by `run`: importing this module for its functions defines no flags."""
  cli.define_config_flag(
    "Dataset config file or shipped config name, e.g. brats (its model arg is ignored)."
  )
  flags.DEFINE_list("models", None, "Models to compare, e.g. resfuse,resunet,a2fnet.")
  flags.DEFINE_string("workdir", None, "Folder for one workdir per model and the comparison.")
  flags.DEFINE_string("reference", "resfuse", "Model the paired tests compare against.")
  flags.DEFINE_list(
    "seeds",
    None,
    "Train every model once per seed (W/<model>/seed<k>/) and average each case's metrics "
    "over seeds; default: the config's seed, in W/<model>/.",
  )
  flags.DEFINE_string(
    "sweep",
    None,
    "<config field>=<v1>,<v2>,...: compare the models at every value, e.g. "
    "data.misregistration_mm=0,1.5,3 (W/<field>=<value>/, the config's own value in W/default/); "
    "writes W/sweep.json, W/sweep.md and W/sweep.png.",
  )
  flags.DEFINE_string(
    "folds",
    None,
    "'all' or fold numbers such as 0,1: every model (and seed) is a cross-validation of these "
    "folds (W/<model>/fold_<k>/, as main --folds), compared over the pooled out-of-fold cases "
    "with the paired test over all of them; default: one run of config.data.fold.",
  )
  flags.mark_flags_as_required(["config", "models", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  spec = config_flags.get_config_filename(FLAGS["config"])
  overrides = config_flags.get_override_values(FLAGS["config"])
  try:
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
  except ValueError:
    raise app.UsageError(f"--seeds must be integers, e.g. 0,1,2; got {FLAGS.seeds}") from None
  folds = None
  if FLAGS.folds is not None:
    folds = workdir.parse_folds(FLAGS.folds, FLAGS.config.data.num_folds)
  if FLAGS.sweep:
    out = comparison.sweep(
      spec, FLAGS.models, FLAGS.workdir, FLAGS.sweep, overrides, FLAGS.reference, seeds, folds
    )
    print(comparison.sweep_markdown(out))
    return
  out = comparison.compare(
    spec, FLAGS.models, FLAGS.workdir, overrides, FLAGS.reference, seeds, folds
  )
  print(comparison.comparison_markdown(out))


def run():
  """Console-script entry point (``resfuse-compare``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
