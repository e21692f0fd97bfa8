"""Label maps for new scans, written in each input's own grid, affine and orientation.

  python -m resfuse_jax.predict --workdir=W --pre=t1n.nii.gz --post=t1c.nii.gz --out=seg.nii.gz
  python -m resfuse_jax.predict --workdir=W --input=DIR --output=OUT [--tta] [--probabilities]

``--input`` is a folder in the layout of the training dataset (BraTS 2023 case folders, or the
MAMA-MIA ``images/`` tree) or a CSV manifest; segmentations are not needed. BraTS outputs are
named ``BraTS-GLI-XXXXX-YYY.nii.gz`` as the challenge expects.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from absl import app, flags, logging
from scipy import ndimage

from resfuse_jax import checkpointing, data, inference, models
from resfuse_jax.data import brats, breast, geometry, manifest
from resfuse_jax.train import TrainState, make_optimizer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("pre", None, "Pre-contrast NIfTI of one case.")
flags.DEFINE_string("post", None, "Post-contrast NIfTI of one case.")
flags.DEFINE_string("out", None, "Output label map for --pre/--post.")
flags.DEFINE_string("input", None, "Folder (dataset layout) or CSV manifest of cases.")
flags.DEFINE_string("output", None, "Output folder for --input.")
flags.DEFINE_bool("tta", False, "Mirroring test-time augmentation over all axes (8 passes).")
flags.DEFINE_bool("probabilities", False, "Also write <name>_probabilities.nii.gz [D,H,W,R].")


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
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
      raise data.DataError(f"{workdir} is not a training workdir: {config_path} is missing")
    self.config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    self.info = data.dataset_info(self.config.data.name)
    model = models.build(self.config.model, len(self.info.regions))
    tx = make_optimizer(self.config.train)
    patch = tuple(self.config.data.patch_size)

    def init(rng):
      x = jnp.zeros((1, *patch, 1))
      params = model.init(rng, x, x)["params"]
      return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    abstract = jax.eval_shape(init, jax.random.key(0))
    manager = checkpointing.make_manager(workdir / "checkpoints", keep=1)
    step = manager.latest_step() if step is None else step
    if step is None:
      raise data.DataError(f"no checkpoint under {workdir / 'checkpoints'}")
    self.step = step
    self.params = checkpointing.restore_params(manager, step, abstract).params
    manager.close()
    self._forward = jax.jit(
      lambda p, t: jax.nn.sigmoid(model.apply({"params": p}, t[..., 0:1], t[..., 1:2]))
    )

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

  def predict_case(self, files: data.CaseFiles, out: Path, tta: bool, write_probs: bool) -> None:
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
    if write_probs:
      maps = np.stack(
        [geometry.to_original_grid(probs[..., r], case) for r in range(probs.shape[-1])], -1
      )
      name = out.name.removesuffix(".nii.gz")
      nib.save(
        nib.Nifti1Image(maps.astype(np.float32), case.affine),
        str(out.with_name(f"{name}_probabilities.nii.gz")),
      )


def find_input_cases(path: Path, config: Any) -> list[data.CaseFiles]:
  """Cases of a prediction input: a manifest CSV, or a folder in the training layout."""
  if path.suffix.lower() == ".csv":
    return manifest.find_cases(path, require_label=False)
  if config.data.name == "breast":
    return breast.find_cases(path, config.data.get("post_phase", 1), require_label=False)
  if config.data.name in ("brats", "phantom"):
    return brats.find_cases(path, require_label=False)
  raise data.DataError(
    f"--input={path}: a model trained on {config.data.name!r} data predicts folders of a CSV "
    "manifest (case_id,pre,post,label with an empty label column)"
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  pair, folder = FLAGS.pre or FLAGS.post or FLAGS.out, FLAGS.input or FLAGS.output
  if not FLAGS.workdir or bool(pair) == bool(folder):
    raise app.UsageError("give --workdir and either --pre/--post/--out or --input/--output")
  try:
    predictor = Predictor(FLAGS.workdir, FLAGS.step)
    if pair:
      if not (FLAGS.pre and FLAGS.post and FLAGS.out):
        raise app.UsageError("--pre, --post and --out go together")
      files = data.CaseFiles(Path(FLAGS.pre).name, Path(FLAGS.pre), Path(FLAGS.post), None)
      for p in (files.pre, files.post):
        if not p.is_file():
          raise data.DataError(f"input file {p} not found")
      predictor.predict_case(files, Path(FLAGS.out), FLAGS.tta, FLAGS.probabilities)
      print(f"wrote {FLAGS.out}")
      return
    if not FLAGS.output:
      raise app.UsageError("--input needs --output")
    cases = find_input_cases(Path(FLAGS.input), predictor.config)
    for i, files in enumerate(cases, 1):
      out = Path(FLAGS.output) / f"{files.case_id}.nii.gz"
      predictor.predict_case(files, out, FLAGS.tta, FLAGS.probabilities)
      logging.info("[%d/%d] %s -> %s", i, len(cases), files.case_id, out)
    print(f"wrote {len(cases)} label maps to {FLAGS.output} (checkpoint step {predictor.step})")
  except data.DataError as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")


def run():
  """Console-script entry point (``resfuse-predict``)."""
  app.run(main)


if __name__ == "__main__":
  run()
