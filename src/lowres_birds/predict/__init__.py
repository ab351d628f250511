"""Prediction: the Classifier every path shares (classifier), ONNX export (export) and the HTTP server (serving)."""
