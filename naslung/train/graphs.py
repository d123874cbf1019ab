"""Training steps captured as CUDA graphs: one graph replay instead of hundreds of launches.

A ConvRes step on 32^3 crops is a few hundred small kernels (forward, A-Softmax loss, backward,
Adam), so at small batches the GPU waits on the Python launch loop. `CapturedTrainStep` records
the whole step once and replays it for every batch of the same shape; a batch of another shape
(the ragged last batch of an epoch) runs eagerly on the same weights and optimizer state.

Capture freezes everything the host decides: shapes, Python numbers and control flow. So the
optimizer must keep its step counters on the device (``Adam(..., capturable=True)``) and
`AngleLoss` counts its steps in a device tensor (`AngleLoss.count_on_device`), so that lambda
keeps annealing on every replay, with the same values as in eager mode.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from naslung.kernels.runtime import on_tensor_device
from naslung.models.heads import AngleLoss

ZERO_STATE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
"""Optimizers whose lazily created state is all zeros, so warm-up steps can be undone in place."""


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward, loss, backward and optimizer step; the gradients must be None or zero before.
    With ``autocast_dtype`` the forward pass and loss run under autocast (fp32 master weights)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def require_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless every parameter group of ``optimizer`` was created with capturable=True."""
    if not all(group.get("capturable", False) for group in optimizer.param_groups):
        name = type(optimizer).__name__
        raise ValueError(f"a captured training step needs {name}(..., capturable=True), which keeps "
                         f"its step counters on the device; this {name} was created without it")


class TrainingState:
    """Copies of everything a training step changes (parameters, buffers of the model and of the
    loss, optimizer state), to undo warm-up steps in place: the tensors keep their storage, so a
    graph captured afterwards reads and writes the very tensors the caller holds."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        seen: set[int] = set()
        self.tensors = []
        for tensor in chain(model.parameters(), model.buffers(), loss_fn.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                self.tensors.append(tensor)
        self.saved = [tensor.detach().clone() for tensor in self.tensors]
        self.loss_fn = loss_fn
        # An AngleLoss counting on the host keeps its step in a Python int, not in a buffer.
        counts_on_host = isinstance(loss_fn, AngleLoss) and loss_fn.step_count is None
        self.loss_step = loss_fn.step if counts_on_host else None
        self.optimizer_state = {
            param: {key: value.detach().clone() if torch.is_tensor(value) else value
                    for key, value in optimizer.state[param].items()}
            for group in optimizer.param_groups for param in group["params"] if optimizer.state.get(param)
        }
        fresh = any(not optimizer.state.get(param) for group in optimizer.param_groups
                    for param in group["params"])
        if fresh and not isinstance(optimizer, ZERO_STATE_OPTIMIZERS):
            raise ValueError(f"cannot undo warm-up steps of a fresh {type(optimizer).__name__}: its "
                             "first state is not all zeros; use Adam or AdamW")

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in zip(self.tensors, self.saved, strict=True):
            tensor.copy_(saved)
        if self.loss_step is not None:
            self.loss_fn.step = self.loss_step
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if not state:
                    continue
                saved = self.optimizer_state.get(param)
                for key, value in state.items():
                    if saved is None:  # created by the warm-up: Adam's fresh state is zeros
                        if torch.is_tensor(value):
                            value.zero_()
                    elif torch.is_tensor(value):
                        value.copy_(saved[key])
                    else:
                        state[key] = saved[key]


def warm_up(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
            x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    """Run ``steps`` training steps on (x, y), then undo them.

    What the steps create stays (optimizer state tensors, cuDNN plans, compiled and autotuned
    Triton kernels, allocator blocks); weights, buffers, the loss's step count and the optimizer
    state are back to their values before. Gradients are left as None.
    """
    state = TrainingState(model, loss_fn, optimizer)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        train_step(model, loss_fn, optimizer, x, y)
    state.restore()
    optimizer.zero_grad(set_to_none=True)


class CapturedTrainStep:
    """A training step of ``model`` captured as a CUDA graph for batches shaped like the example.

    Construction warms up on a side stream (``warmup_steps`` steps on the example batch, then
    undone: see `warm_up`) and captures one step; it leaves weights, buffers and optimizer state
    as they were. Each call with a batch of the example's shape and dtypes copies it into the
    static input buffers and replays the graph; any other batch runs the same step eagerly.
    Calls return the detached loss. The optimizer must be created with ``capturable=True``; an
    `AngleLoss` is switched to counting its steps on the device. The model must stay on its
    device and keep its parameters (no ``.to()``, no new optimizer) while this step is in use.
    """

    @on_tensor_device  # capture on the batch's GPU's streams, whichever device is current
    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 example_x: torch.Tensor, example_y: torch.Tensor, warmup_steps: int = 3) -> None:
        device = example_x.device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need the model and batches on a CUDA GPU, the batch is on "
                             f"{device}; train without CUDA graphs (drop --cuda-graphs) on this device")
        misplaced = {str(t.device) for t in chain(model.parameters(), model.buffers())} - {str(device)}
        if misplaced:
            raise ValueError(f"the model has tensors on {', '.join(sorted(misplaced))}, the batch is on "
                             f"{device}: move the model to the batch's device before capturing")
        require_capturable(optimizer)
        if not model.training:
            raise ValueError("capture a training step with the model in training mode (model.train())")
        if warmup_steps < 1:
            raise ValueError(f"capture needs >= 1 warm-up step to create the optimizer state, "
                             f"got {warmup_steps}")
        if isinstance(loss_fn, AngleLoss):
            loss_fn.count_on_device(device)
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.static_x = example_x.detach().clone()
        self.static_y = example_y.detach().clone()

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm_up(model, loss_fn, optimizer, self.static_x, self.static_y, warmup_steps)
        torch.cuda.current_stream(device).wait_stream(side)

        self.graph = torch.cuda.CUDAGraph()
        # Gradients are None here, so the captured backward allocates them from the graph's
        # private memory pool and every replay overwrites them (no accumulation).
        with torch.cuda.graph(self.graph):
            self.static_loss = train_step(model, loss_fn, optimizer, self.static_x, self.static_y)
        self.replays = 0
        self.eager_steps = 0

    def matches(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether the batch (x, y) can be replayed: same shapes, dtypes and device."""
        return all(new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
                   for new, old in ((x, self.static_x), (y, self.static_y)))

    @on_tensor_device
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.model.training:
            raise RuntimeError("the captured step replays training-mode kernels: call model.train() "
                               "before training steps")
        if self.matches(x, y):
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            self.replays += 1
            return self.static_loss.detach().clone()  # the static loss is overwritten next replay
        # Zero in place: the gradients stay the graph's tensors, which its replays overwrite.
        self.optimizer.zero_grad(set_to_none=False)
        loss = train_step(self.model, self.loss_fn, self.optimizer, x, y)
        self.eager_steps += 1
        return loss.detach()


class TrainStep:
    """The step a training loop calls once per batch: eager, or (``cuda_graphs``) a
    `CapturedTrainStep` captured on the first batch and replayed for every batch of its shape."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 cuda_graphs: bool = False, autocast_dtype: torch.dtype | None = None) -> None:
        if cuda_graphs:
            require_capturable(optimizer)
            if autocast_dtype is not None:
                raise ValueError("a captured CUDA-graph step runs in fp32: drop --cuda-graphs or "
                                 "train with --precision fp32")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.cuda_graphs = cuda_graphs
        self.autocast_dtype = autocast_dtype
        self.captured: CapturedTrainStep | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            self.optimizer.zero_grad(set_to_none=True)
            return train_step(self.model, self.loss_fn, self.optimizer, x, y,
                              self.autocast_dtype).detach()
        if self.captured is None:
            self.captured = CapturedTrainStep(self.model, self.loss_fn, self.optimizer, x, y)
        return self.captured(x, y)
