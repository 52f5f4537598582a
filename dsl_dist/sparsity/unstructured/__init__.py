"""Weight-level sparsity: a bit mask per weight of each local shard (masks.py), the growth
statistic recorded from the kernels' gradients (growth.py), the candidates a selection streams
over (candidates.py), and the methods built on them (dsl.py)."""
