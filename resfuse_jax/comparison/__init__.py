"""Trains and compares models on one dataset (``python -m resfuse_jax.compare``).

Every model gets the config file's settings with only the model changed (the
same data, fold, budget, seed and command-line overrides) and trains into
``W/<model>/``; a model whose workdir holds the same run finished is not
retrained (``workdir.Workdir.finished_run``), one that was interrupted resumes.
Only training's own files are read (results and per-case rows, never an
``evaluate`` folder). Writes the comparison as JSON and Markdown: per model the
parameter count, training FLOPs per step (XLA cost analysis), Dice and recall per
region (mean ± std over validation cases), and a paired Wilcoxon signed-rank test
per region against ``resfuse`` across cases. ``seeds=[0, 1, 2]`` trains each
model once per seed and averages every case's metrics over the seeds before the
statistics (reporting the seed spread too).

- ``runs``: ``compare``, ``run_model`` and the statistics;
- ``markdown``: the paper-layout tables of a comparison and of a sweep;
- ``sweep``: the same comparison at every value of one config field.
"""

from resfuse_jax.comparison.markdown import comparison_markdown, sweep_markdown
from resfuse_jax.comparison.runs import (
  EXTRA_METRICS,
  METRICS,
  compare,
  paired_test,
  run_model,
  seed_averaged,
  summarize,
)
from resfuse_jax.comparison.sweep import parse_sweep, sweep, sweep_folder, sweep_record

__all__ = [
  "EXTRA_METRICS",
  "METRICS",
  "compare",
  "comparison_markdown",
  "paired_test",
  "parse_sweep",
  "run_model",
  "seed_averaged",
  "summarize",
  "sweep",
  "sweep_folder",
  "sweep_markdown",
  "sweep_record",
]
