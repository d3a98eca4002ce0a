"""One training-strategy object per backend (OpenRLHF's ``strategy``): the RL trainer calls these and
never branches on which backend runs.

    AccelerateStrategy   one process, DDP (torchrun / MPI) and Gaudi (optimum-habana's GaudiAccelerator;
                         ``mark_step`` is the HPU lazy-mode graph cut): accelerate's backward, clip-norm
                         and reductions, torch's optimizer state in the trainer's checkpoint.
    DeepSpeedStrategy    the DeepSpeed ZeRO engine accelerate started (``rlhf.zero.ppo_deepspeed_plugin``):
                         the engine's backward and step with the trainer ending each accumulation window,
                         ZeRO-3 weights gathered for generation and saving, the engine's own partitioned
                         checkpoint beside ours.

``strategy_for(accelerator, prepared_model, ...)`` picks one after ``accelerator.prepare``. Imports neither
deepspeed nor trl at module level (the Gaudi stack runs this)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhf.errors import UserError
from rlhf.zero import deepspeed_engine, full_parameters, gathered_state_dict, is_partitioned

ENGINE_CHECKPOINT = "deepspeed"  # folder in a PPO checkpoint: the engine's own save_checkpoint


def _no_op() -> None:
    pass


class AccelerateStrategy:
    """Backward, optimizer step, reductions and checkpoint state through ``accelerate``."""

    name = "accelerate"
    engine = None  # the DeepSpeed engine, for the strategies that have one

    def __init__(self, accelerator, max_grad_norm: Optional[float], mark_step: Optional[Callable[[], None]] = None):
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.mark_step = mark_step or _no_op
        self.num_processes = accelerator.num_processes
        self.device = accelerator.device

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)
        self.mark_step()

    def optimizer_step(self, parameters, optimizer) -> float:
        """End of an accumulation window: clip, step, zero the gradients; the norm before clipping."""
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.mark_step()
        return float(grad_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Mean or sum over processes (the tensor itself for one process)."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction=reduction)

    def whole_weights(self, model):
        """A block in which every parameter of ``model`` is whole on this process (generation)."""
        return contextlib.nullcontext(model)

    def optimizer_state(self, optimizer) -> Optional[dict]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: Optional[dict]) -> None:
        if state is None:
            raise UserError("this checkpoint was written by a DeepSpeed run (its optimizer state is the engine's); "
                            "resume it with the same --deepspeed config")
        optimizer.load_state_dict(state)

    def save_engine(self, folder) -> None:
        """The backend's own part of a checkpoint (none here); every process."""

    def load_engine(self, folder) -> None:
        """Restore what ``save_engine`` wrote; every process."""

    def weights_to_save(self, model, is_main: bool, trainable_only: bool) -> Optional[dict]:
        """None: ``model``'s own state dict is complete on the main process (nothing to gather)."""
        return None


class DeepSpeedStrategy(AccelerateStrategy):
    """The trainer's backward and step through a DeepSpeed engine, the trainer deciding the windows.

    ``backward(loss)``: the engine's backward of an already normalised loss (ZeRO reduces the gradients into
    partitions; no step). ``optimizer_step()``: the engine clips (``gradient_clipping`` = --max_grad_norm),
    steps and zeroes the gradients. The engine runs with ``managed_gradient_accumulation`` off, so how many
    backward passes a window had (the trainer skips minibatches whose ratio explodes) does not matter."""

    name = "deepspeed"

    def __init__(self, accelerator, engine, max_grad_norm: Optional[float], mark_step=None):
        super().__init__(accelerator, max_grad_norm, mark_step)
        if engine.managed_gradient_accumulation():
            raise RuntimeError("the PPO engine must run with managed_gradient_accumulation false "
                               "(rlhf.zero.ppo_deepspeed_plugin sets it)")
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.mark_step()

    def optimizer_step(self, parameters, optimizer) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def whole_weights(self, model):
        return full_parameters(model, self.engine)  # ZeRO-3: gathered once, not once per layer per token

    def optimizer_state(self, optimizer) -> Optional[dict]:
        return None  # the engine saves its partitioned optimizer itself (save_engine)

    def load_optimizer_state(self, optimizer, state: Optional[dict]) -> None:
        if state is not None:
            optimizer.load_state_dict(state)

    def save_engine(self, folder) -> None:
        """The engine's optimizer state (partitioned: each rank writes its own part) and its trained weights
        into ``folder/deepspeed``. Frozen weights are left out (they come from the base model; a LoRA
        checkpoint stays adapter-sized)."""
        self.engine.save_checkpoint(str(Path(folder) / ENGINE_CHECKPOINT), tag="state",
                                    exclude_frozen_parameters=True)

    def load_engine(self, folder) -> None:
        """Restore what ``save_engine`` wrote (the same number of ranks and ZeRO stage)."""
        path = Path(folder) / ENGINE_CHECKPOINT
        if not (path / "state").is_dir():
            raise UserError(f"{folder} has no DeepSpeed engine state ({ENGINE_CHECKPOINT}/state); it was not written "
                            "by a DeepSpeed run - resume it without --deepspeed, or start fresh")
        loaded, _ = self.engine.load_checkpoint(str(path), tag="state", load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"could not load the DeepSpeed engine state from {path}; resume with the same number of "
                            "processes and ZeRO stage as the run that wrote it")

    def weights_to_save(self, model, is_main: bool, trainable_only: bool) -> Optional[dict]:
        """Under ZeRO-3 the weights gathered from every rank's partitions (a collective; the main process
        gets a CPU copy); None when nothing is partitioned."""
        if not any(is_partitioned(p) for p in model.parameters()):
            return None
        return gathered_state_dict(model, is_main, trainable_only=trainable_only)


def strategy_for(accelerator, prepared_model, max_grad_norm: Optional[float], mark_step=None) -> AccelerateStrategy:
    """The strategy of a model ``accelerator.prepare`` returned: DeepSpeed if it started an engine."""
    engine = deepspeed_engine(prepared_model)
    if engine is not None:
        return DeepSpeedStrategy(accelerator, engine, max_grad_norm, mark_step)
    return AccelerateStrategy(accelerator, max_grad_norm, mark_step)
