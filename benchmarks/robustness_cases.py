"""Which cases lose most when the pre scan moves? Per case, against its drawn misregistration.

Reads a sweep's workdir (``compare --sweep=data.misregistration_mm=...``): per model and
region, each validation case's seed-averaged DSC at one value minus its DSC at the default,
grouped by how far that case's pre scan moved (the phantom's ``acquisition.json``) into
thirds, and Spearman's rho between the distance and the change.

  python -m benchmarks.robustness_cases --workdir=W --folder=data.misregistration_mm=4.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_collections
import numpy as np
from scipy import stats

from resfuse_jax.data import datasets, phantom
from resfuse_jax.evaluation import metrics
from resfuse_jax.evaluation.report import markdown_table


def seed_averaged_dice(run_dir: Path, region: str) -> dict[str, float]:
  """case -> DSC of ``region`` averaged over the run's seeds (``seed<k>/metrics.csv``)."""
  seeds = sorted(run_dir.glob("seed*/metrics.csv")) or [run_dir / "metrics.csv"]
  rows = [{r["case"]: r[f"dice_{region}"] for r in metrics.read_csv(p)} for p in seeds]
  return {case: float(np.mean([r[case] for r in rows])) for case in rows[0]}


def moved_mm(run_dir: Path) -> dict[str, float]:
  """case -> length of its pre scan's drawn translation, from the phantom the run trained on."""
  config = next(run_dir.glob("**/config.json"))
  data = ml_collections.ConfigDict(json.loads(config.read_text())["data"])
  drawn = json.loads((datasets.phantom_root(data) / phantom.ACQUISITION).read_text())
  return {case: float(np.linalg.norm(d["translation_mm"])) for case, d in drawn.items()}


def table(workdir: Path, folder: str, regions: list[str]) -> list[str]:
  models = sorted(p.name for p in (workdir / folder).iterdir() if p.is_dir())
  rows = []
  for model in models:
    moved = moved_mm(workdir / folder / model)
    for region in regions:
      at = seed_averaged_dice(workdir / folder / model, region)
      base = seed_averaged_dice(workdir / "default" / model, region)
      cases = sorted(at)
      dist = np.array([moved[c] for c in cases])
      change = 100 * np.array([at[c] - base[c] for c in cases])
      thirds = np.array_split(np.argsort(dist), 3)
      rho = stats.spearmanr(dist, change).statistic
      rows.append(
        [model, region]
        + [f"{change[t].mean():+.2f} ({dist[t].min():.1f}–{dist[t].max():.1f} mm)" for t in thirds]
        + [f"{rho:+.2f}"]
      )
  return markdown_table(
    [
      "Model",
      "Region",
      "ΔDSC, least moved third",
      "middle third",
      "most moved third",
      "Spearman ρ",
    ],
    rows,
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True, type=Path)
  parser.add_argument(
    "--folder", required=True, help="the value's folder, e.g. data.misregistration_mm=4.5"
  )
  parser.add_argument("--regions", default="WT,TC,ET")
  args = parser.parse_args()
  print("\n".join(table(args.workdir, args.folder, args.regions.split(","))))


if __name__ == "__main__":
  main()
