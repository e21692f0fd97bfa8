"""Serving: inference-only exports of a trained workdir (``exporting``) or of a
cross-validation's folds (``ensembles``), and the ONNX graph of the model."""
