"""A trained model loaded from a workdir, and region probabilities -> label maps.

Shared by ``predict`` (new scans) and ``evaluate`` (validation cases).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from scipy import ndimage

from resfuse_jax import checkpointing, data, exported, inference, visualize
from resfuse_jax.data import geometry
from resfuse_jax.train import TrainState, build_model, make_optimizer


def region_label_values(regions: dict[str, tuple[int, ...]]) -> list[int]:
  """The label each region paints: its values not covered by the next (nested) region.

  BraTS: WT={1,2,3} -> 2, TC={1,3} -> 1, ET={3} -> 3; a single lesion region -> 1.
  """
  names = list(regions)
  out = []
  for i, name in enumerate(names):
    rest = set(regions[name]) - (set(regions[names[i + 1]]) if i + 1 < len(names) else set())
    out.append(min(rest))
  return out


def probabilities_to_labels(
  probs: np.ndarray,
  regions: dict[str, tuple[int, ...]],
  thresholds: list[float] | None = None,
  min_component_voxels: int = 0,
) -> np.ndarray:
  """[D, H, W, R] region probabilities -> [D, H, W] uint8 labels, outer regions painted first."""
  thresholds = thresholds or [0.5] * probs.shape[-1]
  labels = np.zeros(probs.shape[:3], np.uint8)
  for r, value in enumerate(region_label_values(regions)):
    mask = probs[..., r] > thresholds[r]
    if min_component_voxels > 0 and mask.any():
      comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
      sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
      mask = np.isin(comp, np.flatnonzero(sizes >= min_component_voxels) + 1)
    labels[mask] = value
  return labels


class Predictor:
  """A trained model from a workdir, with one compiled window function for all cases."""

  def __init__(self, workdir: str | Path, step: int | None = None):
    """``workdir``: a training workdir, or an export folder (``python -m resfuse_jax.export``)."""
    workdir = Path(workdir)
    is_export = exported.is_export(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
      raise data.DataError(
        f"{workdir} is neither a training workdir nor an export: {config_path} is missing"
      )
    if is_export:
      self.config = exported.load_config(workdir)
    else:
      self.config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    self.info = data.dataset_info(self.config.data.name)
    model = build_model(self.config, len(self.info.regions))
    tx = make_optimizer(self.config.train)
    patch = tuple(self.config.data.patch_size)

    def init(rng):
      x = jnp.zeros((1, *patch, 1))
      params = model.init(rng, x, x)["params"]
      return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    # Restore onto this machine's first device, whatever topology trained the model.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(init, jax.random.key(0)),
    )
    if is_export:
      self.step = int(exported.metadata(workdir)["step"])
      if step is not None and step != self.step:
        raise data.DataError(f"{workdir} is an export of step {self.step}, not {step}")
      self.params = exported.load_params(workdir, abstract.params)
    else:
      manager = checkpointing.make_manager(workdir / "checkpoints", keep=1)
      step = manager.latest_step() if step is None else step
      if step is None:
        raise data.DataError(f"no checkpoint under {workdir / 'checkpoints'}")
      self.step = step
      self.params = checkpointing.restore_params(manager, step, abstract).params
      manager.close()
    self.model = model
    self._intermediates = jax.jit(
      lambda p, t: model.apply({"params": p}, t[..., 0:1], t[..., 1:2], mutable=["intermediates"])[
        1
      ]
    )
    self._forward = jax.jit(self.forward)

  def forward(self, params, tiles: jax.Array) -> jax.Array:
    """tiles [N, d, h, w, 2] (pre, post) -> region probabilities [N, d, h, w, R]."""
    return jax.nn.sigmoid(self.model.apply({"params": params}, tiles[..., 0:1], tiles[..., 1:2]))

  def fusion_heat(self, case: data.Case) -> np.ndarray | None:
    """Where the auxiliary branch changes the main one (ResFuse only), on the case's grid."""
    if self.config.model.name != "resfuse":
      return None
    window = tuple(self.config.data.patch_size)
    volume = np.stack([case.pre, case.post], axis=-1)
    shape = volume.shape[:3]
    padded = tuple(max(s, w) for s, w in zip(shape, window))
    volume = np.pad(volume, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])
    mags = None
    for start in inference.window_starts(padded, window, 0.0):
      sl = tuple(slice(a, a + w) for a, w in zip(start, window))
      sown = self._intermediates(self.params, volume[sl][None])["intermediates"]["encoder"]
      tile = visualize.fusion_magnitudes(jax.device_get(sown), window)
      if mags is None:
        mags = np.zeros((len(tile), *padded), np.float32)
      mags[(slice(None), *sl)] = tile
    heat = visualize.fusion_heat_map(mags)
    return heat[: shape[0], : shape[1], : shape[2]]

  def window_fn(self) -> Callable[[np.ndarray], np.ndarray]:
    return lambda tiles: np.asarray(self._forward(self.params, tiles))

  def probabilities(self, case: data.Case, tta: bool = False) -> np.ndarray:
    volume = np.stack([case.pre, case.post], axis=-1)
    return inference.sliding_window(
      self.window_fn(),
      volume,
      self.config.data.patch_size,
      len(self.info.regions),
      overlap=self.config.eval.overlap,
      batch_size=self.config.eval.batch_size,
      mirror_axes=(0, 1, 2) if tta else (),
    )

  def predict_case(
    self, files: data.CaseFiles, out: Path, tta: bool, write_probs: bool, figure: bool = False
  ) -> None:
    case = data.preprocess_case(files, self.info.label_values, data.prep_settings(self.config.data))
    probs = self.probabilities(case, tta)
    labels = probabilities_to_labels(
      probs,
      self.info.regions,
      list(self.config.eval.get("thresholds", None) or []) or None,
      self.config.eval.get("min_component_voxels", 0),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    geometry.save_label_map(labels, case, out)
    name = out.name.removesuffix(".nii.gz")
    if figure:
      visualize.case_figure(
        out.with_name(f"{name}.png"),
        files.case_id,
        case.pre,
        case.post,
        labels,
        heat=self.fusion_heat(case),
        brats_colours=len(self.info.regions) > 1,
      )
    if write_probs:
      maps = np.stack(
        [geometry.to_original_grid(probs[..., r], case) for r in range(probs.shape[-1])], -1
      )
      nib.save(
        nib.Nifti1Image(maps.astype(np.float32), case.affine),
        str(out.with_name(f"{name}_probabilities.nii.gz")),
      )
