"""Serving: inference-only exports of a trained workdir (``exporting``) or of a
cross-validation's folds (``ensembles``), the ONNX graph of the model (``onnx_graph``;
a workdir's built into the user's cache by ``onnx_cache``) and the bf16 agreement
check export records (``agreement``)."""
