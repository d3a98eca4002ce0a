"""TEST-ONLY EMULATION loader: Python imports ``sitecustomize`` at start-up from ``sys.path``.

``tests/habana`` puts this folder on ``PYTHONPATH`` for the stage scripts it runs in
subprocesses (also under ``mpirun``), so that every such process installs the CPU emulation of
Habana's software (``habana_emulation``) before the script imports anything. Never on the path
outside those tests.
"""

import habana_emulation

habana_emulation.install()
