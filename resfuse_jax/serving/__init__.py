"""Serving: inference-only exports of a trained workdir, and the ONNX graph of the model."""
