"""Client of TensorFlow Serving's PredictionService, and a local TF-Serving-compatible model server."""
