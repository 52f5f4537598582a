"""After training: a checkpoint exported to a self-contained artifact (export.py, artifact.py),
loaded for scoring (inference.py) and served over HTTP with Ray Serve (serve.py)."""
