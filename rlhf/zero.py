"""DeepSpeed ZeRO for every stage: the Trainer stages (SFT, RM, DPO) and PPO.

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
- ``inference_engine(model, config)``: a frozen model (DPO's and PPO's reference copy, PPO's reward
  model) under ZeRO-3: its own DeepSpeed engine without optimizer, partitioned like the trained model.
- ``full_parameters(model, engine)``: every parameter whole on every rank for a block (generation and
  passes outside the engine under ZeRO-3), the engine's fetch/release hooks off meanwhile.
- PPO (``rl_training.py``, not on the Trainer path): ``ppo_deepspeed_plugin`` builds accelerate's
  ``DeepSpeedPlugin`` from ``--deepspeed CONFIG`` or ``accelerate launch --use_deepspeed`` with the
  config's ``auto`` values filled from PPO's settings; ``rlhf.strategy.DeepSpeedStrategy`` then drives the
  engine (backward, step, the engine's own checkpoint).

Memory tables for docs/distributed.md are ``rlhf.zero_memory``; building DeepSpeed's C++ ops ahead of
time is ``python -m rlhf.deepspeed_ops``. Neither is on a run-time path.
Imports neither torch nor deepspeed at module level.
"""

from __future__ import annotations

import contextlib
import logging
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


def gathered_state_dict(model, is_main: bool, trainable_only: bool = False) -> dict | None:
    """``model.state_dict()`` with every ZeRO-3 parameter gathered, as CPU tensors, on the main rank.

    A collective under ZeRO-3: every rank must call it (they gather each parameter together, one at
    a time, so no rank ever holds more than one whole parameter beyond its partition). Returns the
    dict on the main rank and ``None`` elsewhere. Without ZeRO-3 it is ``model.state_dict()`` copied
    to CPU on the main rank. ``trainable_only``: only the parameters that require a gradient (a LoRA
    adapter and a value head, without gathering the frozen base)."""
    import torch

    state = model.state_dict(keep_vars=True)
    if trainable_only:
        state = {name: tensor for name, tensor in state.items()
                 if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad}
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


# ---------------------------------------------------------------- engines outside the Trainer (DPO reference, PPO)

HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def fill_hidden_size_auto(config: dict, model) -> dict:
    """``config`` with the bucket sizes left ``"auto"`` filled from the model's hidden size, as
    accelerate fills them for the model it prepares (h*h, 0.9*h*h, 10*h)."""
    zero = config.get("zero_optimization", {})
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    values = {} if hidden is None else dict(zip(HIDDEN_SIZE_KEYS, (hidden * hidden, int(0.9 * hidden * hidden),
                                                                   10 * hidden)))
    for key in HIDDEN_SIZE_KEYS:
        if zero.get(key) == "auto":
            if key not in values:
                raise UserError(f"DeepSpeed config: zero_optimization.{key} is \"auto\" but the model has no hidden_size "
                                "to fill it from; give it a number")
            zero[key] = values[key]
    return config


def inference_engine(model, config: Mapping):
    """``model`` (frozen) as its own DeepSpeed engine without an optimizer, in eval mode.

    Under ZeRO-3 a frozen model beside the trained one (DPO's and PPO's reference copy with ``--peft
    none``, PPO's reward model) is partitioned over the ranks like it and gathered layer by layer in
    each forward, as TRL's ``prepare_deepspeed`` does. Its forward passes are collectives: every rank
    must run the same number of them. ``config``: the run's DeepSpeed config (batch sizes filled);
    optimizer, scheduler and optimizer offload are dropped."""
    import copy

    import deepspeed

    config = copy.deepcopy(dict(config))
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config.setdefault("zero_optimization", {}).pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=fill_hidden_size_auto(config, model))
    engine.eval()
    return engine


def _parameter_offload(engine):
    """The ZeRO-3 object that holds an engine's per-module fetch/release hooks (None: no hooks)."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if hasattr(offload, "forward_hooks") else None


@contextlib.contextmanager
def full_parameters(model, engine=None):
    """Every parameter of ``model`` whole on every rank for the block; a no-op unless ZeRO-3 partitions it.

    For generation under ZeRO-3 (one gather for all the decoding steps instead of one per layer per
    token) and for forward passes of a model no engine drives yet. ``engine``: the DeepSpeed engine
    whose module contains ``model``; its per-module fetch/release hooks are taken off for the block
    and put back after (the same as TRL's ``unwrap_model_for_generation``). A collective: every rank
    must enter it. Each rank holds the whole model meanwhile."""
    parameters = list(model.parameters())
    if not any(is_partitioned(p) for p in parameters):
        yield model
        return
    import deepspeed

    offload = _parameter_offload(engine)
    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        if offload is not None:
            for parameter in offload.module.parameters():
                parameter.ds_active_sub_modules.clear()
            for hook in (*offload.forward_hooks, *offload.backward_hooks):
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield model
        finally:
            if offload is not None:
                coordinator = getattr(offload, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()
                offload._register_deepspeed_module(offload.module)


def nonfinite_parameter(model) -> str | None:
    """The name of a trainable parameter holding NaN/inf, or None; ZeRO-3 partitions included.

    Under ZeRO-3 each rank checks its own partitions (``ds_tensor``) and the ranks agree (a collective:
    every rank must call it), so a NaN in any partition is found on every rank."""
    import torch

    found = None
    partitioned = False
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        tensor = parameter.ds_tensor if is_partitioned(parameter) else parameter
        partitioned = partitioned or is_partitioned(parameter)
        if found is None and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            found = name
    if partitioned:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            names = [None] * dist.get_world_size()
            dist.all_gather_object(names, found)
            found = next((n for n in names if n is not None), None)
    return found


# ---------------------------------------------------------------- PPO under the DeepSpeed engine


def ppo_deepspeed_plugin(config_file: str | None, ppo_config, num_processes: int, device: str):
    """accelerate's ``DeepSpeedPlugin`` for PPO, or None without DeepSpeed.

    From ``--deepspeed CONFIG`` or from ``accelerate launch --use_deepspeed`` (its config file or
    ``--zero_stage`` flags). Refuses a ``deepspeed`` launcher without a config (it would run plain
    DDP). The config's ``auto`` values are filled from PPO's settings: a micro-batch is
    ``--mini_batch_size`` rollouts, ``--gradient_accumulation_steps`` of them make an optimizer step,
    the engine clips gradients to ``--max_grad_norm`` (0: off); PPO ends each accumulation window
    itself (``managed_gradient_accumulation: false``: the engine steps when PPO calls ``step``, not
    after a count of backward passes). Precision is the model's own (PPO's ``--bf16`` puts the frozen
    weights in bf16 and keeps adapters fp32); a config that turns on DeepSpeed's bf16/fp16 is refused."""
    import os

    from rlhf.distributed import deepspeed_launch

    launch = deepspeed_launch()
    from_accelerate = launch == "accelerate launch --use_deepspeed"
    if config_file is None and not from_accelerate:
        if launch is not None:
            raise UserError(
                f"started by {launch} but without a DeepSpeed config, so this run would not use DeepSpeed; pass "
                "--deepspeed configs/deepspeed/zero2.json (or zero3.json), or launch with torchrun for plain DDP"
            )
        return None
    from accelerate.utils import DeepSpeedPlugin

    if config_file is not None:
        source = f"--deepspeed {config_file}"
        if not os.path.isfile(config_file):
            raise UserError(f"{source}: no such file; pass a DeepSpeed JSON config such as configs/deepspeed/zero2.json")
        plugin = DeepSpeedPlugin(hf_ds_config=config_file)
    else:
        source = "accelerate launch --use_deepspeed"
        plugin = DeepSpeedPlugin()  # from the launcher's ACCELERATE_DEEPSPEED_* variables
    config = plugin.deepspeed_config
    for key in ("fp16", "bf16"):
        if str(config.get(key, {}).get("enabled", False)).lower() == "true":
            raise UserError(f"{source}: {key}.enabled is true, which would cast the whole policy (LoRA adapter and "
                            f"value head included) to 16 bits; set it to \"auto\" or false (PPO's --bf16 keeps the "
                            "frozen weights in bf16 and the trained ones in fp32)")
    if "optimizer" in config or "scheduler" in config:
        raise UserError(f"{source}: PPO builds its own optimizer (--learning_rate, --adafactor) and has no scheduler; "
                        "remove the optimizer and scheduler sections from the DeepSpeed config")
    stage = int(config.get("zero_optimization", {}).get("stage", 0) or 0)
    if ppo_config.early_stopping and ppo_config.gradient_accumulation_steps > 1:
        raise UserError(
            f"{source} with --early_stopping and --gradient_accumulation_steps {ppo_config.gradient_accumulation_steps}: "
            "early stopping drops the gradients of a half-accumulated window, which ZeRO has already reduced into "
            "its partitions and cannot drop; use --gradient_accumulation_steps 1 (a larger --mini_batch_size) "
            "or drop --early_stopping"
        )
    micro = ppo_config.mini_batch_size
    accumulation = ppo_config.gradient_accumulation_steps
    filled = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * num_processes,
        "gradient_clipping": ppo_config.max_grad_norm or 0.0,
    }
    for key, value in filled.items():
        if config.get(key, "auto") not in ("auto", value):
            raise UserError(f"{source}: {key} is {config[key]} but PPO's settings make it {value} "
                            "(--mini_batch_size, --gradient_accumulation_steps, --max_grad_norm); set it to \"auto\"")
        config[key] = value
    for key in ("fp16", "bf16"):
        config.setdefault(key, {})["enabled"] = False
    config["managed_gradient_accumulation"] = False
    config["zero_allow_untested_optimizer"] = True  # torch Adam / transformers' Adafactor, as the Trainer stages
    _start_accelerate_deepspeed("gloo" if device == "cpu" else None)
    logger.info("DeepSpeed ZeRO stage %d (%s), %d processes", stage, source, num_processes)
    return plugin


def _start_accelerate_deepspeed(backend: str | None) -> None:
    """Start accelerate's process state in DeepSpeed mode (``deepspeed.comm`` included) before the
    Accelerator is built. accelerate names a CPU process group only with ``cpu=True``, which also turns
    DeepSpeed off; without it a CPU run would be one process per rank (no gradients shared). So the
    state is started here with ``backend`` (gloo on CPU; None: accelerate's choice)."""
    import os

    from accelerate import PartialState

    _one_process_group_env()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what accelerate launch --use_deepspeed exports
    state = PartialState(backend=backend) if backend else PartialState()
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"accelerate started {state.num_processes} process(es) for a world of {os.environ['WORLD_SIZE']}")


def frozen_under_zero3(model, accelerator):
    """A frozen model beside PPO's policy (reference copy, reward model): under ZeRO-3 its own inference
    engine (``inference_engine``), partitioned like the policy; otherwise ``model`` itself."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return model
    return inference_engine(model, plugin.deepspeed_config)


def deepspeed_engine(model):
    """The DeepSpeed engine ``accelerator.prepare`` returned for ``model``, or None."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return None
    return model if isinstance(model, DeepSpeedEngine) else None


def zero_stage_of(engine) -> int:
    return 0 if engine is None else int(engine.zero_optimization_stage())
