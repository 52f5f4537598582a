"""How batches reach a rank's training steps, and how the steps run.

Batches are built on the host (the model's `host_batch`), pinned on CUDA, and copied without
waiting. Steps run one after another (`plain`), or through TorchRec's TrainPipelineSparseDist
(`sparse_dist`), which copies batch i+2 to the device and starts the input distribution of
batch i+1 (the all-to-all of its ids) while batch i trains; a checkpoint then records the
stream at the batches trained, not at those the pipeline holds (`TrainedStream`).

`auto` (train.pipeline) takes sparse_dist for several ranks on CUDA, where there is an
all-to-all to hide (if the pipeline can trace the model's forward), and plain at one GPU and
on CPU: at world size 1 there is nothing to hide
and the pipeline's bookkeeping costs more than it saves (issue 28's measurement on one GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from dsl_dist.config import ConfigError

if TYPE_CHECKING:
    from dsl_dist.data.stream import EpochStream


class EpochSteps(Protocol):
    """How many steps of the current epoch have trained (the loop's TrainingProgress)."""

    epoch_steps: int


def chosen_pipeline(setting: str, world_size: int, device: torch.device,
                    traceable: bool = True) -> str:
    """`plain` or `sparse_dist`: the setting, with `auto` decided as the module says (and
    plain for a model whose forward TorchRec's pipeline cannot trace, `traceable` False,
    which sparse_dist refuses)."""
    if setting == "sparse_dist" and not traceable:
        raise ConfigError("train.pipeline=sparse_dist: TorchRec's pipeline cannot trace this "
                          "model's forward (MF and LightGCN with bags it can); use plain or auto")
    if setting != "auto":
        return setting
    return "sparse_dist" if world_size > 1 and device.type == "cuda" and traceable else "plain"


class _BetweenSteps:
    """What the pipeline takes for an optimizer: it calls `zero_grad` before a forward and
    `step` after the backward, where the trainer's dense update goes (the tables' fused
    optimizer has run inside the backward)."""

    def __init__(self, after_backward: Callable[[], None]) -> None:
        self.after_backward = after_backward

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The dense update zeroes its gradients itself."""

    def step(self) -> None:
        self.after_backward()


class PipelinedSteps:
    """The steps of `model` (a DistributedModelParallel whose forward returns the loss) through
    TrainPipelineSparseDist: `before_step` runs before each step's forward, `after_backward`
    after its backward."""

    def __init__(self, model: nn.Module, device: torch.device, before_step: Callable[[], None],
                 after_backward: Callable[[], None]) -> None:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        self.model, self.before_step = model, before_step
        self.pipeline = TrainPipelineSparseDist(model, _BetweenSteps(after_backward), device,
                                                custom_model_fwd=self._forward)

    def _forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.model(batch)
        return loss, loss

    def losses(self, batches: Iterator[KeyedJaggedTensor]) -> Iterator[torch.Tensor]:
        """Each step's loss (on the device), until `batches` and the pipeline run out; the
        model is the plain one again between the steps the caller takes (for evaluation and
        checkpoints) only once this iterator is exhausted or closed."""
        try:
            while True:
                self.before_step()
                try:
                    loss = self.pipeline.progress(batches)
                except StopIteration:
                    return
                yield loss.detach()
        finally:
            self.pipeline.detach()


def host_batches(stream: Iterable[KeyedJaggedTensor],
                 prepare: Callable[[KeyedJaggedTensor], KeyedJaggedTensor],
                 pin: bool) -> Iterator[KeyedJaggedTensor]:
    """The stream's batches prepared for the model, in pinned (page-locked) memory if `pin`:
    a copy from there to a GPU runs asynchronously (non_blocking), one from pageable memory
    makes the host wait."""
    for batch in stream:
        batch = prepare(batch)
        yield batch.pin_memory() if pin else batch


class TrainedStream:
    """The stream as a checkpoint component, at the batches trained: a pipeline has taken
    the next ones already (`train.pipeline=sparse_dist`), and a resume must train them."""

    def __init__(self, stream: EpochStream, progress: EpochSteps) -> None:
        self.stream, self.progress = stream, progress

    def state_dict(self) -> dict[str, Any]:
        return {**self.stream.state_dict(), "batches_done": self.progress.epoch_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
