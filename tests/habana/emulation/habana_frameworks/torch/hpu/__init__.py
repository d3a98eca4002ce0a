"""TEST-ONLY EMULATION of ``habana_frameworks.torch.hpu`` (device queries, HPU graphs, memory).

``is_available()`` answers True so that the code under test takes its Gaudi branch; tensors stay
on the CPU. ``wrap_in_hpu_graph`` records the call and wraps ``forward`` in a recorder instead of
capturing a graph.
"""

from __future__ import annotations

import functools

import habana_emulation
from habana_emulation import record_call, record_event

from . import random  # noqa: F401


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def get_device_name(device=None) -> str:
    return "GAUDI2"


def is_initialized() -> bool:
    return True


def synchronize(device=None) -> None:
    return None


def enable_dynamic_shape() -> None:
    record_call("enable_dynamic_shape")


def disable_dynamic_shape() -> None:
    record_call("disable_dynamic_shape")


def memory_stats(device=None) -> dict:
    return {"InUse": 0, "MaxInUse": 0, "Limit": 0}


def reset_peak_memory_stats(device=None) -> None:
    return None


def wrap_in_hpu_graph(module, asynchronous=False, disable_tensor_cache=False, dry_run=False, max_graphs=None, verbose=False):
    """Record the wrap; route ``module.forward`` through a recorder (no graph is captured)."""
    record_call("wrap_in_hpu_graph")
    record_event("wrap_in_hpu_graph", type(module).__name__)
    original = module.forward

    @functools.wraps(original)
    def graphed_forward(*args, **kwargs):
        record_call("hpu_graph_forward")
        habana_emulation.GRAPH_DEPTH[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            habana_emulation.GRAPH_DEPTH[0] -= 1

    module.forward = graphed_forward
    return module


class ModuleCacher:
    """Stand-in for HPU-graph training caching (``use_hpu_graphs_for_training``): no-op."""

    def __call__(self, model, inplace=True, **kwargs):
        record_call("module_cacher")
        return model
