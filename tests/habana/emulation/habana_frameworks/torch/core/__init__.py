"""TEST-ONLY EMULATION of ``habana_frameworks.torch.core``: ``mark_step`` counts its calls.

On a Gaudi, ``mark_step`` cuts the lazy-mode graph and launches it; on CPU there is nothing to
launch, so the emulation only counts (``habana_emulation.RECORD["mark_step"]``).
"""

from habana_emulation import record_call


def mark_step(*args, **kwargs) -> None:
    record_call("mark_step")


def hpu_set_env(*args, **kwargs) -> None:
    return None
