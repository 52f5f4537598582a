"""The models `model.name` chooses, built from the config and the prepared data set."""

from __future__ import annotations

from pathlib import Path

from dsl_dist.config import JobConfig
from dsl_dist.data.graph import load_propagation_bags, read_graph
from dsl_dist.data.manifest import Manifest
from dsl_dist.model.base import Recommender
from dsl_dist.model.lightgcn import LightGCN
from dsl_dist.model.mf import MatrixFactorization
from dsl_dist.model.multvae import MultVAE
from dsl_dist.model.neumf import NeuMF


def prepare_model_data(cfg: JobConfig, dataset_dir: Path) -> None:
    """Builds and caches what a model derives from the data set (LightGCN's propagation bags):
    run by one rank before every rank builds the model."""
    if cfg.model.name == "lightgcn" and cfg.model.lightgcn.propagation == "bags":
        load_propagation_bags(dataset_dir, cfg.model.lightgcn.num_layers,
                              cfg.model.lightgcn.max_neighbours)


def build_model(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) -> Recommender:
    """The configured model on the meta device, ready for sharding."""
    m, users, items = cfg.model, manifest.num_users, manifest.num_items
    if m.name == "mf":
        return MatrixFactorization(users, items, m.embedding_dim, cfg.data.num_negatives,
                                   cfg.train.l2_reg)
    if m.name == "lightgcn":
        g = m.lightgcn
        graph = (load_propagation_bags(dataset_dir, g.num_layers, g.max_neighbours)
                 if g.propagation == "bags" else read_graph(dataset_dir).normalized_adjacency())
        return LightGCN(users, items, m.embedding_dim, cfg.data.num_negatives, cfg.train.l2_reg,
                        g.num_layers, graph)
    if m.name == "neumf":
        return NeuMF(users, items, m.embedding_dim, m.neumf.gmf_dim, list(m.neumf.mlp_layers),
                     cfg.data.num_negatives)
    if m.name == "multvae":
        v = m.multvae
        return MultVAE(items, m.embedding_dim, v.latent_dim, v.dropout, v.beta_max,
                       v.anneal_steps, cfg.train.seed)
    raise ValueError(f"model.name={m.name!r}: no such model")  # validate() refuses it first
