"""The sparsity section of the job's config: one schema per method, each extending what it
shares with others (the budget and schedule, growth by gradient, single-weight masks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dsl_dist.config.checks import is_int, require


@dataclass
class BlockConfig:
    """block_dsl: DSL over blocks of `size` consecutive dimensions of a row, stored in pools
    sized to the budget (see dsl_dist/sparsity/block/dsl.py)."""

    size: int = 8
    """Dimensions per block: a multiple of 4 (FBGEMM's kernels) that divides each sparsified
    table's width."""
    headroom: float = 0.1
    """Pool slots beyond the budget, as a fraction of it: each table's pool holds
    max(1, density × blocks per row × (1 + headroom)) blocks per row, which also caps how far a
    table's density can rise under scope=global."""
    min_blocks: int = 0
    """Rows never drop below this many active blocks (0: a row may lose all of them, and is
    then scored as zero)."""

    def validate(self) -> None:
        require(self.size >= 4 and self.size % 4 == 0, "sparsity.block.size",
                "must be a positive multiple of 4 (FBGEMM's kernels need it)", self.size)
        require(self.headroom >= 0, "sparsity.block.headroom", "must be >= 0", self.headroom)
        require(self.min_blocks >= 0, "sparsity.block.min_blocks", "must be >= 0",
                self.min_blocks)


@dataclass
class SparsityConfig:
    """The `sparsity` section: which method trains the tables, and its settings. Every method's
    schema extends this one and carries only its own settings (dsl_dist/config/registry.py
    names them; `sparsity=<method>` picks one); as it is, dense training's, which sparsifies
    nothing."""

    name: str = "dense"

    def validate(self, max_steps: Optional[int] = None) -> None:
        """Checks the settings (JobConfig checks the name against the registry)."""


@dataclass
class DropAndGrowConfig(SparsityConfig):
    """A fixed budget of active weights, moved by periodic drop-and-grow on a cosine schedule
    (what every sparse method shares)."""

    density: float = 0.5
    """Fraction of the weights of the sparsified tables that are active: budget
    B = round(density × their total weights), exact on the whole cluster."""
    delta_t: int = 100
    """Drop-and-grow every delta_t training steps."""
    zeta_0: float = 0.5
    """Initial update fraction ζ_0 of the cosine schedule."""
    zeta_min: float = 0.005
    """Final update fraction ζ_min."""
    t_end: Optional[int] = None
    """No drop-and-grow after this step (RigL's freeze); null: updates until the end."""
    scope: str = "global"
    """global: rank the weights of all tables together, so table densities move;
    per_table: each table keeps round(density × its size) active weights."""
    tables: list[str] = field(default_factory=list)
    """Tables to sparsify; empty: every embedding table."""

    def validate(self, max_steps: Optional[int] = None) -> None:
        require(0 < self.density <= 1, "sparsity.density", "must be in (0, 1]", self.density)
        check_schedule(self.delta_t, self.zeta_0, self.zeta_min, self.t_end, max_steps,
                       "train.max_steps")
        require(self.scope in ("global", "per_table"), "sparsity.scope",
                 "must be global or per_table", self.scope)


@dataclass
class GradientGrowthConfig(DropAndGrowConfig):
    """Growth by gradient magnitude (DSL, RigL): which gradient ranks the inactive weights."""

    growth: str = "last_batch"
    """Growth signal: last_batch (the paper: |gradient| of the mini-batch before the update) or
    accumulated (|gradient| summed over the delta_t steps since the last update)."""
    growth_every: int = 1
    """accumulated: sum the |gradient| of every this many steps only (and of the update step):
    a sample of the window, which costs 1/growth_every of recording every step."""

    def validate(self, max_steps: Optional[int] = None) -> None:
        super().validate(max_steps)
        require(self.growth in ("last_batch", "accumulated"), "sparsity.growth",
                 "must be last_batch or accumulated", self.growth)
        require(self.growth_every >= 1, "sparsity.growth_every", "must be >= 1",
                 self.growth_every)


@dataclass
class UnstructuredConfig(DropAndGrowConfig):
    """Single weights chosen anywhere in a table, kept by a mask over the dense table."""

    dense_parameters: list[str] = field(default_factory=list)
    """Dense parameters to sparsify as well, as glob patterns of their names in the model
    (`tower.*`, `*`); the budget then spans them and the tables. Empty: none."""
    reset_optimizer_state: bool = True
    """Zero the optimizer state of weights that drop-and-grow changes (see README)."""
    mask_gradients: bool = False
    """Keep pruned weights at zero by masking the gradient of single-id lookups before the
    fused optimizer applies it (cheaper than re-masking rows after each step; row-wise
    Adagrad then accumulates only active weights' gradients, which changes its step size:
    see README). Needs reset_optimizer_state."""
    init_mask: str = "uniform"
    """The initial mask. uniform (the paper): the weights of smallest hash of their position,
    so two rows share about density² of their columns; prefix: every row's first columns (the
    rows of smallest hash one more, to the exact budget), so rows share their columns as a
    dense model of width density × cols does (block_dsl always starts so)."""
    grow_init_std: float = 0.0
    """Grown weights start at zero (0, RigL and the paper) or at a uniform value of this
    standard deviation, a pure function of (seed, step, position) (SET). In MF a user's and an
    item's weight of one column both at zero get no gradient, so zero-grown weights can only
    join columns their partners already use."""
    update_memory_mb: int = 64
    """The working memory of an update's passes over the shards, per rank: each pass holds
    the temporaries of about this many MiB of weights' worth of chunk at a time, and a
    selection holds its candidates tied at the threshold (8 or 16 bytes each) when they fit
    in it, instead of streaming over them again."""

    def validate(self, max_steps: Optional[int] = None) -> None:
        super().validate(max_steps)
        require(self.init_mask in ("uniform", "prefix"), "sparsity.init_mask",
                "must be uniform or prefix", self.init_mask)
        require(self.grow_init_std >= 0, "sparsity.grow_init_std", "must be >= 0",
                self.grow_init_std)
        require(self.update_memory_mb >= 1, "sparsity.update_memory_mb", "must be >= 1",
                self.update_memory_mb)


@dataclass
class DSLConfig(UnstructuredConfig, GradientGrowthConfig):
    """dsl: Dynamic Sparse Learning over single weights (dsl_dist/sparsity/unstructured/dsl.py;
    the defaults are the paper's reference code's)."""

    name: str = "dsl"
    growth_dtype: str = "bfloat16"
    """The growth statistic's dtype, bfloat16 (2 bytes a weight; the ranking it gives differs
    from float32's only between scores within 0.4% of each other) or float32."""

    def validate(self, max_steps: Optional[int] = None) -> None:
        super().validate(max_steps)
        require(self.growth_dtype in ("bfloat16", "float32"), "sparsity.growth_dtype",
                "must be bfloat16 or float32", self.growth_dtype)


@dataclass
class SETConfig(UnstructuredConfig):
    """set: SET (Mocanu et al. 2018) over single weights, magnitude drop and random growth
    (dsl_dist/sparsity/unstructured/set.py): no growth statistic to configure."""

    name: str = "set"


@dataclass
class BlockDSLConfig(GradientGrowthConfig):
    """block_dsl: DSL over blocks of rows, stored compactly (dsl_dist/sparsity/block/dsl.py)."""

    name: str = "block_dsl"
    block: BlockConfig = field(default_factory=BlockConfig)

    def validate(self, max_steps: Optional[int] = None) -> None:
        super().validate(max_steps)
        self.block.validate()


def check_schedule(delta_t: int, zeta_0: float, zeta_min: float, t_end: Optional[int],
                   total_steps: Optional[int], total_key: str) -> None:
    """The drop-and-grow schedule's fields (see `UpdateSchedule`), named `sparsity.<field>`;
    t_end must not lie beyond `total_steps` (named `total_key`) when that is known."""
    require(is_int(delta_t) and delta_t >= 1, "sparsity.delta_t", "must be an integer >= 1",
             delta_t)
    require(0 < zeta_0 <= 1, "sparsity.zeta_0", "must be in (0, 1]", zeta_0)
    require(0 <= zeta_min <= zeta_0, "sparsity.zeta_min", f"must be in [0, zeta_0={zeta_0!r}]",
             zeta_min)
    require(t_end is None or (is_int(t_end) and t_end >= 1), "sparsity.t_end",
             "must be null or an integer >= 1", t_end)
    require(t_end is None or total_steps is None or t_end <= total_steps, "sparsity.t_end",
             f"is beyond training ({total_key}={total_steps!r})", t_end)
