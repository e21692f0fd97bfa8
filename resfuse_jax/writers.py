"""Metric writers: TensorBoard event files via tensorboardX, plus the console.

clu's ``metric_writers`` package imports TensorFlow at import time (its
TensorBoard writer is built on ``tf.summary``); pulling TensorFlow into every
install for event files is a ~600 MB dependency for a JAX project. The writer
here keeps clu's MetricWriter method names so it can be swapped back.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import logging


class TensorBoardWriter:
  """clu-compatible ``write_scalars`` / ``write_hparams`` / ``flush`` / ``close``."""

  def __init__(self, logdir: str | Path):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(logdir=str(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    text = "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))
    self._writer.add_text("config", text, global_step=0)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class NullWriter:
  """For processes other than 0, which must not write logs."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    del step, scalars

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create(logdir: str | Path, just_logging: bool) -> TensorBoardWriter | NullWriter:
  if just_logging:
    return NullWriter()
  logging.info("TensorBoard event files go to %s", logdir)
  return TensorBoardWriter(logdir)
