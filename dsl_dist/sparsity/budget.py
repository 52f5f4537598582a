"""Budgets and global positions, shared by the weight- and block-level methods."""

from __future__ import annotations

from dataclasses import dataclass

from dsl_dist.config import ConfigError, DropAndGrowConfig


@dataclass(frozen=True)
class Group:
    """Tables whose units (weights or blocks) are ranked together, and how many are active."""

    tables: tuple[str, ...]
    budget: int


def budget_groups(cfg: DropAndGrowConfig, sizes: dict[str, int]) -> list[Group]:
    """The groups of sparsified tables (`sizes`: units by name) ranked together (all of them,
    or one per table) and their budgets, round(density × their units)."""
    names = list(sizes)
    groups = [tuple(names)] if cfg.scope == "global" else [(n,) for n in names]
    result = [Group(g, round(cfg.density * sum(sizes[n] for n in g))) for g in groups]
    for group in result:
        if group.budget < 1:
            raise ConfigError(f"sparsity.density={cfg.density}: leaves nothing active in "
                              f"table(s) {list(group.tables)}")
    return result


def position_bases(sizes: dict[str, int]) -> dict[str, int]:
    """The global position of each table's first unit: tables one after another, in the
    order of `sizes`, so that positions do not depend on the sharding or world size."""
    bases, total = {}, 0
    for name, size in sizes.items():
        bases[name], total = total, total + size
    return bases
