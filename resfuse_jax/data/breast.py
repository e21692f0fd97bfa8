"""Reader for breast DCE-MRI in the MAMA-MIA layout.

``<root>/images/<ID>/<ID>_0000.nii.gz`` is the pre-contrast phase,
``<ID>_000<k>.nii.gz`` the k-th post-contrast phase (``data.post_phase``,
default 1), ``<root>/segmentations/expert/<ID>.nii.gz`` the lesion mask.
"""

from __future__ import annotations

from pathlib import Path

from resfuse_jax import files as file_io
from resfuse_jax.data.common import CaseFiles, DataError, require_scan, scan_path

REGIONS = {"lesion": (1,)}
LABELS = (0, 1)
LABEL_NAMES = {1: "lesion"}
SOURCE_HINT = (
  "Expected the MAMA-MIA layout: <root>/images/<ID>/<ID>_0000.nii.gz (pre-contrast), "
  "<ID>_0001.nii.gz (first post-contrast phase) and <root>/segmentations/expert/<ID>.nii.gz. "
  "Set --config.data.root, or describe another collection with a CSV manifest "
  "(--config=manifest)."
)


def find_cases(
  root: str | Path, post_phase: int = 1, require_label: bool = True
) -> list[CaseFiles]:
  if post_phase < 1:
    raise DataError(f"data.post_phase={post_phase}: post-contrast phases start at 1 (_0001)")
  root = Path(root) if root else None
  if root is None or not (root / "images").is_dir():
    raise DataError(
      f"breast data not found: no images/ folder under data.root={str(root or '')!r}. {SOURCE_HINT}"
    )
  cases = []
  for case_dir in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
    cid = file_io.check_name(case_dir.name, f"case folder {case_dir}")
    pre = scan_path(case_dir / f"{cid}_0000.nii.gz")  # or a DICOM series folder <ID>_0000/
    post = scan_path(case_dir / f"{cid}_{post_phase:04d}.nii.gz")
    label = root / "segmentations" / "expert" / f"{cid}.nii.gz"
    if not require_label and not label.is_file():
      label = None
    problem = None
    try:
      require_scan(pre, f"case {cid}: pre-contrast phase")
      if not post.is_file() and not post.is_dir():
        phases = sorted(p.name for p in case_dir.glob(f"{cid}_*.nii.gz"))
        raise DataError(f"case {cid}: missing post-contrast phase {post} (found: {phases})")
      if label is not None and not label.is_file():
        raise DataError(f"case {cid}: missing segmentation {label}")
    except DataError as e:
      problem = str(e)
    cases.append(CaseFiles(cid, pre, post, label, problem))
  if not cases:
    raise DataError(f"no case folders under {root / 'images'}. {SOURCE_HINT}")
  return cases
