"""Differences between the two stacks we run on, in one place.

Main stack: transformers 5.x / peft 0.21. Gaudi stack (optimum-habana 1.21): transformers 4.55 /
peft 0.17. Everything version-dependent that the scripts need goes through here.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
IS_TRANSFORMERS_5 = TRANSFORMERS_VERSION >= Version("5.0.0")


def dtype_kwargs(dtype) -> dict:
    """`from_pretrained` takes `dtype` from 4.56 on, `torch_dtype` before."""
    if dtype is None:
        return {}
    return {"dtype": dtype} if TRANSFORMERS_VERSION >= Version("4.56.0") else {"torch_dtype": dtype}


def tokenizer_class_unknown(error: Exception) -> bool:
    """transformers 4.x cannot resolve the `TokenizersBackend` class that 5.x records."""
    return "TokenizersBackend" in str(error)


def tokenizer_backend_missing(error: Exception) -> bool:
    """AutoTokenizer found no tokenizer.json and could not build one from a slow tokenizer
    (no sentencepiece/tiktoken model file, or its library missing)."""
    return "Couldn't instantiate the backend tokenizer" in str(error)


try:  # huggingface_hub >= 1.0 validates config values (e.g. hidden_size "big") while loading
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError

    CONFIG_VALUE_ERRORS: tuple[type[Exception], ...] = (_StrictDataclassError,)
except ImportError:  # the Gaudi stack's huggingface_hub 0.x
    CONFIG_VALUE_ERRORS = ()


def load_fast_tokenizer_file(path: str, **kwargs):
    """Load `tokenizer.json` + `tokenizer_config.json` directly (the 4.x fallback)."""
    import json

    from transformers import PreTrainedTokenizerFast

    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"), **special, **kwargs)
    template_file = Path(path) / "chat_template.jinja"
    tokenizer.chat_template = config.get("chat_template") or (
        template_file.read_text() if template_file.is_file() else None
    )
    return tokenizer
