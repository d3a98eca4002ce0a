"""DeepSpeed ZeRO for the Trainer stages (``finetune_clm.py``, ``reward_modeling.py``).

transformers' Trainer drives the DeepSpeed engine itself once ``--deepspeed CONFIG`` is given; what
the stage scripts add around it:

- ``prepare_deepspeed(training_args)``: call right after parsing, before loading the model. Refuses
  (one line, exit 2) a ZeRO-3 config whose final save would not write loadable weights
  (``stage3_gather_16bit_weights_on_model_save`` off), and starts ``deepspeed.comm``
  (``deepspeed.init_distributed``). On CUDA accelerate does that itself; on CPU the Trainer only
  sets up a gloo group, and ZeRO-3's ``deepspeed.zero.Init`` (inside ``from_pretrained``) then sees
  world size 1 and fails its batch-size check.
- ``numel(parameter)``: the real size of a parameter; a ZeRO-3 placeholder has ``numel() == 0``
  and keeps its size in ``ds_numel``.
- ``gathered_state_dict(model)``: the full weights of a (possibly ZeRO-3 partitioned) model, one
  parameter at a time gathered on EVERY rank (a collective: all ranks must call it) and copied to
  CPU on rank 0, which alone gets the dict.
- ``plain_copy(model, state_dict)``: on rank 0, a plain (not partitioned) CPU model of the same
  class, PEFT wrapper included, holding ``state_dict``: what ``reward_modeling.py`` merges LoRA
  into and saves.
- ``model_to_save(trainer)``: on every rank after training; ``trainer.model``, or under ZeRO-3 the
  plain copy above on rank 0 (``None`` elsewhere).
- ``check_no_placeholders(state_dict, what)``: raise instead of writing a 0-element tensor. A save
  from partitioned weights that were not gathered writes such tensors and would otherwise "succeed".
- Memory per device for docs/distributed.md: ``model_states_bytes`` (the ZeRO paper's formulas),
  ``memory_table`` (Llama-2 7B/13B/70B, SFT/RM/PPO, LoRA/full, ZeRO-2/3) and
  ``deepspeed_estimates`` (DeepSpeed's own estimators for comparison).

``python -m rlhf.zero --build-ops`` compiles DeepSpeed's run-time C++ ops for this machine into
``TORCH_EXTENSIONS_DIR`` (``make setup`` does); ``--memory-table`` prints the tables.
Imports neither torch nor deepspeed at module level.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

from rlhf.errors import UserError

logger = logging.getLogger("rlhf")

GATHER_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"


class PlaceholderWeights(RuntimeError):
    """A save would write partitioned (0-element) ZeRO-3 placeholders instead of weights."""


def deepspeed_config(training_args):
    """(DeepSpeed config object, where it came from) of a run, or (None, None) without DeepSpeed.

    From ``--deepspeed CONFIG``, or from ``accelerate launch --use_deepspeed`` (transformers then builds
    accelerate's ``DeepSpeedPlugin`` from the launcher's variables: ``--deepspeed_config_file`` or its
    ``--zero_stage`` ... flags)."""
    if getattr(training_args, "deepspeed", None):
        return training_args.hf_deepspeed_config, f"--deepspeed {training_args.deepspeed}"
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "hf_ds_config", None) is not None:
        return plugin.hf_ds_config, "accelerate launch --use_deepspeed"
    return None, None


def zero_stage(training_args) -> int:
    """The ZeRO stage of the run (0 without DeepSpeed)."""
    config, _ = deepspeed_config(training_args)
    return 0 if config is None else int(config.get_value("zero_optimization.stage", 0) or 0)


def prepare_deepspeed(training_args) -> int:
    """Check the DeepSpeed config and start ``deepspeed.comm``; returns the ZeRO stage (0: no DeepSpeed).

    Call on every rank after ``TrainingArguments`` exist and before ``from_pretrained``. Refuses the
    ``deepspeed`` launcher without ``--deepspeed CONFIG`` (it would silently run plain DDP)."""
    from rlhf.distributed import deepspeed_launch

    config, source = deepspeed_config(training_args)
    if config is None:
        launch = deepspeed_launch()
        if launch is not None:
            raise UserError(
                f"started by {launch} but without a DeepSpeed config, so this run would not use DeepSpeed; pass "
                "--deepspeed configs/deepspeed/zero2.json (or zero3.json), or launch with torchrun for plain DDP"
            )
        return 0
    stage = zero_stage(training_args)
    if config.is_zero3() and config.get_value(f"zero_optimization.{GATHER_ON_SAVE}", False) is not True:
        raise UserError(
            f"{source}: ZeRO-3 without zero_optimization.{GATHER_ON_SAVE}: true would save only DeepSpeed's "
            "partitioned checkpoint, not a model from_pretrained loads; set it to true (as "
            "configs/deepspeed/zero3.json does; accelerate launch: --zero3_save_16bit_model true)"
        )
    import deepspeed
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        _one_process_group_env()
        backend = training_args.ddp_backend
        if backend is None and getattr(training_args, "use_cpu", False):
            backend = "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    logger.info("DeepSpeed ZeRO stage %d (%s), %d processes", stage, source, deepspeed.comm.get_world_size())
    return stage


def _one_process_group_env() -> None:
    """``python script.py --deepspeed ...`` (no launcher): the variables of a 1-process group, which
    ``deepspeed.init_distributed`` would otherwise look for through MPI (and fail without mpi4py)."""
    import os
    import socket

    if os.environ.get("RANK", "").strip() or os.environ.get("WORLD_SIZE", "").strip():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(port))):
        os.environ.setdefault(name, value)


def is_partitioned(tensor) -> bool:
    """A ZeRO-3 parameter (gathered or not)."""
    return hasattr(tensor, "ds_id")


def numel(parameter) -> int:
    """Number of elements of ``parameter``, also of a ZeRO-3 placeholder (``ds_numel``)."""
    return int(parameter.ds_numel) if hasattr(parameter, "ds_numel") else parameter.numel()


def check_no_placeholders(state_dict: Mapping, what: str) -> None:
    """Raise ``PlaceholderWeights`` if any tensor in ``state_dict`` is empty (a ZeRO-3 placeholder)."""
    empty = [name for name, tensor in state_dict.items() if hasattr(tensor, "numel") and tensor.numel() == 0]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise PlaceholderWeights(
            f"refusing to write {what}: {len(empty)} tensor(s) have 0 elements ({shown}), i.e. ZeRO-3 partitions "
            "that were not gathered; gather them on every rank first (rlhf.zero.gathered_state_dict)"
        )


def gathered_state_dict(model, is_main: bool) -> dict | None:
    """``model.state_dict()`` with every ZeRO-3 parameter gathered, as CPU tensors, on the main rank.

    A collective under ZeRO-3: every rank must call it (they gather each parameter together, one at
    a time, so no rank ever holds more than one whole parameter beyond its partition). Returns the
    dict on the main rank and ``None`` elsewhere. Without ZeRO-3 it is ``model.state_dict()`` copied
    to CPU on the main rank."""
    import torch

    state = model.state_dict(keep_vars=True)
    partitioned = [t for t in state.values() if is_partitioned(t)]
    result: dict | None = {} if is_main else None
    gather = _gather_context() if partitioned else None
    for name, tensor in state.items():
        context = gather([tensor]) if gather is not None and is_partitioned(tensor) else contextlib.nullcontext()
        with context, torch.no_grad():
            if result is not None:
                result[name] = tensor.detach().to("cpu", copy=True)
    if result is not None:
        check_no_placeholders(result, "the gathered weights")
    return result


def _gather_context():
    import deepspeed

    def gather(params: Iterable):
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    return gather


@contextlib.contextmanager
def zero3_init_disabled():
    """Build models as plain modules while a ZeRO-3 Trainer is alive.

    transformers partitions every model it builds while a ZeRO-3 ``HfDeepSpeedConfig`` is registered
    (``is_deepspeed_zero3_enabled()``); this unregisters it for the block and restores it after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def plain_copy(model, state_dict: Mapping):
    """A plain CPU model like ``model`` (a transformers model, or a PEFT model around one) holding
    ``state_dict`` (from ``gathered_state_dict``). Tensors are used as they are, not copied: the
    structure is built on the meta device and the weights assigned, so rank 0 holds the model once."""
    import copy

    import torch

    check_no_placeholders(state_dict, "the model copy")
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config is not None else model
    config = copy.deepcopy(base.config)
    with zero3_init_disabled(), torch.device("meta"):
        plain = type(base)._from_config(config, **_dtype_kwarg(base))
        if peft_config is not None:
            from peft import get_peft_model

            name = getattr(model, "active_adapter", "default")
            plain = get_peft_model(plain, copy.deepcopy(peft_config[name]), adapter_name=name)
    missing, unexpected = plain.load_state_dict(dict(state_dict), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"rebuilding {type(base).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _materialise_buffers(plain, base)
    return plain.eval()


def _dtype_kwarg(model) -> dict:
    import torch

    from rlhf.compat import dtype_kwargs

    dtype = getattr(model, "dtype", None)
    return dtype_kwargs(dtype) if isinstance(dtype, torch.dtype) else {}


def _materialise_buffers(plain, original) -> None:
    """Non-persistent buffers (not in a state dict, e.g. rotary ``inv_freq``) left on the meta device:
    copy them from the original model, whose buffers ZeRO-3 does not partition."""
    import torch

    originals = dict(original.named_buffers())
    prefix_free = {name.split("base_model.model.", 1)[-1]: value for name, value in originals.items()}
    for module_name, module in plain.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is None or buffer.device.type != "meta":
                continue
            full = f"{module_name}.{name}" if module_name else name
            key = full.split("base_model.model.", 1)[-1]
            source = prefix_free.get(key)
            if source is None:
                raise RuntimeError(f"buffer {full} has no value to copy from the trained model")
            with torch.no_grad():
                module._buffers[name] = source.detach().to("cpu", copy=True)


def model_to_save(trainer):
    """The trained model as the main process should save it; call on EVERY rank.

    Without ZeRO-3: ``trainer.model``. Under ZeRO-3 the weights are gathered on all ranks (a
    collective) and the main process gets a plain CPU copy (``plain_copy``, PEFT wrapper kept so
    LoRA can be merged into it); other ranks get ``None``."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    model = trainer.model
    if not (getattr(trainer, "is_deepspeed_enabled", False) and is_deepspeed_zero3_enabled()):
        return model
    engine = getattr(trainer, "model_wrapped", None)
    if hasattr(engine, "empty_partition_cache"):
        # An evaluation can leave parameters prefetched or in flight; settle them all into partitions.
        engine.empty_partition_cache()
    is_main = trainer.is_world_process_zero()
    state = gathered_state_dict(model, is_main)
    return plain_copy(model, state) if is_main else None


# ---------------------------------------------------------------- memory per device (docs/distributed.md)

GIB = 2**30
BYTES_16BIT = 2  # bf16/fp16 parameters, and their gradients
BYTES_ADAM = 12  # fp32 master weights + Adam's two moments


@dataclass(frozen=True)
class LlamaShape:
    """The Llama-2 shapes the memory table uses (hub configs of meta-llama/Llama-2-{7,13,70}b-hf)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # hidden / heads * key-value heads (70B uses grouped-query attention)
    vocab: int = 32000

    def causal_lm(self) -> int:
        """Parameters of the causal LM (untied embedding and LM head)."""
        h = self.hidden
        per_layer = 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h  # attention, MLP, 2 norms
        return self.vocab * h + self.layers * per_layer + h + self.vocab * h

    def classifier(self) -> int:
        """Parameters of the one-output sequence classifier (reward model): no LM head, a ``score`` row."""
        return self.causal_lm() - self.vocab * self.hidden + self.hidden

    def lora(self, rank: int = 8) -> int:
        """LoRA parameters on q/k/v/o (our default targets): ``rank * (in + out)`` per projection."""
        h = self.hidden
        return self.layers * rank * ((h + h) + (h + self.kv_dim) * 2 + (h + h))

    def largest_layer(self) -> int:
        return self.vocab * self.hidden


LLAMA2 = (LlamaShape("7B", 4096, 32, 11008, 4096), LlamaShape("13B", 5120, 40, 13824, 5120),
          LlamaShape("70B", 8192, 80, 28672, 1024))


def model_states_bytes(total: int, trainable: int, devices: int, stage: int, frozen_models: int = 0) -> float:
    """Bytes per device of model states for mixed-precision Adam, from the ZeRO paper's formulas.

    ``total`` parameters of the trained model, ``trainable`` of them trained (all: full fine-tune;
    LoRA: the adapter), ``frozen_models`` parameters of other models kept in 16-bit (PPO's reward
    model). 16-bit parameters: 2 bytes each, replicated under ZeRO-2 and partitioned over ``devices``
    under ZeRO-3; trainable parameters add 2 bytes of gradient and 12 of optimizer state, partitioned
    under both stages."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage {stage}: only 2 and 3 are tabulated")
    partitioned = (BYTES_16BIT + BYTES_ADAM) * trainable / devices
    weights = BYTES_16BIT * (total + frozen_models)
    return (weights if stage == 2 else weights / devices) + partitioned


def memory_rows(devices: int = 8) -> list[tuple[str, str, str, float, float]]:
    """(model, stage, PEFT, ZeRO-2 GiB, ZeRO-3 GiB) per device for the Llama-2 sizes.

    PPO: the policy (trained as in SFT, plus a value head) and the reward model (16-bit, frozen); with
    LoRA the reference policy is the base with the adapter switched off (no copy), with a full
    fine-tune it is a frozen 16-bit copy."""
    rows = []
    for shape in LLAMA2:
        lm, rm, lora = shape.causal_lm(), shape.classifier(), shape.lora()
        head = shape.hidden + 1  # PPO's value head
        cases = {
            ("SFT", "LoRA"): (lm + lora, lora, 0),
            ("SFT", "full"): (lm, lm, 0),
            ("RM", "LoRA"): (rm + lora + shape.hidden, lora + shape.hidden, 0),  # + score head trained in full
            ("RM", "full"): (rm, rm, 0),
            ("PPO", "LoRA"): (lm + lora + head, lora + head, rm),
            ("PPO", "full"): (lm + head, lm + head, rm + lm),
        }
        for (stage, peft), (total, trainable, frozen) in cases.items():
            rows.append((shape.name, stage, peft, model_states_bytes(total, trainable, devices, 2, frozen) / GIB,
                         model_states_bytes(total, trainable, devices, 3, frozen) / GIB))
    return rows


def memory_table(devices: int = 8) -> str:
    """``memory_rows`` as the Markdown table in docs/distributed.md."""
    lines = [f"| model | stage | PEFT | ZeRO-2 GiB/device | ZeRO-3 GiB/device |", "|---|---|---|---:|---:|"]
    for model, stage, peft, zero2, zero3 in memory_rows(devices):
        lines.append(f"| {model} | {stage} | {peft} | {zero2:.1f} | {zero3:.1f} |")
    return "\n".join(lines)


def deepspeed_estimates(devices: int = 8) -> list[tuple[str, int, float, float, float, float]]:
    """Full fine-tune of each causal LM, 1 node of ``devices``, no offload: (model, parameters, formula and
    DeepSpeed-estimator GiB for ZeRO-2, then for ZeRO-3). The estimators count 18 bytes per parameter
    partitioned (they add an fp32 gradient) where the formula has 14 (ZeRO-2) or 16 (ZeRO-3), and for
    ZeRO-3 also the largest layer gathered in fp32."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for shape in LLAMA2:
        n = shape.causal_lm()
        _, ds2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=devices, cpu_offload=False)
        _, ds3, _ = estimate_zero3_model_states_mem_needs(n, shape.largest_layer(), num_gpus_per_node=devices,
                                                          cpu_offload=False, cpu_offload_params=False)
        rows.append((shape.name, n, model_states_bytes(n, n, devices, 2) / GIB, ds2 / GIB,
                     model_states_bytes(n, n, devices, 3) / GIB, ds3 / GIB))
    return rows


def build_ops() -> str:
    """Compile the C++ ops DeepSpeed builds at run time on this machine (on CPU: the shared-memory
    comm op, about 60 s), into ``TORCH_EXTENSIONS_DIR``, so that runs and tests reuse them."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return f"nothing to build ahead for the {accelerator.device_name()} accelerator"
    import importlib

    build_shm_op = importlib.import_module("deepspeed.comm.torch").build_shm_op  # not the `torch` name in deepspeed.comm
    return "built deepspeed_shm_comm" if build_shm_op() is not None else "shm comm op not compatible here"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--build-ops"]:
        print(build_ops())
    elif sys.argv[1:] == ["--memory-table"]:
        print(memory_table())
        print("\n| model | parameters | ZeRO-2 formula | ZeRO-2 DeepSpeed | ZeRO-3 formula | ZeRO-3 DeepSpeed |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, n, f2, d2, f3, d3 in deepspeed_estimates():
            print(f"| {name} | {n:,} | {f2:.1f} | {d2:.1f} | {f3:.1f} | {d3:.1f} |")
    else:
        sys.exit("usage: python -m rlhf.zero --build-ops | --memory-table")
