"""Inference and evaluation: trained or exported model -> probabilities -> labels -> metrics.

- ``sliding_window``: Gaussian-weighted whole-volume tiling (nnU-Net's);
- ``predictor``: the one forward pass (``window_probabilities``) and ``Predictor``,
  which loads a training workdir or an export folder (parameters only);
- ``postprocess``: thresholds, post-processing rules, nested BraTS labels;
- ``postprocess_selection``: the rules chosen on validation (``postprocessing.json``);
- ``metrics``: Dice, recall, precision, HD95, BraTS lesion-wise scores;
- ``evaluation``: ``evaluate_cases`` (used by training AND the evaluate command)
  and ``evaluate_workdir`` (writes ``W/eval-<step>[-tta]/``);
- ``prediction``: new scans -> NIfTI label maps in their own geometry;
- ``exporting``: the inference-only export folder;
- ``report``: the paper's tables; ``visualize``: figures (the only matplotlib user).

Imports nothing of training or the command-line modules (an import-linter contract).
"""
