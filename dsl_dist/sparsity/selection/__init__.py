"""The exact distributed top-k engine drop-and-grow runs on: radix selection over candidates
spread across ranks (exact.py), streamed a chunk at a time (streaming.py), with compiled CPU
passes (chunk_kernels.py), device-dispatched primitives (fastops.py) and the position hashes
that break ties and digest masks (hashing.py). It knows nothing of any sparsity method."""
