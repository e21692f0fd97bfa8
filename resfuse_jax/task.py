"""Config -> parts: the one place that knows which parts a config means.

``Task.from_config(config)`` gives the dataset (regions, label values), the model
(built through the models registry in the config's compute dtype and conv plan),
the augmentation, the window and crop, the preprocessing settings and the loss
weights. Training, evaluation, inference, serving and the benchmarks take their
parts from here; the training step itself is assembled by ``train.step`` (which
adds the optimiser and the loss, neither of which inference may import).

The config must be complete: ``config_lib.load`` gives complete configs, and
``workdir.read_config`` fills an older ``config.json`` (``config_lib.fill_defaults``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import ml_collections

from resfuse_jax import augment, data, models
from resfuse_jax.models import convolution


@dataclasses.dataclass(frozen=True)
class Task:
  """The parts of one run, all read from ``config``."""

  config: ml_collections.ConfigDict
  dataset: data.Dataset
  model: nn.Module
  compute_dtype: Any
  conv_plan: convolution.ConvPlan
  augmentation: augment.Spec

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Task:
    """Unknown dataset, model, dtype or conv choices raise ``ConfigError`` naming the valid."""
    dataset = data.get_dataset(config.data.name)
    dtype = models.compute_dtype(config.train)
    return cls(
      config=config,
      dataset=dataset,
      model=models.build(config.model, len(dataset.regions), dtype),
      compute_dtype=dtype,
      conv_plan=convolution.resolve_conv_plan(config.model),
      augmentation=augment.spec_from_config(config.data.augment),
    )

  @property
  def regions(self) -> dict[str, tuple[int, ...]]:
    """Region name -> the label values it covers (nested, outer first)."""
    return self.dataset.regions

  @property
  def region_values(self) -> tuple[tuple[int, ...], ...]:
    """The regions as the loss takes them: one tuple of label values per output channel."""
    return tuple(self.dataset.regions.values())

  @property
  def region_names(self) -> list[str]:
    return self.dataset.region_names

  @property
  def patch_size(self) -> tuple[int, ...]:
    """The training patch, which is also the sliding window of inference."""
    return tuple(int(s) for s in self.config.data.patch_size)

  @property
  def crop_shape(self) -> tuple[int, ...]:
    """The host crop the training step takes: the patch plus augmentation's margin."""
    return self.augmentation.crop_shape(self.patch_size)

  @property
  def aux_loss_weight(self) -> float:
    """Weight of each auxiliary output's loss (A2FNet, TSF-Seq2Seq, LiTS)."""
    return float(self.config.train.aux_loss_weight)

  @property
  def prep_settings(self) -> data.PrepSettings:
    """How scans are cropped, resampled and normalised (training and prediction alike)."""
    return data.prep_settings(self.config.data)

  @property
  def input_limits(self) -> data.InputLimits:
    return data.input_limits(self.config.data)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The config's model for its dataset's regions, in ``train.compute_dtype``."""
  return Task.from_config(config).model
