"""``python -m rlhf.deepspeed_ops``: compile the C++ ops DeepSpeed builds at run time on this machine (on
CPU: the shared-memory comm op, about 60 s) into ``TORCH_EXTENSIONS_DIR``, so that runs and tests reuse
them. Run by ``make setup-deepspeed`` (and so by ``make test``), not by the demo, which never uses them."""

from __future__ import annotations


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
    print(build_ops())
