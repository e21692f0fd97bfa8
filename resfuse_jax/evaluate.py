"""Evaluates a trained workdir on its validation cases: ``python -m resfuse_jax.evaluate``.

  python -m resfuse_jax.evaluate --workdir=W [--tta] [--step=N]

Writes ``W/metrics.csv`` (one row per case), ``W/results.json`` (the training
contract's keys, plus lesion-wise BraTS metrics and standard deviations) and
``W/report.md`` (a table in the layout of the paper's Table 1 / Table 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from resfuse_jax import cli, data, metrics, visualize
from resfuse_jax.predictor import Predictor, probabilities_to_labels

FLAGS = flags.FLAGS
PAPER_NAMES = {"ET": "EN"}  # the paper's Table 2 calls enhancing tumour "EN"


def evaluate_workdir(
  workdir: str | Path, step: int | None = None, tta: bool = False, figures: bool = True
) -> dict:
  workdir = Path(workdir)
  predictor = Predictor(workdir, step)
  config = predictor.config
  splits = json.loads((workdir / "splits.json").read_text())
  cache_dir, _, _ = data.prepare(config.data, progress=False)
  cases = data.load_cases(cache_dir, splits["val"])
  info = predictor.info
  brats_like = list(info.regions) == ["WT", "TC", "ET"]
  acc = metrics.RegionMetrics(info.region_names, lesion_wise=brats_like)
  regions = list(info.regions.values())
  for i, case in enumerate(cases, 1):
    probs = predictor.probabilities(case, tta)
    ref = np.stack([np.isin(case.label, v) for v in regions], axis=-1)
    row = acc.add(case.case_id, probs > 0.5, ref, case.spacing)
    if figures:
      labels = probabilities_to_labels(probs, info.regions)
      visualize.case_figure(
        workdir / "figures" / f"{case.case_id}.png",
        case.case_id,
        case.pre,
        case.post,
        labels,
        np.asarray(case.label),
        predictor.fusion_heat(case),
        brats_colours=brats_like,
      )
    logging.info(
      "[%d/%d] %s: %s",
      i,
      len(cases),
      case.case_id,
      ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("dice_")),
    )
  summary = acc.summary()
  stds = {
    m: {r: float(np.std([row[f"{m}_{r}"] for row in acc.rows])) for r in info.region_names}
    for m in summary
  }
  results = {
    "model": config.model.name,
    "dataset": config.data.name,
    "steps": int(predictor.step),
    "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(predictor.params))),
    **summary,
    "std": stds,
    "cases": len(cases),
    "tta": tta,
  }
  _write(workdir, acc, results, info)
  return results


def _write(workdir: Path, acc: metrics.RegionMetrics, results: dict, info) -> None:
  acc.write_csv(workdir / "metrics.csv")
  (workdir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
  (workdir / "report.md").write_text(report_markdown([results], info.region_names))


def report_markdown(all_results: list[dict], regions: list[str]) -> str:
  """The paper's layout: Table 2 (DSC per BraTS region + mean) or Table 1 (DSC, recall)."""
  pct = "{:.2%}".format
  lines = []
  if len(regions) > 1:
    names = [PAPER_NAMES.get(r, r) for r in regions]
    lines += [
      "| Methodology | " + " | ".join(f"DSC {n}" for n in names) + " | Mean |",
      "|---" * (len(regions) + 2) + "|",
    ]
    for r in all_results:
      lines.append(
        f"| {r['model']} | "
        + " | ".join(pct(r["dice"][g]) for g in regions)
        + f" | {pct(r['dice']['mean'])} |"
      )
  else:
    (g,) = regions
    lines += ["| Methodology | DSC | Recall |", "|---|---|---|"]
    for r in all_results:
      lines.append(f"| {r['model']} | {pct(r['dice'][g])} | {pct(r['recall'][g])} |")
  r0 = all_results[0]
  lines += [
    "",
    f"{r0['cases']} validation cases of {r0['dataset']}, checkpoint step {r0['steps']}"
    f"{', mirroring TTA' if r0.get('tta') else ''}; Dice per case, averaged over cases.",
  ]
  if "lesion_dice" in r0:
    lines += [
      "",
      "| Methodology | "
      + " | ".join(f"lesion-wise Dice {PAPER_NAMES.get(g, g)}" for g in regions)
      + " | "
      + " | ".join(f"lesion-wise HD95 {PAPER_NAMES.get(g, g)} (mm)" for g in regions)
      + " |",
      "|---" * (2 * len(regions) + 1) + "|",
    ]
    for r in all_results:
      lines.append(
        f"| {r['model']} | "
        + " | ".join(f"{r['lesion_dice'][g]:.4f}" for g in regions)
        + " | "
        + " | ".join(f"{r['lesion_hd95'][g]:.2f}" for g in regions)
        + " |"
      )
  return "\n".join(lines) + "\n"


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("tta", False, "Mirroring test-time augmentation over all axes.")
  flags.DEFINE_bool("figures", True, "Write W/figures/<case>.png for every validation case.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  results = evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.tta, FLAGS.figures)
  print(Path(FLAGS.workdir, "report.md").read_text())
  print(f"Dice: {results['dice']}")


def run():
  """Console-script entry point (``resfuse-evaluate``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
