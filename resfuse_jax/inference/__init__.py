"""Inference: a trained or exported model -> region probabilities -> label maps.

- ``predictor``: the model and its parameters, one forward pass per window;
- ``tiler``: Gaussian-weighted whole-volume tiling (nnU-Net's), the one tiler;
- ``postprocess``: thresholds, the chosen rules, region masks <-> label maps;
- ``prediction``: reading new scans and writing label maps in their own grid;
- ``onnx_runtime``, ``openvino_runtime``: an ONNX graph as the window function
  (onnxruntime, OpenVINO; its compiled model cached in the user's cache);
- ``runtimes``: which of them ``predict --backend`` runs (``auto``), and their knobs;
- ``precision``: OpenVINO's bf16, measured against f32 at export and gated at predict;
- ``ensemble``: a cross-validation's folds (W or its export) as one predictor, the mean of
  their probabilities.
"""
