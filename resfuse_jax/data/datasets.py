"""The dataset registry: a name -> where its cases are, its regions and its label set.

Every dataset is read through one of the readers (``brats``, ``breast``,
``manifest``); the phantom is written in the BraTS layout first and read back
through the BraTS reader, so it exercises the real path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resfuse_jax import files as file_io
from resfuse_jax.data import brats, breast, manifest, phantom
from resfuse_jax.data.common import CaseFiles
from resfuse_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What the rest of the package needs to know about one dataset.

  ``find_cases(data_config, require_label)`` lists the configured collection;
  ``find_inputs(path, data_config)`` lists a folder in the same layout for
  prediction (no labels needed); ``cache_tag(data_config)`` names its cache folder.
  """

  name: str
  regions: dict[str, tuple[int, ...]]  # region name -> label values it covers (nested)
  label_values: tuple[int, ...]
  find_cases: Callable[[Any, bool], list[CaseFiles]]
  find_inputs: Callable[[Path, Any], list[CaseFiles]]
  cache_tag: Callable[[Any], str]
  label_names: dict[int, str] = dataclasses.field(default_factory=dict)  # value -> what it marks

  @property
  def region_names(self) -> list[str]:
    return list(self.regions)

  @property
  def brats_like(self) -> bool:
    """WT/TC/ET regions: BraTS label nesting, colours and lesion-wise metrics apply."""
    return self.region_names == list(brats.REGIONS)


def default_cache_dir() -> Path:
  return Path(os.environ.get("RESFUSE_CACHE", Path.home() / ".cache" / "resfuse_jax"))


def phantom_name(cfg: Any) -> str:
  """The phantom's cache folder name: its spec."""
  shape = "x".join(str(s) for s in cfg.phantom_shape)
  knobs = "".join(f"-{k}{v:g}" for k, v in phantom_spec(cfg).knobs().items())
  return f"phantom-seed{cfg.phantom_seed}-n{cfg.phantom_cases}-{shape}{knobs}"


def phantom_root(cfg: Any) -> Path:
  """The phantom's folder: ``data.root`` or a cache folder named by its spec."""
  if cfg.root:
    return Path(cfg.root)
  return default_cache_dir() / phantom_name(cfg)


def holds_phantom(root: str | Path, cfg: Any) -> bool:
  """``root`` holds the complete phantom ``cfg`` describes (reading it writes nothing)."""
  marker = Path(root) / phantom.MARKER
  try:
    return bool(root) and json.loads(marker.read_text()) == phantom_spec(cfg).key()
  except (OSError, ValueError):
    return False


def phantom_spec(cfg: Any) -> phantom.PhantomSpec:
  """The phantom ``data`` describes; its acquisition knobs are ``data.<knob>``."""
  return phantom.PhantomSpec(
    num_cases=cfg.phantom_cases,
    shape=tuple(cfg.phantom_shape),
    seed=cfg.phantom_seed,
    **{k: float(cfg[k]) for k in phantom.KNOBS},
  )


def _phantom_cases(cfg: Any, require_label: bool) -> list[CaseFiles]:
  root = phantom.write_phantom(phantom_root(cfg), phantom_spec(cfg))
  return brats.find_cases(root, require_label)


def _manifest_inputs(path: Path, cfg: Any) -> list[CaseFiles]:
  del cfg
  if path.suffix.lower() != ".csv":
    raise DataError(
      f"--input={path}: a model trained on a manifest predicts cases listed in a CSV manifest "
      "(case_id,pre,post,label with an empty label column)"
    )
  return manifest.find_cases(path, require_label=False)


PREDICT_LAYOUTS = {  # what ``predict --input`` expects, per dataset (training's data.root aside)
  "brats": (
    lambda path: any(p.is_dir() and p.name.startswith("BraTS-") for p in path.iterdir()),
    "BraTS case folders <input>/BraTS-GLI-XXXXX-YYY/ each with BraTS-GLI-XXXXX-YYY-t1n.nii.gz "
    "and -t1c.nii.gz",
  ),
  "breast": (
    lambda path: (path / "images").is_dir(),
    "the MAMA-MIA layout <input>/images/<ID>/<ID>_0000.nii.gz (pre) and <ID>_0001.nii.gz (post)",
  ),
}
PREDICT_ALTERNATIVES = (
  "a CSV manifest (case_id,pre,post) as --input=cases.csv, a folder of DICOM studies (one "
  "per case) with --pre_series and --post_series, or one case with "
  "--pre=PRE.nii.gz --post=POST.nii.gz --out=SEG.nii.gz"
)


def _folder_inputs(layout: str, find: Callable[[Path, Any], list[CaseFiles]]) -> Callable:
  """``find_inputs`` that first checks the folder's layout and words it as predict's flags."""
  looks_right, expected = PREDICT_LAYOUTS[layout]

  def find_inputs(path: Path, cfg: Any) -> list[CaseFiles]:
    if not path.is_dir() or not looks_right(path):
      what = "is not a folder" if not path.is_dir() else "is not in the model's layout"
      raise DataError(
        f"--input={path} {what}: a model trained on {cfg.name} data reads {expected}; "
        f"or give {PREDICT_ALTERNATIVES}"
      )
    return find(path, cfg)

  return find_inputs


_REGISTRY = {
  "phantom": Dataset(
    "phantom",
    brats.REGIONS,
    brats.LABELS,
    find_cases=_phantom_cases,
    find_inputs=_folder_inputs("brats", lambda p, cfg: brats.find_cases(p, require_label=False)),
    cache_tag=lambda cfg: phantom_root(cfg).name,
    label_names=brats.LABEL_NAMES,
  ),
  "brats": Dataset(
    "brats",
    brats.REGIONS,
    brats.LABELS,
    find_cases=lambda cfg, require_label: brats.find_cases(cfg.root, require_label),
    find_inputs=_folder_inputs("brats", lambda p, cfg: brats.find_cases(p, require_label=False)),
    cache_tag=lambda cfg: "brats",
    label_names=brats.LABEL_NAMES,
  ),
  "breast": Dataset(
    "breast",
    breast.REGIONS,
    breast.LABELS,
    find_cases=lambda cfg, require_label: breast.find_cases(
      cfg.root, cfg.post_phase, require_label
    ),
    find_inputs=_folder_inputs(
      "breast", lambda p, cfg: breast.find_cases(p, cfg.post_phase, require_label=False)
    ),
    cache_tag=lambda cfg: f"breast-phase{cfg.post_phase}",
    label_names=breast.LABEL_NAMES,
  ),
  "manifest": Dataset(
    "manifest",
    breast.REGIONS,
    breast.LABELS,
    find_cases=lambda cfg, require_label: manifest.find_cases(cfg.manifest, require_label),
    find_inputs=_manifest_inputs,
    cache_tag=lambda cfg: "manifest",
    label_names=breast.LABEL_NAMES,  # data.label_names of a manifest config replaces them
  ),
}


def names() -> list[str]:
  return sorted(_REGISTRY)


def get_dataset(name: str) -> Dataset:
  """The registered dataset ``name``; unknown names raise listing the valid ones."""
  if name not in _REGISTRY:
    raise ConfigError(f"Unknown data.name {name!r}; registered datasets: {', '.join(names())}")
  return _REGISTRY[name]


def find_input_cases(
  path: str | Path, data_config: Any, pre_series: str | None = None, post_series: str | None = None
) -> list[CaseFiles]:
  """Cases to predict: a CSV manifest (any dataset), a folder in the training layout, or
  (given ``pre_series`` and ``post_series``) a folder of DICOM studies, one per case."""
  path = Path(path)
  series = (pre_series, post_series)
  if path.suffix.lower() == ".csv":
    return manifest.find_cases(path, require_label=False, series=series)
  if pre_series or post_series:
    return study_cases(path, pre_series, post_series)
  return get_dataset(data_config.name).find_inputs(path, data_config)


def study_cases(path: Path, pre_series: str | None, post_series: str | None) -> list[CaseFiles]:
  """``<path>/<case>/``: each a DICOM study (its files in any tree below it), whose pre- and
  post-contrast series the two selectors name."""
  if not (pre_series and post_series):
    raise DataError(
      f"--input={path}: a folder of DICOM studies needs both --pre_series and --post_series "
      "(SeriesInstanceUID, SeriesDescription or a pattern of it)"
    )
  if not path.is_dir():
    raise DataError(f"--input={path} is not a folder of DICOM study folders")
  cases = []
  for case_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
    cid = file_io.check_name(case_dir.name, f"case folder {case_dir}")
    cases.append(CaseFiles(cid, case_dir, case_dir, None, None, pre_series, post_series))
  if not cases:
    raise DataError(f"--input={path} holds no case folders (one DICOM study per folder)")
  return cases
