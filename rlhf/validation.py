"""Argument checks that need the model's shape or the data's size, made before any model loads.

The one place the stages check what would otherwise fail deep inside peft or datasets:

- ``check_lora``: rank, alpha and dropout (peft's ValueError for ``r=0``);
- ``check_lora_targets``: ``--lora_target_modules`` against the module names of the model, read
  from its config on the meta device (no weights loaded); a GPT-2-style model under the default
  Llama targets gets the names of its own linear modules (peft's NoMatchingPeftModuleError);
- ``check_validation_split``: a ``--validation_split_percentage`` that would leave no training row
  (datasets' ValueError from ``train_test_split``).

Used by finetune_clm, reward_modeling, dpo_training and rl_training; imports neither trl nor peft.
"""

from __future__ import annotations

import logging
import math

from rlhf.errors import UserError

logger = logging.getLogger("rlhf")

OUTPUT_LAYERS = ("lm_head", "score", "classifier", "embed_out", "output")


def check_lora(rank: int, alpha: float, dropout: float, *, rank_flag: str = "--lora_rank",
               alpha_flag: str = "--lora_alpha", dropout_flag: str = "--lora_dropout") -> None:
    if rank <= 0:
        raise UserError(f"{rank_flag} {rank} must be a positive integer (the LoRA rank); pass e.g. {rank_flag} 8, "
                        "or --peft none for a full fine-tune")
    if not alpha > 0:
        raise UserError(f"{alpha_flag} {alpha} must be positive; pass e.g. {alpha_flag} {2 * rank}")
    if not 0 <= dropout < 1:
        raise UserError(f"{dropout_flag} {dropout} is out of range; use 0 <= p < 1")


def module_names(model_path: str, trust_remote_code: bool = False, flag: str = "--model_name_or_path") -> tuple[list[str], list[str], str]:
    """(every module name, the leaf names of its linear layers without the output head, model type) of the
    model at ``model_path``, built on the meta device from its config: no weights are read."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from rlhf.modeling import load_config  # an unloadable config is a one-line error there

    from rlhf.zero import zero3_init_disabled

    config = load_config(model_path, flag, trust_remote_code=trust_remote_code)
    # a ZeRO-3 Trainer's config would make from_config partition and initialise the meta weights
    with zero3_init_disabled(), torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError:  # an architecture without a causal-LM head (e.g. an encoder for a reward model)
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    linear_types = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        linear_types = (torch.nn.Linear, Conv1D)
    except ImportError:
        pass
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if name and isinstance(module, linear_types)} - set(OUTPUT_LAYERS))
    return names, linear, getattr(config, "model_type", "unknown")


def target_matches(target: str, names: list[str]) -> bool:
    """peft's rule for a list entry: a module whose name is the target or ends with '.' + target."""
    return any(name == target or name.endswith("." + target) for name in names)


def check_lora_targets(model_path: str, targets: list[str] | None, default: list[str], *, trust_remote_code: bool = False,
                       flag: str = "--lora_target_modules", all_linear_flag: str | None = "--lora_all_linear",
                       model_flag: str = "--model_name_or_path") -> None:
    """Refuse LoRA targets that match no module of the model, naming the model's linear modules."""
    chosen = list(targets) if targets else list(default)
    names, linear, model_type = module_names(model_path, trust_remote_code, model_flag)
    missing = [t for t in chosen if not target_matches(t, names)]
    if len(missing) < len(chosen):
        if missing:
            logger.warning("%s: %s match no module of %s and are ignored", flag, " ".join(missing), model_path)
        return
    given = " ".join(chosen) + ("" if targets else " (the default)")
    other = f", or {all_linear_flag} for every linear layer" if all_linear_flag else ""
    raise UserError(f"{flag} {given} match no module of the {model_type} model {model_path}; its linear modules "
                    f"are {' '.join(linear) or 'none'}: pass e.g. {flag} {' '.join(linear[:4])}{other}")


def check_validation_split(num_rows: int, percentage: int, source: str) -> None:
    """Refuse a held-out percentage that leaves no training row or no validation row, as
    ``datasets.Dataset.train_test_split`` counts them (test = ceil(n * p), train = the rest)."""
    if percentage <= 0:
        return
    held_out = math.ceil(num_rows * percentage / 100)
    if num_rows - held_out < 1:
        raise UserError(f"{source}: {num_rows} row(s) are too few to hold out --validation_split_percentage "
                        f"{percentage} and still train; give more rows, a --validation_file, or "
                        "--validation_split_percentage 0")
