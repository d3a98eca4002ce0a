"""Backend choice, in one place: device, dtype, trainer classes, PPO accelerator, HPU specifics.

``resolve_backend`` turns the user's ``--device`` / ``--use_habana`` / ``--use_lazy_mode`` into a
``Backend``. Only an explicit request (``--use_habana`` or ``--device hpu``) or an HPU that Habana's
software actually reports takes the Gaudi path; a CPU or CUDA machine that merely has optimum-habana
installed gets transformers' ``Trainer`` and accelerate's ``Accelerator``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "hpu")
HABANA_HELP = (
    "run inside Intel's Gaudi container (habana_frameworks present) after `make setup-habana`, "
    "or drop --use_habana / --device hpu to train on CPU or CUDA"
)


@dataclass
class BackendArguments:
    """Where to run. Shared by every stage script."""

    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or hpu.", "choices": DEVICES})
    use_habana: bool = field(default=False, metadata={"help": "Run on Intel Gaudi (HPU) with optimum-habana."})
    use_lazy_mode: bool = field(default=False, metadata={"help": "HPU lazy mode (graph mode); needs --use_habana."})
    gaudi_config_name: str | None = field(
        default=None, metadata={"help": "GaudiConfig hub id or path (default: fused Adam and clip-norm on)."}
    )


def habana_software_present() -> bool:
    return importlib.util.find_spec("habana_frameworks") is not None


def hpu_is_available() -> bool:
    if not habana_software_present():
        return False
    hpu = importlib.import_module("habana_frameworks.torch.hpu")
    return bool(hpu.is_available())


def choose_device(device: str = "auto", use_habana: bool = False) -> str:
    """Map the user's request to cpu, cuda or hpu; stop with one line when it cannot be met."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is not one of {', '.join(DEVICES)}; pick one of them")
    if use_habana and device not in ("auto", "hpu"):
        raise UserError(f"--use_habana contradicts --device {device}; use --device hpu or drop --use_habana")
    if use_habana or device == "hpu":
        if not hpu_is_available():
            raise UserError(f"an Intel Gaudi (HPU) was requested but none is usable here; {HABANA_HELP}")
        return "hpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu or auto")
        return "cuda"
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if hpu_is_available():
        return "hpu"
    return "cpu"


@dataclass
class Backend:
    device: str
    use_lazy_mode: bool = False
    gaudi_config_name: str | None = None

    @property
    def is_gaudi(self) -> bool:
        return self.device == "hpu"

    def torch_dtype(self, bf16: bool = False, fp16: bool = False) -> torch.dtype:
        if bf16 and fp16:
            raise UserError("--bf16 and --fp16 both set; pick one")
        if bf16:
            return torch.bfloat16
        if fp16:
            if self.device == "cpu":
                raise UserError("--fp16 is not supported on CPU; use --bf16 or full precision")
            return torch.float16
        return torch.float32

    def trainer_classes(self) -> tuple[type, type]:
        """(Trainer class, TrainingArguments class) for this backend."""
        if self.is_gaudi:
            from optimum.habana import GaudiTrainer, GaudiTrainingArguments

            return GaudiTrainer, GaudiTrainingArguments
        from transformers import Trainer, TrainingArguments

        return Trainer, TrainingArguments

    def gaudi_config(self):
        """GaudiConfig from --gaudi_config_name, else fused Adam and fused clip-norm on."""
        from optimum.habana import GaudiConfig

        if self.gaudi_config_name:
            return GaudiConfig.from_pretrained(self.gaudi_config_name)
        config = GaudiConfig()
        config.use_fused_adam = True
        config.use_fused_clip_norm = True
        return config

    def trainer_kwargs(self, training_args: Any) -> dict:
        """Extra keyword arguments the Trainer class of this backend needs."""
        if self.is_gaudi:
            return {"gaudi_config": self.gaudi_config()}
        return {}

    def make_accelerator(self, **kwargs):
        """accelerate's Accelerator, or optimum-habana's GaudiAccelerator on HPU (PPO)."""
        if self.is_gaudi:
            from optimum.habana.accelerate import GaudiAccelerator

            return GaudiAccelerator(**kwargs)
        from accelerate import Accelerator

        return Accelerator(cpu=self.device == "cpu", **kwargs)

    def mark_step(self) -> Callable[[], None]:
        """The HPU lazy-mode graph cut, or a no-op elsewhere."""
        if self.is_gaudi and self.use_lazy_mode:
            import habana_frameworks.torch.core as htcore

            return htcore.mark_step
        return _no_op

    @property
    def uses_hpu_graphs(self) -> bool:
        """HPU graphs replay captured lazy-mode graphs: only on HPU in lazy mode."""
        return self.is_gaudi and self.use_lazy_mode

    def wrap_for_inference(self, model):
        """Run ``model`` (used for inference only, e.g. the PPO reward model) through HPU graphs.

        ``habana_frameworks.torch.hpu.wrap_in_hpu_graph`` on HPU in lazy mode; returns ``model``
        unchanged elsewhere. Feed it static shapes, or every new shape captures a new graph.
        """
        if not self.uses_hpu_graphs:
            return model
        from habana_frameworks.torch.hpu import wrap_in_hpu_graph

        return wrap_in_hpu_graph(model)

    def wrap_for_generation(self, model):
        """Make ``model.generate`` run its forward passes through HPU graphs; returns ``model``.

        For a model that is also trained (the PPO policy): the transformers model under any PEFT
        wrapper is wrapped once with ``habana_frameworks.torch.hpu.wrap_in_hpu_graph`` (as
        optimum-habana's GaudiPPOTrainer does), but the graphed forward is switched in only for
        the duration of each ``model.generate`` call; training forward passes stay plain. A no-op
        off HPU or outside lazy mode (HPU graphs need lazy mode). Calling it twice is harmless.
        Pad prompts to a fixed width (PPO's ``pad_max_input_len``) or every shape captures a graph.
        """
        if not self.uses_hpu_graphs or getattr(model, "_rlhf_generation_graphs", False):
            return model
        from habana_frameworks.torch.hpu import wrap_in_hpu_graph

        inner = _innermost_model(model)
        plain = inner.__dict__.get("forward")  # None: the class's forward
        wrap_in_hpu_graph(inner)  # replaces inner.forward in place
        graphed = inner.forward
        _set_forward(inner, plain)
        generate = model.generate

        @functools.wraps(generate)
        def generate_with_hpu_graphs(*args, **kwargs):
            inner.forward = graphed
            try:
                return generate(*args, **kwargs)
            finally:
                _set_forward(inner, plain)

        model.generate = generate_with_hpu_graphs
        model._rlhf_generation_graphs = True
        return model


def _set_forward(module, forward) -> None:
    if forward is None:
        module.__dict__.pop("forward", None)  # back to the class's forward
    else:
        module.forward = forward


def _innermost_model(model):
    """The transformers model inside PEFT / accelerate / DDP wrappers (what generate's forward calls)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and not hasattr(model, "generate"):  # DDP
            model = model.module
    return model


def _no_op() -> None:
    return None


def resolve_backend(args: BackendArguments) -> Backend:
    if args.use_habana or args.device == "hpu":
        # Habana's bridge reads the mode once, at import: set it before anything imports it.
        os.environ["PT_HPU_LAZY_MODE"] = "1" if args.use_lazy_mode else "0"
    device = choose_device(args.device, args.use_habana)
    if args.use_lazy_mode and device != "hpu":
        raise UserError("--use_lazy_mode needs an HPU (--use_habana); drop it on CPU or CUDA")
    return Backend(device=device, use_lazy_mode=args.use_lazy_mode, gaudi_config_name=args.gaudi_config_name)
