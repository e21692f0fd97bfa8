"""Inference: a trained or exported model -> region probabilities -> label maps.

- ``predictor``: the model and its parameters, one forward pass per window;
- ``tiler``: Gaussian-weighted whole-volume tiling (nnU-Net's), the one tiler;
- ``postprocess``: thresholds, the chosen rules, region masks <-> label maps;
- ``prediction``: reading new scans and writing label maps in their own grid;
- ``onnx_runtime``: an export's ``model.onnx`` as the window function (onnxruntime);
- ``ensemble``: a cross-validation's folds (W or its export) as one predictor, the mean of
  their probabilities.
"""
