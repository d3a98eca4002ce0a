"""Model and tokenizer loading, pad-token handling and LoRA configuration."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.compat import (
    CONFIG_VALUE_ERRORS,
    dtype_kwargs,
    load_fast_tokenizer_file,
    tokenizer_backend_missing,
    tokenizer_class_unknown,
)
from rlhf.errors import UserError
from rlhf.validation import check_lora, check_lora_targets


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local model directory."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    config_name: str | None = field(default=None, metadata={"help": "Config, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (Rust) tokenizer."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the hub (off by default)."})
    low_cpu_mem_usage: bool = field(default=False, metadata={"help": "Load weights lazily to save host memory."})


@dataclass
class LoraArguments:
    peft: str = field(default="lora", metadata={"help": "lora or none (full fine-tune).", "choices": ("lora", "none")})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (--lora_r works too).", "aliases": ["--lora_r"]})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: attention q/k/v/o projections)."}
    )
    lora_all_linear: bool = field(default=False, metadata={"help": "Adapt every linear layer."})

    def check(self) -> None:
        if self.peft not in ("lora", "none"):
            raise UserError(f"--peft {self.peft!r} is not supported; use lora or none")
        check_lora(self.lora_rank, self.lora_alpha, self.lora_dropout)

    def check_targets(self, model_path: str, trust_remote_code: bool = False) -> None:
        """With LoRA: the targets name modules of this model (checked on its config, before it loads)."""
        if self.peft == "lora" and not self.lora_all_linear:
            check_lora_targets(model_path, self.lora_target_modules, DEFAULT_TARGETS,
                               trust_remote_code=trust_remote_code)


DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_config(args: LoraArguments, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    if args.lora_all_linear:
        targets = "all-linear"
    else:
        targets = args.lora_target_modules or DEFAULT_TARGETS
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")


def first_line(error: BaseException, limit: int = 240) -> str:
    """An exception's message on one line: its first line (with the next when it ends in a colon)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json_file(path: Path, what: str) -> object:
    """A JSON file a user pointed us at; unreadable or invalid JSON is a ``UserError`` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what}: {path} is not UTF-8 text; restore it from where the model came from") from None
    except json.JSONDecodeError as error:
        raise UserError(
            f"{what}: {path} is not valid JSON (line {error.lineno}: {error.msg}); restore it from where the model "
            "came from"
        ) from None


def check_model_dir(path: Path, flag: str) -> None:
    """A local model directory: a config.json that is a JSON object naming a model type transformers
    knows, and weight files. Checked before anything heavy, so the error names the missing piece."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{flag} {path}: directory has no config.json; point it at a saved model directory")
    config = read_json_file(config_file, flag)
    if not isinstance(config, dict):
        raise UserError(f"{flag} {path}: config.json holds a {type(config).__name__}, not a JSON object; restore it")
    model_type = config.get("model_type")
    if not model_type:
        raise UserError(f"{flag} {path}: config.json has no model_type; restore it from where the model came from")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        import transformers

        raise UserError(
            f"{flag} {path}: model type {model_type!r} is unknown to transformers {transformers.__version__}; "
            "upgrade transformers or check config.json"
        )
    if not any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise UserError(
            f"{flag} {path}: no weight files (model.safetensors or pytorch_model.bin) there; copy the weights "
            "into it or point at the complete model directory"
        )


def check_model_path(name: str | None, flag: str) -> str:
    if not name:
        raise UserError(f"{flag} is required; give a hub id or a local model directory")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {name} is a file; give the model's directory")
        check_model_dir(path, flag)
        return str(path)
    if name.startswith((".", "/", "~")):
        raise UserError(f"{flag} {name}: no such directory; check the path")
    return name


def load_config(name: str, flag: str, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, *CONFIG_VALUE_ERRORS) as error:
        raise UserError(f"{flag} {name}: cannot load ({first_line(error)}); check the id, path or HF_TOKEN") from None


def check_tokenizer_dir(path: Path) -> None:
    """A local tokenizer: its JSON files parse and a vocabulary file exists (else transformers tries to
    convert a sentencepiece/tiktoken model that is not there and fails with a traceback)."""
    for name in TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json_file(path / name, f"tokenizer {path}")
    names = [p.name for p in path.iterdir() if p.is_file()]
    vocabulary = [n for n in names if n == "tokenizer.json" or n.endswith((".model", ".tiktoken"))
                  or n.startswith(("vocab", "merges", "spiece"))]
    if vocabulary:
        return
    found = "has tokenizer_config.json but no vocabulary file" if "tokenizer_config.json" in names else "has no tokenizer files"
    raise UserError(
        f"tokenizer {path} {found} (tokenizer.json, tokenizer.model or vocab.json); copy the tokenizer files "
        "of the model it came from into it"
    )


def load_tokenizer(name: str, use_fast: bool = True, padding_side: str = "right", **kwargs):
    """Tokenizer with a pad token (EOS when it has none) and the requested padding side."""
    from transformers import AutoTokenizer

    if Path(name).is_dir():
        check_tokenizer_dir(Path(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=use_fast, **kwargs)
    except (ValueError, OSError) as error:
        if not (tokenizer_class_unknown(error) and Path(name).is_dir()):
            if isinstance(error, OSError) or tokenizer_backend_missing(error):
                raise UserError(
                    f"tokenizer {name}: cannot load ({first_line(error)}); give a directory with tokenizer.json "
                    "or install the tokenizer's backend (sentencepiece, tiktoken)"
                ) from None
            raise
        tokenizer = load_fast_tokenizer_file(name)
    if tokenizer.pad_token is None:
        # Masks are built from attention masks and lengths, so pad == eos is safe here.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise UserError(f"tokenizer {name} has no pad, eos or unk token; add a pad token to it")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model_tokenizer(model_args: ModelArguments, model_path: str, padding_side: str = "right"):
    """Check that the model's config loads (a one-line error otherwise), then load its tokenizer
    (or ``--tokenizer_name``) before any heavy work."""
    load_config(model_path, "--model_name_or_path", trust_remote_code=model_args.trust_remote_code)
    try:
        return load_tokenizer(
            model_args.tokenizer_name or model_path, use_fast=model_args.use_fast_tokenizer, padding_side=padding_side,
            trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
        )
    except UserError as error:
        if model_args.tokenizer_name:
            raise
        raise UserError(f"{error}, or pass --tokenizer_name") from None


def size_mismatch(error: RuntimeError) -> bool:
    """A state dict whose shapes do not fit the model (transformers 5 / 4.x and peft wording)."""
    text = str(error)
    return "size mismatch" in text or "ignore_mismatched_sizes" in text


def loading_errors() -> tuple[type[BaseException], ...]:
    """What a broken or missing model file raises while loading: OSError (missing, hub), safetensors'
    error (corrupt/truncated), pickle's (a .bin that is not a weights-only state dict), a bad config value."""
    import pickle

    from safetensors import SafetensorError

    return (OSError, SafetensorError, pickle.UnpicklingError, *CONFIG_VALUE_ERRORS)


def load_pretrained(auto_class, name: str, flag: str = "model", dtype=None, **kwargs):
    """``auto_class.from_pretrained`` with a broken model directory (missing or corrupt weights, weights
    that do not fit the config) reported as one ``UserError`` line naming it; other errors propagate."""
    try:
        return auto_class.from_pretrained(name, **dtype_kwargs(dtype), **kwargs)
    except loading_errors() as error:
        raise UserError(
            f"{flag} {name}: the model cannot be loaded ({first_line(error)}); check the path or id, or restore "
            "its weight files (they may be incomplete or corrupt)"
        ) from None
    except RuntimeError as error:
        if not size_mismatch(error):
            raise
        raise UserError(
            f"{flag} {name}: its weights do not fit its config.json (size mismatch); use the config.json the "
            "weights were saved with"
        ) from None


def load_causal_lm(name: str, dtype=None, *, flag: str = "model", **kwargs):
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, name, flag, dtype, **kwargs)


def load_sequence_classifier(name: str, tokenizer, dtype=None, *, flag: str = "model", **kwargs):
    """One-output sequence classifier whose pad id matches the tokenizer (score read at the last real token)."""
    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(AutoModelForSequenceClassification, name, flag, dtype, num_labels=1, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def merge_lora(model):
    """The plain transformers model of a ``PeftModel``: its LoRA weights merged in and the wrappers
    removed (``modules_to_save`` copies, e.g. a reward model's trained score head, kept); any other
    model is returned as it is. The one place the stages merge an adapter."""
    from rlhf.sequences import is_peft_model

    return model.merge_and_unload() if is_peft_model(model) else model


def _contiguous_first_input(module, args):
    return (args[0].contiguous(), *args[1:]) if args else args


def fold_lm_head_input(model) -> None:
    """Hand ``model``'s LM head a contiguous input (a forward pre-hook; once per head).

    ``logits_to_keep`` gives the head a slice ``hidden[:, -k:]``, which is not contiguous. For such a 3-D
    input and a weight that does not require grad (a LoRA or frozen base's head, a reference model's),
    torch's matmul does not fold the batch into one mm: it runs a bmm on the weight expanded per batch row,
    which on CPU in bf16 first copies the whole weight once per row (49152 x 576 for SmolLM2: 40% of a
    forward of 4 x 96 tokens, ``bench/bf16_frozen_weights.py``). A trainable head folds anyway, which hid it.
    Copying the slice instead costs k x hidden per row."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_rlhf_contiguous_input", False):
        return
    head.register_forward_pre_hook(_contiguous_first_input)
    head._rlhf_contiguous_input = True


def position_ids_from_mask(attention_mask):
    """0, 1, 2, ... over the real tokens whatever the padding side (pads get 0), as ``generate`` counts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) numbers of elements; a ZeRO-3 placeholder counts its real size (``ds_numel``)."""
    from rlhf.zero import numel

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
