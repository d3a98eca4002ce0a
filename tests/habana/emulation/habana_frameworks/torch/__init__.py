"""TEST-ONLY EMULATION of ``habana_frameworks.torch`` (see ``habana_frameworks/__init__``).

Unlike the real package it does NOT register ``torch.hpu`` or an ``hpu`` device with torch, so
transformers and accelerate keep tensors on the CPU (their own HPU checks read ``torch.hpu``).
The real bridge reads ``PT_HPU_LAZY_MODE`` once, when this package is imported: the emulation
records its value at that moment so tests can check that it was set in time.
"""

import os

from habana_emulation import record_event

record_event("import habana_frameworks.torch", os.environ.get("PT_HPU_LAZY_MODE"))

from habana_frameworks.torch import core, hpu  # noqa: E402,F401  (real package exposes both)
