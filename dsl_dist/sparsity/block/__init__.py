"""Block-level sparsity: tables stored as pools of row blocks sized to the budget (pool.py),
their per-rank shards and layouts (shard.py), the kernel hooks that read and write them
(hooks.py), their checkpoint state (state.py), and the structured DSL method (dsl.py)."""
