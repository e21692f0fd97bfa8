"""Markdown tables in the paper's layout (Table 1: DSC, recall; Table 2: DSC per region)."""

from __future__ import annotations

PAPER_NAMES = {"ET": "EN"}  # the paper's Table 2 calls enhancing tumour "EN"


def paper_name(region: str) -> str:
  return PAPER_NAMES.get(region, region)


def region_note(regions: list[str]) -> str:
  """Said once under each table that uses a paper name: the two names are one region."""
  same = [f"{paper_name(r)} (the paper's name) is {r}" for r in regions if paper_name(r) != r]
  if not same:
    return ""
  return (
    f" {'; '.join(same)}, as logs, metrics.csv, results.json and figures call it "
    "(enhancing tumour)."
  )


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  """Lines of a GitHub markdown table."""

  def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"

  return [row(header), "|---" * len(header) + "|", *map(row, rows)]


def results_markdown(all_results: list[dict], regions: list[str]) -> str:
  """Table 2 (DSC per BraTS region + mean) or Table 1 (DSC, recall), then lesion-wise scores."""
  pct = "{:.2%}".format
  if len(regions) > 1:
    lines = markdown_table(
      ["Methodology", *(f"DSC {paper_name(r)}" for r in regions), "Mean"],
      [
        [r["model"], *(pct(r["dice"][g]) for g in regions), pct(r["dice"]["mean"])]
        for r in all_results
      ],
    )
  else:
    (g,) = regions
    lines = markdown_table(
      ["Methodology", "DSC", "Recall"],
      [[r["model"], pct(r["dice"][g]), pct(r["recall"][g])] for r in all_results],
    )
  r0 = all_results[0]
  lines += [
    "",
    f"{r0['cases']} validation cases of {r0['dataset']}, checkpoint step {r0['steps']}"
    f"{', mirroring TTA' if r0.get('tta') else ''}; Dice per case, averaged over cases."
    + region_note(regions),
  ]
  if "lesion_dice" in r0:
    lines += [""] + markdown_table(
      [
        "Methodology",
        *(f"lesion-wise Dice {paper_name(g)}" for g in regions),
        *(f"lesion-wise HD95 {paper_name(g)} (mm)" for g in regions),
      ],
      [
        [
          label,
          *(f"{m['lesion_dice'][g]:.4f}" for g in regions),
          *(f"{m['lesion_hd95'][g]:.2f}" for g in regions),
        ]
        for r in all_results
        for label, m in _before_after(r)
      ],
    )
  if "pkg_lesion_dice" in r0:
    lines += ["", "The organisers' current package (brats-evaluation 0.0.10, panoptica, config "
      "gli: no dilation or size threshold, Dice over matched lesions, misses and spurious "
      "lesions in F1): " + "; ".join(
      f"{paper_name(g)} Dice {r0['pkg_lesion_dice'][g]:.4f}, HD95 "
      f"{r0['pkg_lesion_hd95'][g]:.2f} mm, F1 {r0['pkg_lesion_f1'][g]:.4f}" for g in regions
    ) + "."]  # fmt: skip
  if "postprocessed" in r0:
    rules = r0["postprocessed"].get("rules", {})
    lines += ["", "Post-processing chosen on these cases: " + "; ".join(
      f"{paper_name(g)}: {rules.get(g, 'none')}" for g in regions
    ) + ". Voxel Dice after it: " + ", ".join(
      f"{paper_name(g)} {pct(r0['postprocessed']['dice'][g])}" for g in regions
    ) + "."]  # fmt: skip
  return "\n".join(lines) + "\n"


def _before_after(result: dict) -> list[tuple[str, dict]]:
  out = [(result["model"], result)]
  if "lesion_dice" in result.get("postprocessed", {}):
    out.append((f"{result['model']}, post-processed", result["postprocessed"]))
  return out
