"""TEST-ONLY EMULATION: make optimum-habana's Gaudi code paths run on a CPU without Habana software.

Nothing here is part of the product, and nothing here shows that anything works on real Gaudi
hardware. It lets ``tests/habana`` (``make test-habana``, in ``.venv-habana``) check that our
scripts reach optimum-habana's Gaudi classes (``GaudiTrainer``, ``GaudiTrainingArguments``,
``GaudiConfig``, ``GaudiAccelerator``) with the arguments a Gaudi user passes, that the Habana
hooks are called (lazy-mode ``mark_step``, fused AdamW, fused clip-norm, HPU graphs), and that
the tensors entering the model have static shapes.

How (each item is the smallest change found that lets the real optimum-habana code run):

1. ``habana_frameworks`` (Habana's PyTorch bridge) is the stub package beside this file: it
   answers ``hpu.is_available() -> True``, counts ``core.mark_step()``, records
   ``hpu.wrap_in_hpu_graph`` (forward goes through a recorder, no graph is captured), gives
   torch's AdamW / ``clip_grad_norm_`` for ``FusedAdamW`` / ``FusedClipNorm``, zero memory stats
   for ``get_hpu_memory_stats``, and a CPU generator for ``hpu.random``. It does NOT register
   ``torch.hpu``, so transformers and accelerate see no HPU and keep tensors on the CPU.
2. ``import optimum.habana`` runs a SynapseAI version check that parses
   ``pip list | grep habana-torch-plugin`` and fails with no plugin installed:
   ``optimum.habana.utils.misc.get_habana_frameworks_version`` is replaced (before the check
   runs, through an import hook) by one that returns the validated SynapseAI version.
3. ``GaudiTrainingArguments(use_habana=True, ...)`` would set the device up through Habana's
   HCCL/HPU ``PartialState`` (and ``adapt_transformers_to_gaudi()``, whose Gaudi model classes
   need Habana kernels). Its ``__post_init__`` is wrapped to force ``use_cpu=True``: optimum-habana
   checks ``use_cpu`` first in ``_setup_devices`` and takes its CPU branch, while
   ``use_habana`` / ``use_lazy_mode`` stay True, so every ``use_habana``-gated branch of
   ``GaudiTrainer`` (lazy-mode ``mark_step``, ``FusedAdamW``, ``FusedClipNorm``, HPU RNG state,
   dynamic-shape switch) still runs against the stub.
4. Because the CPU branch skips ``adapt_transformers_to_gaudi()``, the model's generation config
   is transformers' own and lacks the Gaudi fields ``GaudiTrainer`` reads for Llama models
   (``attn_softmax_bf16``, ``use_flash_attention``, ``flash_attention_recompute``,
   ``flash_attention_causal_mask``): ``GaudiTrainer.__init__`` is wrapped to set them to False
   on the model when missing (False is what GaudiGenerationConfig's None amounts to).
5. Every ``LlamaModel`` (the decoder of the tiny test model, under any head or PEFT wrapper) gets
   a forward pre-hook that records the shapes of the tensors entering it
   (``RECORD["input_shapes"]``), to check static shapes.
6. ``torch.Tensor.to`` maps an ``hpu`` device to the CPU (``Module.to`` goes through it), so
   ``model.to(torch.device("hpu"))`` works; tensors created with ``device="hpu"`` are not mapped.
7. Instantiations of the four Gaudi classes, and the stub calls, are recorded in ``RECORD`` and
   written at exit to ``$HABANA_EMULATION_RECORD_DIR/record-<pid>.json`` for the tests to read.

Not exercised: Habana's kernels, graph compilation, HCCL, the Gaudi model classes of
``adapt_transformers_to_gaudi``, bf16 autocast on HPU, memory behaviour, speed.
"""

from __future__ import annotations

import atexit
import importlib.abc
import inspect
import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path

RECORD: dict = {"calls": Counter(), "instances": [], "events": [], "input_shapes": []}
_lock = threading.Lock()
_installed = False
GAUDI_GENERATION_FLAGS = ("attn_softmax_bf16", "use_flash_attention", "flash_attention_recompute", "flash_attention_causal_mask")


def record_call(name: str) -> None:
    with _lock:
        RECORD["calls"][name] += 1


def record_event(name: str, detail) -> None:
    with _lock:
        RECORD["events"].append([name, detail])


def record_instance(cls_name: str, **details) -> None:
    with _lock:
        RECORD["instances"].append({"class": cls_name, **details})


GRAPH_DEPTH = [0]  # > 0 while an (emulated) HPU-graph forward runs


def record_input_shapes(model_id: str, shapes: dict, training: bool, in_graph: bool, cached: bool) -> None:
    """One forward of a decoder: its inputs' shapes, train/eval mode, whether it ran through an
    (emulated) HPU graph, and whether a KV cache was already filled (a decode step)."""
    with _lock:
        RECORD["input_shapes"].append(
            {"model": model_id, "shapes": shapes, "training": training, "in_graph": in_graph, "decode_step": cached}
        )


def dump(path: str | os.PathLike | None = None) -> Path | None:
    """Write RECORD as JSON (default: ``$HABANA_EMULATION_RECORD_DIR/record-<pid>.json``)."""
    if path is None:
        folder = os.environ.get("HABANA_EMULATION_RECORD_DIR")
        if not folder:
            return None
        path = Path(folder) / f"record-{os.getpid()}.json"
    data = {
        "pid": os.getpid(),
        "rank": os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK"),
        "argv": sys.argv,
        "env": {k: os.environ.get(k) for k in ("PT_HPU_LAZY_MODE",)},
        "calls": dict(RECORD["calls"]),
        "instances": RECORD["instances"],
        "events": RECORD["events"],
        "input_shapes": RECORD["input_shapes"],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, default=str))
    return path


# ------------------------------------------------------------------ patches (see module docstring)


def _patch_misc(misc) -> None:
    from packaging import version

    validated = version.parse(str(misc.CURRENTLY_VALIDATED_SYNAPSE_VERSION))

    def get_habana_frameworks_version():
        """EMULATION: no habana-torch-plugin here; report the validated SynapseAI version."""
        return validated

    misc.get_habana_frameworks_version = get_habana_frameworks_version


def _run_before(cls, method: str, before) -> None:
    """Make ``cls.<method>`` call ``before(self, args, kwargs)`` first; patching twice is a no-op."""
    original = getattr(cls, method)
    if getattr(original, "_emulated", False):
        return

    def wrapper(self, *args, **kwargs):
        before(self, args, kwargs)
        return original(self, *args, **kwargs)

    wrapper._emulated = True
    setattr(cls, method, wrapper)


def _patch_training_args(module) -> None:
    def before(self, args, kwargs):
        record_instance(type(self).__name__, use_habana=self.use_habana, use_lazy_mode=self.use_lazy_mode,
                        use_cpu_requested=self.use_cpu)
        self.use_cpu = True  # EMULATION: take _setup_devices' CPU branch (no HPU device to set up)

    _run_before(module.GaudiTrainingArguments, "__post_init__", before)


def _wrap_init(cls) -> None:
    _run_before(cls, "__init__", lambda self, args, kwargs: record_instance(type(self).__name__))


def _patch_trainer(module) -> None:
    signature = inspect.signature(module.GaudiTrainer.__init__)

    def before(self, args, kwargs):
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        model, training_args, gaudi_config = bound.get("model"), bound.get("args"), bound.get("gaudi_config")
        config = getattr(model, "generation_config", None)
        if config is not None:
            for flag in GAUDI_GENERATION_FLAGS:  # EMULATION: fields GaudiGenerationConfig would have
                if not hasattr(config, flag):
                    setattr(config, flag, False)
        record_instance(
            type(self).__name__,
            use_habana=getattr(training_args, "use_habana", None),
            use_lazy_mode=getattr(training_args, "use_lazy_mode", None),
            use_fused_adam=getattr(gaudi_config, "use_fused_adam", None),
            use_fused_clip_norm=getattr(gaudi_config, "use_fused_clip_norm", None),
        )

    _run_before(module.GaudiTrainer, "__init__", before)


def _patch_llama(module) -> None:
    """Every LlamaModel (the decoder under causal-LM, classifier and PEFT wrappers) records the
    shapes of the tensors entering it: static-shape check."""
    cls = module.LlamaModel
    original = cls.__init__
    if getattr(original, "_emulated", False):
        return

    def hook(model, args, kwargs):
        names = ("input_ids", "attention_mask", "position_ids")  # LlamaModel.forward's first parameters
        shapes = {names[i] if i < len(names) else f"arg{i}": list(a.shape) for i, a in enumerate(args) if hasattr(a, "shape")}
        shapes.update({k: list(v.shape) for k, v in kwargs.items() if hasattr(v, "shape") and k != "past_key_values"})
        record_input_shapes(model._emulation_id, shapes, model.training, GRAPH_DEPTH[0] > 0,
                            kwargs.get("past_key_values") is not None and kwargs["past_key_values"].get_seq_length() > 0)

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._emulation_id = f"{os.getpid()}-{id(self)}"
        self.register_forward_pre_hook(hook, with_kwargs=True)

    __init__._emulated = True
    cls.__init__ = __init__


def _patch_gaudi_config(module) -> None:
    _wrap_init(module.GaudiConfig)


def _patch_accelerator(module) -> None:
    _wrap_init(module.GaudiAccelerator)


def _is_hpu(value) -> bool:
    import torch

    if isinstance(value, torch.device):
        return value.type == "hpu"
    return isinstance(value, str) and (value == "hpu" or value.startswith("hpu:"))


def _map_hpu_to_cpu() -> None:
    """``tensor.to("hpu")`` / ``module.to(torch.device("hpu"))`` land on the CPU (Module.to goes
    through Tensor.to). Factory functions with ``device="hpu"`` are not mapped."""
    import torch

    original = torch.Tensor.to
    if getattr(original, "_emulated", False):
        return

    def to(self, *args, **kwargs):
        if args and _is_hpu(args[0]):
            record_call("tensor_to_hpu")
            args = ("cpu", *args[1:])
        if _is_hpu(kwargs.get("device")):
            record_call("tensor_to_hpu")
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    to._emulated = True
    torch.Tensor.to = to


HOOKS = {
    "optimum.habana.utils.misc": _patch_misc,
    "optimum.habana.transformers.training_args": _patch_training_args,
    "optimum.habana.transformers.trainer": _patch_trainer,
    "optimum.habana.transformers.gaudi_configuration": _patch_gaudi_config,
    "optimum.habana.accelerate.accelerator": _patch_accelerator,
    "transformers.models.llama.modeling_llama": _patch_llama,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks and tools
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Patches the modules in HOOKS right after they execute, before anything else uses them."""

    def find_spec(self, fullname, path, target=None):
        patch = HOOKS.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Install the emulation in this process (idempotent). The stub package must be on sys.path."""
    global _installed
    if _installed:
        return
    _installed = True
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    sys.meta_path.insert(0, _PostImportFinder())
    _map_hpu_to_cpu()
    for name, patch in HOOKS.items():
        if name in sys.modules:
            patch(sys.modules[name])
    atexit.register(dump)
