"""Evaluation: probabilities -> masks -> metrics, and the post-processing chosen on validation.

- ``evaluation``: ``evaluate_cases`` (training's validation and ``evaluate`` alike);
- ``metrics``: Dice, recall, HD95, lesion-wise scores;
- ``postprocess_selection``: nnU-Net's per-region choice of post-processing on validation;
- ``report``: the paper's tables.
"""
