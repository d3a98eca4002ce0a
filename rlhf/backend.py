"""Backend choice, in one place: device, dtype, trainer classes, PPO accelerator, HPU specifics.

``resolve_backend`` turns the user's ``--device`` / ``--use_habana`` / ``--use_lazy_mode`` into a
``Backend``. Only an explicit request (``--use_habana`` or ``--device hpu``) or an HPU that Habana's
software actually reports takes the Gaudi path; a CPU or CUDA machine that merely has optimum-habana
installed gets transformers' ``Trainer`` and accelerate's ``Accelerator``.

Precision, also decided here only: ``bf16_supported(device)`` says whether the hardware computes in
bfloat16 natively (CPU: the ``avx512_bf16`` / ``amx_bf16`` flags, or ``bf16`` on Arm; CUDA:
``torch.cuda.is_bf16_supported`` without emulation; HPU: always). ``Backend.check_precision`` refuses
``--bf16`` where it is not (torch would emulate it, slower than fp32), ``--fp16`` on CPU, and both
together, each with one line; ``Backend.torch_dtype`` (weights in the requested dtype, for code that
runs its own loop, e.g. PPO) and ``Backend.trainer_model_dtype`` (fp32 master weights for a Trainer,
which autocasts to bf16/fp16 itself) both call it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.errors import UserError

logger = logging.getLogger("rlhf")
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


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo flags; Arm lists "bf16" under Features
BF16_HELP = ("drop --bf16 to run in fp32 (or use a machine with bf16 units: a CPU with avx512_bf16/amx_bf16, "
             "an Ampere or newer GPU, Gaudi)")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags from /proc/cpuinfo, or None where there is no such file (macOS, Windows)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_bf16_supported() -> bool:
    """Whether this CPU has bfloat16 instructions (else torch emulates bf16 in fp32, slower than fp32)."""
    flags = _cpu_flags()
    if flags is not None:
        return any(flag in flags for flag in CPU_BF16_FLAGS) or "bf16" in flags
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cuda_bf16_supported() -> bool:
    if not torch.cuda.is_available():
        return False
    check = torch.cuda.is_bf16_supported
    if "including_emulation" in inspect.signature(check).parameters:
        return bool(check(including_emulation=False))
    return bool(check())


def bf16_supported(device: str) -> bool:
    """THE bf16 capability check: does ``device`` (cpu, cuda, hpu) compute in bfloat16 natively?

    Every stage goes through ``Backend.check_precision``, which calls this; tests fake the hardware
    by monkeypatching ``rlhf.backend.bf16_supported``.
    """
    if device == "hpu":
        return True
    if device == "cuda":
        return cuda_bf16_supported()
    if device == "cpu":
        return cpu_bf16_supported()
    raise ValueError(f"unknown device {device!r}")


def bf16_unsupported_reason(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "this GPU"
        return f"--bf16 was requested but {name} has no bfloat16 units, so torch would emulate bf16 (slowly)"
    return ("--bf16 was requested but this CPU has no bfloat16 instructions (no avx512_bf16 or amx_bf16 flag), "
            "so bf16 would run as a slow emulation")


@dataclass
class Backend:
    device: str
    use_lazy_mode: bool = False
    gaudi_config_name: str | None = None

    @property
    def is_gaudi(self) -> bool:
        return self.device == "hpu"

    def check_precision(self, bf16: bool = False, fp16: bool = False) -> None:
        """Refuse, with one line, a precision this backend cannot run as asked (see the module docstring)."""
        if bf16 and fp16:
            raise UserError("--bf16 and --fp16 both set; pick one")
        if fp16 and self.device == "cpu":
            raise UserError("--fp16 is not supported on CPU (no fp16 autocast or loss scaling there); "
                            "use --bf16 on a CPU with bf16 units, or drop --fp16 for fp32")
        if fp16 and self.device == "hpu":
            raise UserError("--fp16 is not supported on Gaudi (optimum-habana trains in bf16); use --bf16")
        if bf16 and not bf16_supported(self.device):
            raise UserError(f"{bf16_unsupported_reason(self.device)}; {BF16_HELP}")

    def torch_dtype(self, bf16: bool = False, fp16: bool = False) -> torch.dtype:
        """Weights dtype for the requested precision, after ``check_precision``."""
        self.check_precision(bf16, fp16)
        if bf16:
            return torch.bfloat16
        if fp16:
            return torch.float16
        return torch.float32

    def check_training_precision(self, training_args: Any) -> None:
        """``check_precision`` for a TrainingArguments' bf16/fp16 (full-eval variants included)."""
        bf16 = bool(getattr(training_args, "bf16", False) or getattr(training_args, "bf16_full_eval", False))
        fp16 = bool(getattr(training_args, "fp16", False) or getattr(training_args, "fp16_full_eval", False))
        self.check_precision(bf16, fp16)

    def trainer_model_dtype(self, training_args: Any) -> torch.dtype:
        """Dtype to load a model in that a Trainer trains: fp32, after ``check_training_precision``.

        The Trainer's ``--bf16``/``--fp16`` is mixed precision: it autocasts the forward pass, while
        weights, gradients and optimizer states stay fp32 (bf16 weights would lose small updates).
        """
        self.check_training_precision(training_args)
        if training_args.bf16 or training_args.fp16:
            logger.info("Precision: %s autocast, fp32 weights and optimizer states",
                        "bf16" if training_args.bf16 else "fp16")
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

    def make_accelerator(self, deepspeed_plugin=None, **kwargs):
        """accelerate's Accelerator, or optimum-habana's GaudiAccelerator on HPU (PPO); with ``deepspeed_plugin``
        (``rlhf.zero.ppo_deepspeed_plugin``) it runs the DeepSpeed engine."""
        if deepspeed_plugin is not None:
            kwargs["deepspeed_plugin"] = deepspeed_plugin
        if self.is_gaudi:
            from optimum.habana.accelerate import GaudiAccelerator

            return GaudiAccelerator(**kwargs)
        from accelerate import Accelerator

        # cpu=True would make accelerate ignore DeepSpeed; without it a CPU-only machine still runs on CPU.
        return Accelerator(cpu=self.device == "cpu" and deepspeed_plugin is None, **kwargs)

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

        inner = innermost_model(model)
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


def innermost_model(model):
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
