"""The comparison and sweep tables in the paper's layout (Table 1 / Table 2), as Markdown."""

from __future__ import annotations

from resfuse_jax.evaluation.report import markdown_table, paper_name, region_note

METRICS = ("dice", "recall")


def _pm(stat: dict) -> str:
  return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def _columns(regions: list[str]) -> tuple[list[str], dict[str, str]]:
  """The region columns (plus the mean when there are several) and their paper names."""
  cols = regions + ["mean"] if len(regions) > 1 else regions
  return cols, {r: paper_name(r) for r in regions} | {"mean": "Mean"}


def comparison_markdown(c: dict) -> str:
  """The paper's Table 1 (DSC, recall) / Table 2 (DSC per region + mean) layout, plus cost."""
  regions, multi_seed = c["regions"], len(c["seeds"]) > 1
  cols, label = _columns(regions)
  lines = markdown_table(
    ["Methodology", "Params", "GFLOP/step"]
    + [f"DSC {label[r]} (%)" for r in cols]
    + [f"Recall {label[r]} (%)" for r in cols],
    [
      [e["model"], f"{e['params']:,}", f"{e['train_flops_per_step'] / 1e9:.2f}"]
      + [_pm(e[m][r]) for m in METRICS for r in cols]
      for e in c["models"]
    ],
  )
  lines += [
    "",
    f"{c['dataset']}, {_cases(c)}, {c['steps']} steps of "
    f"batch {c['batch_size']} at patch {'×'.join(map(str, c['patch_size']))}, "
    f"seed{'s' if multi_seed else ''} {', '.join(map(str, c['seeds']))}. "
    "Mean ± std over cases (population std"
    + ("; each case's metric averaged over the seeds first" if multi_seed else "")
    + "); GFLOP/step: one training step (forward, backward, update) by XLA's cost analysis."
    + region_note(regions),
  ]
  lines += _lesion_wise_table(c, cols, label)
  if multi_seed:
    spread = "; ".join(
      f"{e['model']} " + ", ".join(f"{label[r]} {100 * e['dice'][r]['seed_std']:.2f}" for r in cols)
      for e in c["models"]
    )
    lines += ["", f"Spread over seeds (std of the case-mean DSC, points): {spread}."]
  return "\n".join(lines + _paired_table(c, label)) + "\n"


def _lesion_wise_table(c: dict, cols: list[str], label: dict) -> list[str]:
  lesion = [m for m in ("lesion_dice", "pp_lesion_dice") if all(m in e for e in c["models"])]
  if not lesion:
    return []
  title = {"lesion_dice": "lesion-wise DSC", "pp_lesion_dice": "post-processed lesion-wise DSC"}
  lines = [""] + markdown_table(
    ["Methodology"] + [f"{title[m]} {label[r]} (%)" for m in lesion for r in cols],
    [[e["model"]] + [_pm(e[m][r]) for m in lesion for r in cols] for e in c["models"]],
  )
  return lines + [
    "",
    "BraTS 2023 lesion-wise Dice (each spurious component counts as a missed lesion); "
    "post-processed: after the rules each model's own validation chose "
    "(`W/<model>/postprocessing.json`).",
  ]


def _paired_table(c: dict, label: dict) -> list[str]:
  regions, ref = c["regions"], c["reference"]
  lines = [
    "",
    f"Paired Wilcoxon signed-rank test against {ref} across cases: mean difference in points "
    "(p-value).",
    "",
  ]
  return lines + markdown_table(
    ["Methodology"]
    + [f"Δ{'DSC' if m == 'dice' else 'Recall'} {label[r]}" for m in METRICS for r in regions],
    [
      [e["model"]]
      + [
        f"{100 * t[m][r]['mean_diff']:+.2f} ({t[m][r]['p_value']:.3g})"
        for m in METRICS
        for r in regions
      ]
      for e in c["models"]
      if e["model"] != ref
      for t in [e["paired_vs_reference"]]
    ],
  )


def sweep_markdown(s: dict) -> str:
  """Dice per region against the knob, the paired tests, and W_l's norms."""
  regions, values, ref = s["regions"], s["values"], s["reference"]
  cols, label = _columns(regions)
  head = [f"{s['knob']} = {v:g}" if isinstance(v, float) else f"{s['knob']} = {v}" for v in values]
  lines = [
    f"# Sweep of {s['knob']}",
    "",
    f"{s['dataset']}, {s['cases']} validation cases, {s['steps']} steps, seeds "
    f"{', '.join(map(str, s['seeds']))}. DSC (%): mean over cases of each case's DSC averaged "
    "over the seeds ± the std over seeds of the case-mean DSC. * marks a paired Wilcoxon "
    f"signed-rank test against {ref} across cases with p < 0.05." + region_note(regions),
  ]
  for r in cols:
    rows = []
    for name, m in s["models"].items():
      cells = []
      for i, stat in enumerate(m["dice"][r]):
        star = ""
        if r != "mean" and name != ref and m["paired"][r][i]["p_value"] < 0.05:
          star = "*"
        cells.append(f"{100 * stat['mean']:.2f} ± {100 * stat['seed_std']:.2f}{star}")
      rows.append([name, *cells])
    lines += ["", f"## DSC {label[r]}", ""] + markdown_table(["Model", *head], rows)
  lines += ["", f"## Paired test against {ref}: mean DSC difference in points (p)", ""]
  lines += markdown_table(
    ["Model", "Region", *head],
    [
      [name, label[r]]
      + [f"{100 * t['mean_diff']:+.2f} ({t['p_value']:.3g})" for t in m["paired"][r]]
      for name, m in s["models"].items()
      if name != ref
      for r in regions
    ],
  )
  return "\n".join(lines + _fusion_norms_table(s, head)) + "\n"


def _fusion_norms_table(s: dict, head: list[str]) -> list[str]:
  learned = {
    n: m["fusion_weight_norms"] for n, m in s["models"].items() if "fusion_weight_norms" in m
  }
  if not learned:
    return []
  lines = [
    "",
    "## Learned fusion weights: Frobenius norm of W_l per encoder level (mean ± std over seeds)",
    "",
  ]
  return lines + markdown_table(
    ["Model", "Level", *head],
    [
      [name, level] + [f"{x['mean']:.3f} ± {x['seed_std']:.3f}" for x in stats]
      for name, norms in learned.items()
      for level, stats in norms.items()
    ],
  )


def _cases(c: dict) -> str:
  """Which cases were compared: one fold's validation cases, or every fold's held-out ones."""
  if c.get("folds"):
    return (
      f"{c['cases']} out-of-fold cases of folds {', '.join(map(str, c['folds']))} of "
      f"{c['num_folds']} (each scored by the fold that did not train on it)"
    )
  return f"fold {c['fold']}, {c['cases']} validation cases"
