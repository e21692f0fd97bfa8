"""Evaluation: probabilities -> masks -> metrics, and the post-processing chosen on validation.

- ``evaluation``: ``evaluate_cases`` (training's validation and ``evaluate`` alike);
- ``cross_validation``: ``evaluate`` of a cross-validation, each fold on its own cases, pooled;
- ``grids``: where a case is scored: its original grid and label file (results) or the
  resampled grid (training's periodic progress signal);
- ``metrics``: Dice, recall, HD95, lesion-wise scores (BraTS rules in mm);
- ``postprocess_selection``: nnU-Net's per-region choice of post-processing on validation;
- ``report``: the paper's tables.
"""
