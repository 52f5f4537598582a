"""`dsl-dist export RUN_DIR_OR_CHECKPOINT --out DIR`: a trained run's model as an artifact.

The checkpoint is read in this one process, whatever world size wrote it: DCP's reader
assembles every table from the ranks' shards (`dcp.load(..., no_dist=True)`), and only the
model's tables and the sparsity state are read, not the optimizer's. The artifact keeps the
active weights only (dsl_dist/serving/artifact.py): for `dsl` the weights its masks keep, for
`block_dsl` its nested blocks (the checkpoint's world-size-independent `sparsity_blocks`), for
`dense` every weight. MF and LightGCN are exported; NeuMF and Mult-VAE score through dense
layers that the serving side does not implement, and are refused.

Example::

    dsl-dist export runs/my-run --out exported/my-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dsl_dist.checkpoint import CheckpointError, complete_checkpoints, fingerprint, read_meta
from dsl_dist.config import SPARSITY_METHODS, ConfigError, JobConfig, UnstructuredConfig
from dsl_dist.config.compose import load_config
from dsl_dist.data.errors import DataError
from dsl_dist.data.graph import InteractionGraph, read_graph
from dsl_dist.data.manifest import Manifest
from dsl_dist.data.prepare import move_into_place
from dsl_dist.serving.artifact import (EncodedTable, decode, narrow, weight_bound,
                                       write_artifact)
from dsl_dist.serving.method_state import UnknownState, encode_table, needed
from dsl_dist.serving.models import NotServed, serving_module

TABLES = ("user", "item")
CONFIG = "config.yaml"


class ExportError(RuntimeError):
    """The input cannot be exported (the message names the problem)."""


def find_checkpoint(source: Path) -> tuple[Path, Path]:
    """(checkpoint, run directory) of a run directory (its newest complete checkpoint) or of a
    checkpoint directory (in its run's `checkpoints/`)."""
    source = Path(source)
    if not source.is_dir():
        raise ExportError(f"{source}: no such directory")
    if (source / ".metadata").exists() or source.name.startswith("step-"):
        return source, source.parent.parent
    if not (source / CONFIG).is_file():
        raise ExportError(f"{source}: neither a run directory (no {CONFIG}) nor a checkpoint "
                          "(no .metadata)")
    directory = load_config(source / CONFIG).checkpoint.dir or source / "checkpoints"
    found = complete_checkpoints(Path(directory))
    if not found:
        partial = sorted(p.name for p in Path(directory).glob(".step-*.partial"))
        raise ExportError(f"{source}: no complete checkpoint in {directory}"
                          + (f" (only partial ones: {partial})" if partial else ""))
    return found[0], source


def run_config(checkpoint: Path, meta: dict[str, Any], config: Path) -> JobConfig:
    """The run's config, refused unless it is the one the checkpoint was written with."""
    if not config.is_file():
        raise ExportError(f"{config}: no such file; pass the run's config with --config")
    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    differ = sorted(k for k, v in fingerprint(cfg).items() if meta["config"].get(k) != v)
    if differ:
        raise ExportError(f"{config} does not belong to {checkpoint}: {differ} differ")
    try:
        serving_module(cfg.model.name)
    except NotServed as e:
        raise ExportError(str(e)) from None
    if isinstance(cfg.sparsity, UnstructuredConfig) and cfg.sparsity.dense_parameters:
        raise ExportError(f"sparsity.dense_parameters={cfg.sparsity.dense_parameters!r}: "
                          f"{cfg.model.name} has no dense parameters to export")
    return cfg


def read_tensors(checkpoint: Path, layout: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The tensors of the checkpoint that an artifact needs (the model's tables and what the
    sparsity state's `layout` reads, dsl_dist/serving/method_state.py), whole, read in this
    process without a process group; and every key the checkpoint holds."""
    reader = dcp.FileSystemReader(str(checkpoint))
    metadata = reader.read_metadata()
    state = {key: torch.empty(m.size, dtype=m.properties.dtype)
             for key, m in metadata.state_dict_metadata.items()
             if needed(key, layout) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading into this process"
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state, set(metadata.state_dict_metadata)


def _model_weight(tensors: dict[str, torch.Tensor], table: str) -> np.ndarray:
    keys = [k for k in tensors if k.startswith("model.") and k.endswith(f".{table}.weight")]
    if len(keys) != 1:
        raise ExportError(f"checkpoint: {len(keys)} model tensors named {table!r} "
                          f"({keys}); expected one")
    return tensors[keys[0]].numpy()


def encode_tables(cfg: JobConfig, layout: str, tensors: dict[str, torch.Tensor],
                  state_keys: set[str]) -> dict[str, EncodedTable]:
    """The model's tables in the compact layout `layout` their method leaves (see
    dsl_dist/serving/method_state.py and artifact.py)."""
    try:
        return {table: encode_table(table, layout, tensors, state_keys,
                                    _model_weight(tensors, table), cfg) for table in TABLES}
    except UnknownState as e:
        raise ExportError(f"sparsity.name={cfg.sparsity.name!r}: {e}") from None


def train_positives(graph: InteractionGraph, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Every user's distinct training items, sorted (CSR: indptr (users + 1), items), from
    the training graph (its distinct edges, sorted)."""
    indptr = np.concatenate([[0], np.cumsum(np.bincount(graph.users, minlength=num_users))])
    return narrow(indptr, len(graph.items)), narrow(graph.items, max(graph.num_items - 1, 0))


def propagated_embeddings(cfg: JobConfig, dataset_dir: Path, graph: InteractionGraph,
                          tables: dict[str, EncodedTable]) -> Optional[dict[str, np.ndarray]]:
    """The final user and item embeddings the model's serving module computes from the
    tables (LightGCN's, propagated as the run did); None when they are the tables."""
    settings = serving_module(cfg.model.name).settings(cfg)
    final = serving_module(cfg.model.name).final_embeddings(
        torch.from_numpy(decode(tables["user"])), torch.from_numpy(decode(tables["item"])),
        graph, settings, dataset_dir)
    return None if final is None else {"user": final[0].numpy(), "item": final[1].numpy()}


def original_ids(dataset_dir: Path, manifest: Manifest) -> dict[str, list]:
    """The data set's original user and item ids, by index."""
    ids = {}
    for column, count in (("user", manifest.num_users), ("item", manifest.num_items)):
        table = pq.read_table(dataset_dir / f"{column}_map.parquet")
        if table.num_rows != count or table["index"].to_pylist() != list(range(count)):
            raise DataError(f"{dataset_dir / f'{column}_map.parquet'}: does not map the "
                            f"manifest's {count} {column}s")
        ids[f"{column}s"] = table["raw"].to_pylist()
    return ids


def describe(cfg: JobConfig, manifest: Manifest, checkpoint: Path,
             ckpt_meta: dict[str, Any], tables: dict[str, EncodedTable]) -> dict[str, Any]:
    model: dict[str, Any] = {"name": cfg.model.name, "num_users": manifest.num_users,
                             "num_items": manifest.num_items,
                             "embedding_dim": cfg.model.embedding_dim}
    model.update(serving_module(cfg.model.name).settings(cfg))
    return {"model": model,
            "sparsity": dataclasses.asdict(cfg.sparsity),
            "data": {"name": manifest.name, "num_users": manifest.num_users,
                     "num_items": manifest.num_items,
                     "rows": {s: info.rows for s, info in manifest.splits.items()}},
            "checkpoint": {"path": str(checkpoint.resolve()), "step": ckpt_meta["step"],
                           "finished": ckpt_meta["finished"],
                           "world_size": ckpt_meta["world_size"]},
            "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
            "bytes": weight_bound(tables)}


def export(source: Path, out: Path, *, overwrite: bool = False,
           config: Optional[Path] = None, data: Optional[Path] = None,
           propagated: bool = True) -> dict[str, Any]:
    """Writes the artifact of `source` (a run or checkpoint directory) to `out`; returns its
    artifact.json. An existing non-empty `out` is replaced only with `overwrite`, and only once
    the new artifact is complete. `propagated`: store LightGCN's propagated embeddings (else
    loading computes them)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ExportError(f"--out {out}: exists and is not an empty directory; pass "
                          "--overwrite to replace it")
    checkpoint, run_dir = find_checkpoint(source)
    ckpt_meta = read_meta(checkpoint)
    cfg = run_config(checkpoint, ckpt_meta, Path(config) if config else run_dir / CONFIG)
    dataset_dir = Path(data or cfg.data.path)
    manifest = Manifest.load(dataset_dir)
    layout = SPARSITY_METHODS[cfg.sparsity.name].export_layout
    tensors, state_keys = read_tensors(checkpoint, layout)
    tables = encode_tables(cfg, layout, tensors, state_keys)
    for table, count in (("user", manifest.num_users), ("item", manifest.num_items)):
        if tables[table].shape != (count, cfg.model.embedding_dim):
            raise ExportError(f"table {table} {tables[table].shape} does not match the data set "
                              f"{dataset_dir} ({count} {table}s × {cfg.model.embedding_dim})")
    meta = describe(cfg, manifest, checkpoint, ckpt_meta, tables)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        graph = read_graph(dataset_dir)
        final = propagated_embeddings(cfg, dataset_dir, graph, tables) if propagated else None
        written = write_artifact(staging, meta, tables,
                                 train_positives(graph, manifest.num_users),
                                 original_ids(dataset_dir, manifest), final)
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def summary(meta: dict[str, Any]) -> str:
    b, files = meta["bytes"], meta["files"]
    weights = files["weights.safetensors"]["bytes"]
    total = sum(f["bytes"] for f in files.values())
    others = ", ".join(f"{name} {f['bytes']:,} B" for name, f in files.items()
                       if name != "weights.safetensors")
    return (f"{meta['model']['name']} ({meta['sparsity']['name']}): {b['active_weights']:,} "
            f"active weights × {b['bytes_per_weight']} B + {b['index_bytes']:,} B index = "
            f"{b['needed_bytes']:,} B (bound 1.2× = {b['bound_bytes']:,} B); "
            f"weights.safetensors {weights:,} B ({weights / b['needed_bytes']:.3f}×); "
            f"besides the weights: {others}; {total:,} B in all")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="dsl-dist export", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a run directory or one of its checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="the artifact's directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: the run "
                        "directory's)")
    parser.add_argument("--data", type=Path, help="the prepared data set (default: the run's "
                        "data.path)")
    parser.add_argument("--no-propagated", action="store_true", help="LightGCN: leave out the "
                        "propagated embeddings (smaller; loading computes them, which takes "
                        "minutes on a large graph)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        meta = export(args.source, args.out, overwrite=args.overwrite, config=args.config,
                      data=args.data, propagated=not args.no_propagated)
    except (ExportError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {args.out}: {summary(meta)}")
    print(json.dumps(meta["bytes"]))


if __name__ == "__main__":
    main()
