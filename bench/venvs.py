"""Extra virtual environments for the comparison frameworks (created by ``run_bench.py`` when missing).

Each venv gets ``torch==2.13.0`` (the local CPU wheel) FIRST, then its framework with ``torch==2.13.0``
repeated in the same pip command, so pip can never swap in another (CUDA, GB-sized) torch. After the
install, ``pip check`` runs and the torch version is asserted.

    python bench/venvs.py [trl112|trl0114 ...]     # create what is missing, print install times
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"

# name -> (venv dir, packages installed after torch). Versions chosen so pip check passes:
#  trl 1.12.0 (last release with trl.experimental.ppo) needs transformers>=4.56.2; it was developed
#  against transformers 5.13 (its code tests for 5.13.0.dev0), so transformers is pinned there.
#  trl 0.11.4 (the old generate()/step() API) predates transformers 5 and numpy 2.
VENVS = {
    "trl112": (
        BENCH / ".venv-trl112",
        ["trl==1.12.0", "transformers==5.13.1", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0", "psutil"],
    ),
    "trl0114": (
        BENCH / ".venv-trl0114",
        ["trl==0.11.4", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.0.1", "numpy<2", "datasets<3.2", "pyarrow<19", "rich",
         "psutil"],
    ),
}


def python_of(name: str) -> Path:
    return VENVS[name][0] / "bin" / "python"


def ready(name: str) -> bool:
    return (VENVS[name][0] / ".installed").is_file()


def create(name: str, python: str | None = None, log=print) -> float:
    """Create venv ``name`` (removing a half-made one); return the seconds it took."""
    venv, packages = VENVS[name]
    python = python or shutil.which("python3.11") or sys.executable
    start = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [python, "-m", "venv", str(venv)],
        pip + [TORCH],
        pip + [TORCH, *packages],
        [str(venv / "bin" / "python"), "-m", "pip", "check"],
        [str(venv / "bin" / "python"), "-c",
         "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"],
    ]
    for cmd in steps:
        log(f"[{name}] $ {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    (venv / ".installed").write_text(json.dumps({"seconds": round(seconds, 1), "packages": [TORCH, *packages]}) + "\n")
    log(f"[{name}] ready in {seconds:.0f} s")
    return seconds


def install_seconds(name: str) -> float | None:
    marker = VENVS[name][0] / ".installed"
    return json.loads(marker.read_text()).get("seconds") if marker.is_file() else None


if __name__ == "__main__":
    for venv_name in sys.argv[1:] or list(VENVS):
        if ready(venv_name):
            print(f"[{venv_name}] already there (installed in {install_seconds(venv_name)} s)")
        else:
            create(venv_name)
