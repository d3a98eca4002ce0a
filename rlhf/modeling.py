"""Model and tokenizer loading, pad-token handling and LoRA configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhf.compat import dtype_kwargs, load_fast_tokenizer_file, tokenizer_class_unknown
from rlhf.errors import UserError


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
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: attention q/k/v/o projections)."}
    )
    lora_all_linear: bool = field(default=False, metadata={"help": "Adapt every linear layer."})

    def check(self) -> None:
        if self.peft not in ("lora", "none"):
            raise UserError(f"--peft {self.peft!r} is not supported; use lora or none")
        if self.lora_rank <= 0 or self.lora_alpha <= 0:
            raise UserError("--lora_rank and --lora_alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout {self.lora_dropout} is out of range; use 0 <= p < 1")


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


def check_model_path(name: str | None, flag: str) -> str:
    if not name:
        raise UserError(f"{flag} is required; give a hub id or a local model directory")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {name}: directory has no config.json; point it at a saved model directory")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise UserError(f"{flag} {name}: no such directory; check the path")
    return name


def hub_kwargs(args: ModelArguments) -> dict:
    return {"cache_dir": args.cache_dir, "revision": args.model_revision, "trust_remote_code": args.trust_remote_code}


def load_config(name: str, flag: str, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except OSError as error:
        first_line = str(error).splitlines()[0]
        raise UserError(f"{flag} {name}: cannot load ({first_line}); check the id, path or HF_TOKEN") from None


def load_tokenizer(name: str, use_fast: bool = True, padding_side: str = "right", **kwargs):
    """Tokenizer with a pad token (EOS when it has none) and the requested padding side."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=use_fast, **kwargs)
    except (ValueError, OSError) as error:
        if not (tokenizer_class_unknown(error) and Path(name).is_dir()):
            if isinstance(error, OSError):
                raise UserError(f"tokenizer {name}: cannot load ({str(error).splitlines()[0]})") from None
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
    return load_tokenizer(
        model_args.tokenizer_name or model_path, use_fast=model_args.use_fast_tokenizer, padding_side=padding_side,
        trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
    )


def load_causal_lm(name: str, dtype=None, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, **dtype_kwargs(dtype), **kwargs)


def load_sequence_classifier(name: str, tokenizer, dtype=None, **kwargs):
    """One-output sequence classifier whose pad id matches the tokenizer (score read at the last real token)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **dtype_kwargs(dtype), **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def merge_lora(model):
    """The plain transformers model of a ``PeftModel``: its LoRA weights merged in and the wrappers
    removed (``modules_to_save`` copies, e.g. a reward model's trained score head, kept); any other
    model is returned as it is. The one place the stages merge an adapter."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def position_ids_from_mask(attention_mask):
    """0, 1, 2, ... over the real tokens whatever the padding side (pads get 0), as ``generate`` counts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
