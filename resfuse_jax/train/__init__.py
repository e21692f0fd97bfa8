"""Training: ``train_and_evaluate(config, workdir)`` and the step factory it shares.

- ``step``: the pure ``train_step``, the optimiser, and the one step factory
  (``make_step_fn``, ``compile_train_step``, ``init_state``, ``input_shapes``,
  ``train_step_flops``) used by training, the benchmarks and the GPU check;
- ``inputs``: the cache, splits and patch stream of a run (host pipeline or resident);
- ``resident``: crops drawn and cut inside the step from the training set held on the
  devices (``data.resident``);
- ``loop``: steps, logging, validation cadence, checkpoints;
- ``control``: start or resume, preemption (``StopRequest``), non-finite stops;
- ``run``: ``train_and_evaluate``, the named stages, ending in ``evaluation.finalize``;
- ``folds``: ``train_folds``, a cross-validation of ordinary runs and its pooled results.
"""

from resfuse_jax.train.control import StopRequest
from resfuse_jax.train.folds import train_folds
from resfuse_jax.train.run import train_and_evaluate
from resfuse_jax.train.step import (
  NO_NONFINITE_STEP,
  TrainMetrics,
  TrainState,
  compile_train_step,
  init_state,
  input_shapes,
  input_sharding,
  make_optimizer,
  make_step_fn,
  train_step,
  train_step_flops,
)

__all__ = [
  "NO_NONFINITE_STEP",
  "StopRequest",
  "TrainMetrics",
  "TrainState",
  "compile_train_step",
  "init_state",
  "input_sharding",
  "input_shapes",
  "make_optimizer",
  "make_step_fn",
  "train_and_evaluate",
  "train_folds",
  "train_step",
  "train_step_flops",
]
