"""TEST-ONLY EMULATION of Intel Habana's ``habana_frameworks`` package. Not Habana software.

This stub exists so that optimum-habana's Gaudi code paths can be exercised on a CPU-only
machine by ``tests/habana``. Every function here either records that it was called (see
``habana_emulation.RECORD``) or does the CPU/torch equivalent. It is put on ``sys.path`` only by
the Gaudi-stack tests (``make test-habana``); the product never imports it, and nothing here
says anything about how real Gaudi hardware behaves.
"""

EMULATED = True
__version__ = "0.0.0+cpu-emulation"
