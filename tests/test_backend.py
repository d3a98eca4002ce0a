"""Tests for rlhf/backend.py: device, dtype and trainer-class choice in one place.

This machine has no GPU and no Habana software, so every explicit HPU/CUDA request must stop with
one ``UserError`` line, and ``auto`` must give CPU with transformers' Trainer. The Gaudi packages
that a CPU/CUDA machine might merely have installed are emulated with TEST DOUBLES (fake packages
written to a temporary directory), never by the product.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import transformers

import rlhf.backend

from rlhf.backend import Backend, BackendArguments, choose_device, hpu_is_available, resolve_backend
from rlhf.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_MODULE_PREFIXES = ("optimum", "habana_frameworks")


def _gaudi_packages_present() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in FAKE_MODULE_PREFIXES)


pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or _gaudi_packages_present(),
    reason="these tests assume a machine without CUDA and without Habana/optimum packages (they install doubles)",
)


def _one_line(message: str) -> None:
    assert message and "\n" not in message


def _forget_fake_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_MODULE_PREFIXES:
            del sys.modules[name]


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Returns a function writing fake packages {dotted.name: source} onto sys.path.

    TEST DOUBLE: emulates a machine where optimum-habana / habana_frameworks are importable but no
    HPU exists. The product must never take the Gaudi path because of such packages.
    """
    root = tmp_path / "fake_site"

    def install(modules: dict[str, str]) -> None:
        for dotted, source in modules.items():
            package = root.joinpath(*dotted.split("."))
            package.mkdir(parents=True, exist_ok=True)
            (package / "__init__.py").write_text(textwrap.dedent(source))
            for depth in range(1, len(dotted.split("."))):  # parent packages
                parent = root.joinpath(*dotted.split(".")[:depth]) / "__init__.py"
                if not parent.exists():
                    parent.write_text("")
        monkeypatch.syspath_prepend(str(root))
        _forget_fake_modules()

    yield install
    _forget_fake_modules()


# ---------------------------------------------------------------- CPU, the default here


def test_auto_is_cpu_with_transformers_trainer():
    assert not hpu_is_available()
    assert choose_device("auto") == "cpu"
    backend = resolve_backend(BackendArguments())
    assert backend.device == "cpu" and not backend.is_gaudi
    trainer_class, args_class = backend.trainer_classes()
    assert trainer_class is transformers.Trainer
    assert args_class is transformers.TrainingArguments
    assert backend.trainer_kwargs(None) == {}
    assert backend.mark_step()() is None  # no-op off HPU


def test_explicit_cpu():
    backend = resolve_backend(BackendArguments(device="cpu"))
    assert backend.device == "cpu"
    assert backend.trainer_classes()[0] is transformers.Trainer


def test_cpu_accelerator_is_accelerates():
    from accelerate import Accelerator

    accelerator = Backend(device="cpu").make_accelerator()
    assert type(accelerator) is Accelerator
    assert accelerator.device.type == "cpu"


# ---------------------------------------------------------------- impossible requests


@pytest.mark.parametrize(
    "args",
    [
        BackendArguments(use_habana=True),
        BackendArguments(device="hpu"),
        BackendArguments(device="hpu", use_habana=True, use_lazy_mode=True),
    ],
    ids=["use_habana", "device_hpu", "hpu_lazy"],
)
def test_hpu_request_without_habana_is_user_error(args, monkeypatch):
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    with pytest.raises(UserError, match="Gaudi") as error:
        resolve_backend(args)
    _one_line(str(error.value))


def test_cuda_request_without_gpu_is_user_error():
    with pytest.raises(UserError, match="cuda") as error:
        resolve_backend(BackendArguments(device="cuda"))
    _one_line(str(error.value))


def test_contradictory_use_habana_device_cpu():
    with pytest.raises(UserError, match="contradicts") as error:
        choose_device("cpu", use_habana=True)
    _one_line(str(error.value))


def test_lazy_mode_without_hpu():
    with pytest.raises(UserError, match="use_lazy_mode") as error:
        resolve_backend(BackendArguments(device="cpu", use_lazy_mode=True))
    _one_line(str(error.value))


def test_unknown_device():
    with pytest.raises(UserError, match="not one of"):
        choose_device("tpu")


@pytest.mark.parametrize("flags", [["--use_habana"], ["--device", "hpu"]], ids=["use_habana", "device_hpu"])
def test_hpu_request_from_a_script_exits_2_with_one_line(flags, tmp_path):
    """Through a real script: exit 2, the error as the last stderr line, no traceback."""
    result = subprocess.run(
        [sys.executable, "merge_peft_adapter.py", "--adapter_model_name", str(tmp_path), "--output_name",
         str(tmp_path / "out"), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("merge_peft_adapter.py: error:") and "Gaudi" in lines[-1]
    assert len(lines) == 1, result.stderr


# ---------------------------------------------------------------- installed-but-no-HPU machines


def test_optimum_habana_installed_without_hpu_stays_on_cpu(fake_packages):
    # TEST DOUBLE: an importable optimum.habana (as on a CUDA/CPU box with the package installed).
    fake_packages({
        "optimum.habana": """
            # Emulation of an installed optimum-habana on a machine without an HPU (test double).
            class GaudiTrainer: pass
            class GaudiTrainingArguments: pass
            class GaudiConfig: pass
        """,
    })
    import importlib.util

    assert importlib.util.find_spec("optimum.habana") is not None  # the double is visible
    assert choose_device("auto") == "cpu"
    backend = resolve_backend(BackendArguments())
    assert backend.device == "cpu"
    trainer_class, args_class = backend.trainer_classes()
    assert trainer_class is transformers.Trainer and args_class is transformers.TrainingArguments
    assert "optimum.habana" not in sys.modules  # the Gaudi package was not even imported


def test_habana_frameworks_reporting_no_hpu_stays_on_cpu(fake_packages):
    # TEST DOUBLE: habana_frameworks present, but its hpu.is_available() says no device.
    fake_packages({
        "habana_frameworks.torch.hpu": """
            # Emulation of Habana software on a machine with no HPU attached (test double).
            def is_available():
                return False
        """,
        "optimum.habana": """
            class GaudiTrainer: pass
            class GaudiTrainingArguments: pass
        """,
    })
    assert not hpu_is_available()
    assert choose_device("auto") == "cpu"
    backend = resolve_backend(BackendArguments())
    assert backend.trainer_classes()[0] is transformers.Trainer
    with pytest.raises(UserError, match="Gaudi"):
        choose_device("hpu")


def test_habana_frameworks_reporting_an_hpu_takes_gaudi_path(fake_packages, monkeypatch):
    """The converse (so the two tests above could fail): a reported HPU is picked by auto."""
    fake_packages({
        "habana_frameworks.torch.hpu": """
            # Emulation of Habana software WITH an HPU (test double).
            def is_available():
                return True
        """,
        "optimum.habana": """
            class GaudiTrainer: pass
            class GaudiTrainingArguments: pass
        """,
    })
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    assert choose_device("auto") == "hpu"
    backend = resolve_backend(BackendArguments(use_habana=True, use_lazy_mode=True))
    assert backend.is_gaudi and backend.use_lazy_mode
    assert os.environ["PT_HPU_LAZY_MODE"] == "1"
    trainer_class, args_class = backend.trainer_classes()
    assert (trainer_class.__name__, args_class.__name__) == ("GaudiTrainer", "GaudiTrainingArguments")


# ---------------------------------------------------------------- dtype


def test_dtype_selection_on_cpu(monkeypatch):
    monkeypatch.setattr(rlhf.backend, "bf16_supported", lambda device: True)  # a CPU with bf16 units
    backend = Backend(device="cpu")
    assert backend.torch_dtype() == torch.float32
    assert backend.torch_dtype(bf16=True) == torch.bfloat16
    with pytest.raises(UserError, match="fp16"):
        backend.torch_dtype(fp16=True)
    with pytest.raises(UserError, match="both"):
        backend.torch_dtype(bf16=True, fp16=True)


def test_fp16_allowed_off_cpu():
    assert Backend(device="cuda").torch_dtype(fp16=True) == torch.float16


def test_fp16_refused_on_gaudi():
    with pytest.raises(UserError, match="--fp16 is not supported on Gaudi.*use --bf16") as error:
        Backend(device="hpu").check_precision(fp16=True)
    _one_line(str(error.value))


def test_fp16_refused_on_cpu_even_under_a_trainer():
    args = transformers.TrainingArguments(output_dir="unused", fp16=True, use_cpu=True)
    with pytest.raises(UserError, match="--fp16 is not supported on CPU") as error:
        Backend(device="cpu").trainer_model_dtype(args)
    _one_line(str(error.value))


# ---------------------------------------------------------------- bf16 capability


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bf16_refused_where_the_hardware_has_none(device, monkeypatch):
    seen = []
    monkeypatch.setattr(rlhf.backend, "bf16_supported", lambda d: seen.append(d) or False)
    backend = Backend(device=device)
    with pytest.raises(UserError, match="--bf16 was requested but .* no .*bfloat16") as error:
        backend.torch_dtype(bf16=True)
    _one_line(str(error.value))
    assert "drop --bf16" in str(error.value)
    args = types.SimpleNamespace(bf16=True, fp16=False)  # TrainingArguments' own bf16 check needs a real GPU
    with pytest.raises(UserError, match="--bf16"):
        backend.trainer_model_dtype(args)
    assert seen == [device, device]
    assert backend.torch_dtype() == torch.float32  # no --bf16: nothing to check


def test_trainer_model_dtype_keeps_fp32_master_weights_under_bf16(monkeypatch):
    monkeypatch.setattr(rlhf.backend, "bf16_supported", lambda device: True)
    args = transformers.TrainingArguments(output_dir="unused", bf16=True, use_cpu=True)
    assert Backend(device="cpu").trainer_model_dtype(args) == torch.float32
    assert Backend(device="hpu").torch_dtype(bf16=True) == torch.bfloat16


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx avx2 avx512f avx512_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx avx2 amx_tile amx_bf16\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm (Graviton 3)
        ("processor\t: 0\nflags\t\t: fpu sse avx avx2 avx512f avx512_vnni\n", False),  # AVX-512 is not bf16
        ("processor\t: 0\nflags\t\t: fpu sse avx avx2\n", False),
    ],
)
def test_cpu_bf16_detection_reads_cpuinfo_flags(cpuinfo, expected, monkeypatch):
    flags = frozenset(
        word for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
        for word in line.split(":", 1)[1].split()
    )
    monkeypatch.setattr(rlhf.backend, "_cpu_flags", lambda: flags)
    assert rlhf.backend.bf16_supported("cpu") is expected


def test_cpu_flags_of_this_machine_agree_with_torch():
    """The /proc/cpuinfo reading agrees with torch's own cpuinfo probe on this machine (x86 Linux)."""
    flags = rlhf.backend._cpu_flags()
    if flags is None or "avx2" not in flags or not hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        pytest.skip("needs x86 Linux and a torch with the cpuinfo probes")
    torch_says = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert rlhf.backend.cpu_bf16_supported() == torch_says


def test_cuda_bf16_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert rlhf.backend.bf16_supported("cuda") is False
    assert rlhf.backend.bf16_supported("hpu") is True
