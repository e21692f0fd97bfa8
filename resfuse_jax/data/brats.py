"""Reader for the BraTS 2023 GLI layout: pre = t1n, post = t1c, seg optional."""

from __future__ import annotations

from pathlib import Path

from resfuse_jax import files as file_io
from resfuse_jax.data.common import CaseFiles, DataError, require_scan, scan_path

REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
LABELS = (0, 1, 2, 3)
# The BraTS 2023 label convention (NCR, ED, ET).
LABEL_NAMES = {1: "necrotic tumour core", 2: "peritumoral oedema", 3: "enhancing tumour"}
SOURCE_HINT = (
  "BraTS 2023 adult glioma (GLI) training data is distributed through Synapse "
  "(the 'BraTS 2023 Challenge' project, after registering for the challenge); unpack "
  "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData and pass it with "
  "--config.data.root=/path/to/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData. "
  "To try the pipeline without data, train on the built-in phantom: "
  "python -m resfuse_jax.main --config=phantom --workdir=runs/phantom"
)


def find_cases(root: str | Path, require_label: bool = True) -> list[CaseFiles]:
  """Lists ``<root>/BraTS-GLI-XXXXX-YYY/`` case folders, checking each has its files."""
  root = Path(root) if root else None
  if root is None or not root.is_dir():
    raise DataError(f"BraTS data folder not found: data.root={str(root or '')!r}. {SOURCE_HINT}")
  cases = []
  for case_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("BraTS-")):
    cid = file_io.check_name(case_dir.name, f"case folder {case_dir}")
    files = {  # a scan may be a DICOM series folder of the same name (<cid>-t1n/)
      "pre": scan_path(case_dir / f"{cid}-t1n.nii.gz"),
      "post": scan_path(case_dir / f"{cid}-t1c.nii.gz"),
      "label": case_dir / f"{cid}-seg.nii.gz",
    }
    if not require_label and not files["label"].is_file() and not files["label"].is_symlink():
      files["label"] = None
    problem = None
    try:
      for kind in ("pre", "post"):
        require_scan(files[kind], f"case {cid}: {kind}-contrast scan")
      if files["label"] is not None and not files["label"].is_symlink():
        if not files["label"].is_file():
          raise DataError(f"case {cid}: missing segmentation {files['label']}")
    except DataError as e:
      problem = str(e)
    cases.append(CaseFiles(cid, files["pre"], files["post"], files["label"], problem))
  if not cases:
    raise DataError(f"no BraTS-GLI-* case folders in {root}. {SOURCE_HINT}")
  return cases
