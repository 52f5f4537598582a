"""Training entry point: `torchrun --nproc_per_node N -m dsl_dist.train <hydra overrides>`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import OmegaConf
from torchrec import KeyedJaggedTensor

from dsl_dist.best import BestEvaluation
from dsl_dist.checkpoint import (CheckpointStore, ConfigFingerprint, OptimizerState,
                                 complete_checkpoints)
from dsl_dist.cli import hydra_entry
from dsl_dist.config import DropAndGrowConfig, JobConfig
from dsl_dist.config.registry import SPARSITY_METHODS, load
from dsl_dist.control import connect_controller
from dsl_dist.data.errors import DataError
from dsl_dist.data.manifest import Manifest
from dsl_dist.data.prepare import ensure_prepared
from dsl_dist.data.stream import EpochStream, InteractionStream, UserHistoryStream
from dsl_dist.distributed import DistContext, init_distributed, shutdown_distributed
from dsl_dist.evaluation import evaluate
from dsl_dist.memory import (PeakTracker, high_water_marks, release_freed_memory, rss_mb,
                             tensor_bytes)
from dsl_dist.model.base import PAIRS
from dsl_dist.model.registry import build_model, prepare_model_data
from dsl_dist.model.sharding import dense_optimizer, embedding_tables
from dsl_dist.model.shards import local_table_shards
from dsl_dist.pipeline import PipelinedSteps, TrainedStream, chosen_pipeline, host_batches
from dsl_dist.progress import ProgressBar
from dsl_dist.run_log import RunDirError, RunLog, run_dir_of
from dsl_dist.sparsity.base import SparsitySetup, sharded_for_method
from dsl_dist.sparsity.schedule import UpdateSchedule
from dsl_dist.tensorboard_log import TensorBoardSink


class TrainingProgress:
    """The step and the running loss sums of the current epoch (each rank its own). After a
    resume on another world size the epoch restarts (the stream does the same), so its sums
    start again."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.step = 0
        self.epoch_loss, self.epoch_steps = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "world_size": self.ctx.world_size,
                "epoch_steps": self.epoch_steps,
                "epoch_loss": self.ctx.all_gather_object(self.epoch_loss)}  # per rank

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        if state["world_size"] == self.ctx.world_size:
            self.epoch_loss = state["epoch_loss"][self.ctx.rank]
            self.epoch_steps = state["epoch_steps"]


class Trainer:
    """Owns the sharded model, its optimizers, the sparsity method and the data stream of one
    rank; every piece of state is registered with the checkpoint store."""

    def __init__(self, cfg: JobConfig, ctx: DistContext, log: RunLog,
                 checkpoints: CheckpointStore) -> None:
        self.cfg, self.ctx, self.log, self.checkpoints = cfg, ctx, log, checkpoints
        self.dataset_dir = Path(cfg.data.path)
        self.manifest: Manifest = ctx.main_then_broadcast(lambda: ensure_prepared(
            Path(cfg.data.source), self.dataset_dir, name=cfg.data.name,
            num_shards=cfg.data.num_shards, seed=cfg.train.seed,
            valid_fraction=cfg.data.valid_fraction))
        missing = {cfg.eval.split, cfg.eval.select_split} - {None} - set(self.manifest.splits)
        if missing:
            raise DataError(f"{self.dataset_dir}: no {sorted(missing)} split to evaluate on (it "
                            f"has {sorted(self.manifest.splits)}); for a source without a "
                            "validation file, prepare one with data.valid_fraction")
        ctx.main_then_broadcast(lambda: prepare_model_data(cfg, self.dataset_dir))
        method = load(SPARSITY_METHODS, cfg.sparsity.name)
        self.peaks = PeakTracker(high_water_marks(ctx.device))
        baseline_rss_mb = rss_mb()  # the process before the model: imports, data, libraries
        module = build_model(cfg, self.manifest, self.dataset_dir)
        self.weights = sum(t.num_embeddings * t.embedding_dim for t in embedding_tables(module))
        """The model's table weights, as declared (a sparsity method may store fewer)."""
        module, self.model, tables = sharded_for_method(method, cfg, module, ctx)
        self.stream = self._stream(module.batches)
        self.host_batch = module.host_batch
        self.dense_optimizer = dense_optimizer(self.model, cfg.train)
        self.progress = TrainingProgress(ctx)
        epoch_steps = cfg.train.epochs * self.stream.steps_per_epoch
        self.total_steps = min(epoch_steps, cfg.train.max_steps or epoch_steps)
        self.bar = self._progress_bar()
        self.schedule = (UpdateSchedule.of(cfg.sparsity, self.total_steps)
                         if isinstance(cfg.sparsity, DropAndGrowConfig) else None)
        """The steps a sparsity method updates at (its controller runs this schedule); None
        for a method that never updates."""
        self.sparsity = method.build(SparsitySetup(
            cfg.sparsity, cfg.train.seed, cfg.model.init_std, self.model, tables, ctx,
            self.total_steps, self.dense_optimizer, connect=lambda budgets, unit: (
                connect_controller(cfg.control, ctx, self.schedule, budgets, unit))))
        self.best = (BestEvaluation(cfg.eval.select_metric) if cfg.eval.select_split else None)
        self.pipeline = None if chosen_pipeline(cfg.train.pipeline, ctx.world_size, ctx.device,
                                                module.fx_traceable) == "plain" else PipelinedSteps(
            self.model, ctx.device, lambda: self.sparsity.before_step(self.step + 1),
            self._after_backward)
        self._register_state()
        release_freed_memory()
        self._log_memory(baseline_rss_mb)

    def _progress_bar(self) -> Optional[ProgressBar]:
        """Rank 0's bar, fed the update events too, printing the log's lines above itself."""
        if not (self.cfg.train.progress and self.ctx.is_main):
            return None
        bar = ProgressBar(self.cfg.data.batch_size * self.ctx.world_size,
                          self.cfg.train.progress_every_s)
        self.log.attach(bar)
        self.log.echo = bar.print
        return bar

    def _log_memory(self, baseline_rss_mb: float) -> None:
        """The `memory` line: bytes of table weights, optimizer state and sparsity state,
        counted from the tensors and summed over the ranks, and each rank's baseline RSS."""
        shards = local_table_shards(self.model)
        optimizer = [t for s in shards for t in s.optimizer_states()]
        if self.dense_optimizer is not None:
            optimizer += [t for state in self.dense_optimizer.state.values()
                          for t in state.values() if isinstance(t, torch.Tensor)]
        counts = torch.tensor([tensor_bytes(s.weight for s in shards), tensor_bytes(optimizer),
                               self.sparsity.memory_bytes()])
        table, optimizer_bytes, sparsity = (int(x) for x in self.ctx.all_reduce_sum(counts))
        self.log.write("memory", table_bytes=table, optimizer_bytes=optimizer_bytes,
                       sparsity_bytes=sparsity, weights=self.weights,
                       baseline_rss_mb=self.ctx.all_gather_object(baseline_rss_mb))

    def _register_state(self) -> None:
        """Everything a checkpoint keeps, in the order it is restored: the settings first (a
        checkpoint of others is refused before anything is read), the run log last (it is cut
        back only once everything else has loaded)."""
        store = self.checkpoints
        store.register("config", ConfigFingerprint(self.cfg), sharded=False)
        store.register("progress", self.progress, sharded=False)
        store.register("stream", TrainedStream(self.stream, self.progress), sharded=False)
        store.register("model", self.model, sharded=True)
        store.register("optimizer", self.model.fused_optimizer, sharded=True)
        if self.dense_optimizer is not None:
            store.register("dense_optimizer", OptimizerState(self.dense_optimizer), sharded=True)
        self.sparsity.register_state(store)
        if self.best is not None:
            store.register("best", self.best, sharded=False)
        store.register("run_log", self.log, sharded=False)

    @property
    def step(self) -> int:
        return self.progress.step

    def _stream(self, batches: str) -> EpochStream:
        """The training batches of this rank for a model fed `batches` (see model/base.py)."""
        cfg, ctx = self.cfg, self.ctx
        if batches == PAIRS:
            return InteractionStream(
                self.dataset_dir, rank=ctx.rank, world_size=ctx.world_size,
                batch_size=cfg.data.batch_size, num_negatives=cfg.data.num_negatives,
                seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer)
        stream = UserHistoryStream(self.dataset_dir, rank=ctx.rank, world_size=ctx.world_size,
                                   batch_size=cfg.data.batch_size, seed=cfg.train.seed)
        stream.steps_per_epoch = ctx.all_reduce_min(stream.local_steps)
        return stream

    def batches(self) -> Iterator[KeyedJaggedTensor]:
        """The rest of the stream's epoch as the model takes it (`host_batch`), built on the
        host, in pinned memory on CUDA so that `train_step` copies it without waiting."""
        return host_batches(self.stream, self.host_batch, pin=self.ctx.device.type == "cuda")

    def _losses(self) -> Iterator[torch.Tensor]:
        """The rest of the epoch's steps, one loss (on the device) each, run as
        `train.pipeline` says (dsl_dist/pipeline.py)."""
        if self.pipeline is None:
            return (self.train_step(batch) for batch in self.batches())
        return (self._finish_step(loss) for loss in self.pipeline.losses(self.batches()))

    def train_step(self, batch: KeyedJaggedTensor) -> torch.Tensor:
        """Forward, backward (which also updates the fused embedding tables), dense update,
        then the sparsity method's step (and, at its update steps, drop-and-grow). `batch`:
        one of `batches()`. Returns the loss, on the device."""
        self.sparsity.before_step(self.step + 1)
        loss = self.model(batch.to(self.ctx.device, non_blocking=True))
        loss.backward()
        self._after_backward()
        return self._finish_step(loss)

    def _after_backward(self) -> None:
        """The step's dense update (the tables' fused optimizer has run in the backward)."""
        self.sparsity.after_backward()
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
            self.dense_optimizer.zero_grad()

    def _finish_step(self, loss: torch.Tensor) -> torch.Tensor:
        """After the step's update: the sparsity method's step and, at its update steps,
        drop-and-grow."""
        self.progress.step += 1
        self.log.claim()
        # what an update's peak is measured against (its extra memory); read at update steps
        # only, off the other steps' path
        before = (rss_mb() if self.schedule and self.schedule.is_update_step(self.step)
                  else None)
        self.peaks.start()
        update = self.sparsity.after_optimizer_step(self.step)
        peaks = self.peaks.stop()
        if update:
            release_freed_memory()
            self.log.write("update", **update.as_dict(),
                           **self._per_rank({**peaks, "rss_mb_before": before}))
        return loss.detach()

    def train_epoch(self) -> None:
        """Trains the rest of the stream's current epoch (all of it unless resumed), saving
        a checkpoint every `checkpoint.every` steps."""
        epoch, every, progress = self.stream.epoch, self.cfg.checkpoint.every, self.progress
        started, steps = time.perf_counter(), 0
        self.peaks.start()
        if self.bar:
            self.bar.start(epoch, progress.epoch_steps, min(
                self.stream.steps_per_epoch,
                progress.epoch_steps + self.total_steps - self.step))
        # the loss stays on the device, summed there; the host reads it at log points only
        epoch_loss = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for loss in self._losses():
            epoch_loss += loss
            if self.bar:
                self.bar.step(loss)
            progress.epoch_steps += 1
            steps += 1
            if self.cfg.train.log_every and self.step % self.cfg.train.log_every == 0:
                self.log.print(f"step {self.step} loss {float(loss):.4f}")
            if self.step >= self.total_steps:
                break
            if every and self.step % every == 0:
                progress.epoch_loss += float(epoch_loss)
                epoch_loss.zero_()
                self.save_checkpoint()
        progress.epoch_loss += float(epoch_loss)
        seconds = time.perf_counter() - started
        if self.bar:
            self.bar.end()
        mean_loss = float(self.ctx.all_reduce_sum(torch.tensor(
            progress.epoch_loss / max(progress.epoch_steps, 1), dtype=torch.float64))
        ) / self.ctx.world_size
        progress.epoch_loss, progress.epoch_steps = 0.0, 0
        self.stream.set_epoch(epoch + 1)
        samples = steps * self.cfg.data.batch_size * self.ctx.world_size
        peaks = self._per_rank(self.peaks.stop())
        self.log.write("epoch", epoch=epoch, step=self.step, loss=mean_loss, seconds=seconds,
                       samples_per_s=samples / seconds, **peaks)
        self.log.print(f"epoch {epoch} step {self.step} loss {mean_loss:.4f} "
                       f"{seconds:.1f}s {samples / seconds:,.0f} samples/s")

    def _per_rank(self, peaks: dict[str, float]) -> dict[str, list[float]]:
        """Every rank's figures of a phase, by field (its peaks: peak_rss_mb, and peak_cuda_mb
        on CUDA)."""
        gathered = self.ctx.all_gather_object(peaks)
        return {name: [rank[name] for rank in gathered] for name in peaks}

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Scores the reported split and, with selection, the selection split, keeping the
        best evaluation's checkpoint (checkpoint.keep_best)."""
        metrics = self._evaluate_split(epoch, self.cfg.eval.split)
        if self.best is not None:
            selection = self._evaluate_split(epoch, self.cfg.eval.select_split)
            if self.best.offer(epoch, self.step, selection, metrics) and \
                    self.cfg.checkpoint.keep_best:
                self.save_checkpoint(into=self.checkpoints.directory / "best", keep=1)
        return metrics

    def _evaluate_split(self, epoch: int, split: str) -> dict[str, float]:
        started = time.perf_counter()
        self.peaks.start()
        e = self.cfg.eval
        metrics = evaluate(self.model, self.dataset_dir, split, self.manifest.num_items,
                           list(e.ks), self.ctx, e.memory_mb, e.max_users, self.cfg.train.seed)
        release_freed_memory()
        self.log.write("eval", epoch=epoch, step=self.step, split=split,
                       seconds=time.perf_counter() - started, **metrics,
                       **self._per_rank(self.peaks.stop()))
        self.log.print(f"eval epoch {epoch} ({split}): " +
                       " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "users") +
                       f" ({metrics['users']:,} users)")
        return metrics

    def _log_best(self) -> None:
        """The `best` line: the chosen epoch's figures on both splits."""
        best, split = self.best.best, self.cfg.eval.select_split
        figures = {**{k: v for k, v in best["reported"].items() if k != "users"},
                   **{f"{split}_{k}": v for k, v in best["selection"].items() if k != "users"}}
        self.log.write("best", epoch=best["epoch"], step=best["step"], metric=self.best.metric,
                       split=self.cfg.eval.split, **figures)
        self.log.print(f"best epoch {best['epoch']} by {split} {self.best.metric}: " +
                       " ".join(f"{k} {v:.4f}" for k, v in figures.items()))

    def fit(self, report: Optional[Callable[[dict[str, float]], None]] = None
            ) -> dict[str, float]:
        """Trains to the end (from where a resumed checkpoint left off), evaluating every
        `eval.every_epochs` epochs and at the end, then saves the final checkpoint. `report`
        (e.g. Ray Train's) receives every evaluation's metrics, on every rank."""
        metrics: dict[str, float] = {}
        while self.step < self.total_steps:
            self.train_epoch()
            epoch, every = self.stream.epoch, self.cfg.eval.every_epochs
            if self.step >= self.total_steps or (every and epoch % every == 0):
                metrics = self.evaluate(epoch)
                if report:
                    report({"epoch": epoch, "step": self.step, **metrics})
        metrics = metrics or self.evaluate(self.stream.epoch)
        if self.best is not None:
            self._log_best()
        self.save_checkpoint(finished=True)
        self.log.close()
        return metrics

    def save_checkpoint(self, finished: bool = False, **where: Any) -> Path:
        path = self.checkpoints.save(self.step, finished, **where)
        self.log.print(f"checkpoint {path}")
        return path

    def resume(self, candidates: list[Path]) -> None:
        """Continues from the first loadable checkpoint of `candidates` (newest first)."""
        path, meta = self.checkpoints.resume(
            candidates, warn=lambda message: self.log.print(message, file=sys.stderr))
        self.log.print(f"resumed from {path} at step {self.step} "
                       f"(saved by {meta['world_size']} rank(s))")


def build_trainer(cfg: JobConfig) -> Trainer:
    """Validates `cfg`, joins the process group of the current environment, checks that the
    run directory is free (the first step claims it) and builds this rank's trainer."""
    cfg.validate()
    ctx = init_distributed(cfg.backend)
    run_dir = ctx.broadcast_object(run_dir_of(cfg))
    log = RunLog(run_dir, enabled=ctx.is_main,
                 config_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    store = CheckpointStore(Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else
                            run_dir / "checkpoints", cfg.checkpoint.keep, ctx)
    candidates = ctx.main_then_broadcast(lambda: _resume_candidates(cfg, store, log))
    log.resuming_in_place = log.claimed = cfg.checkpoint.resume == "auto" and bool(candidates)
    if not log.resuming_in_place:
        ctx.main_then_broadcast(log.check_free)  # the directory is claimed at the first step
    log.print(f"run_dir {run_dir}, {ctx.world_size} rank(s), backend {ctx.backend}")
    tensorboard = cfg.train.tensorboard and ctx.is_main
    if tensorboard and not log.resuming_in_place:
        log.attach(TensorBoardSink(run_dir / "tensorboard"))
    trainer = Trainer(cfg, ctx, log, store)
    if candidates:
        trainer.resume(candidates)
    if tensorboard and log.resuming_in_place:
        # a new event file from the resumed step on; TensorBoard hides the earlier files'
        # later events, which this run writes again (as metrics.jsonl is cut back)
        log.attach(TensorBoardSink(run_dir / "tensorboard", purge_step=trainer.step + 1))
    return trainer


def _resume_candidates(cfg: JobConfig, store: CheckpointStore, log: RunLog) -> list[Path]:
    """The checkpoints to try, newest first: the one `checkpoint.resume` names, or with
    `auto` those of an unfinished run in run_dir (none for a new run)."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        return []
    if resume != "auto":
        if not Path(resume).is_dir():
            raise RunDirError(f"checkpoint.resume={resume!r}: no such checkpoint directory")
        return [Path(resume)]
    found = complete_checkpoints(store.directory) if log.path.exists() else []
    if found and store.finished(found[0]):
        raise RunDirError(f"run_dir={str(log.run_dir)!r} already holds a run, finished "
                          f"({found[0].name}); choose another run_dir")
    return found


def run(cfg: JobConfig) -> dict[str, float]:
    """Trains and evaluates; returns the final metrics."""
    try:
        return build_trainer(cfg).fit()
    finally:
        shutdown_distributed()


main = hydra_entry(run)


if __name__ == "__main__":
    main()
