"""What is read and drawn from finished runs: run directories (runs.py), their figures and
index (index.py, `dsl-dist report`, needs matplotlib), and the served-ranking metrics
(served.py). runs.py and served.py import no plotting library, so benchmarks and tests read
runs through them on a bare image."""
