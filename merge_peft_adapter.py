#!/usr/bin/env python
"""Merge a LoRA adapter into its base model and save a plain model + tokenizer.

Works for causal-LM adapters (SFT, PPO) and sequence-classification adapters (reward model; the
fully trained score head is kept). The base model is the one recorded in the adapter unless
``--base_model_name`` overrides it. Output: safetensors weights (in the base checkpoint's dtype, or
bfloat16 with ``--bf16``), config, tokenizer.

Usage::

    python merge_peft_adapter.py --adapter_model_name ./llama2_7b_se --output_name llama2_7b_se_merged
    python merge_peft_adapter.py --adapter_model_name ./rm_adapter --output_name rm_merged \
        --base_model_name meta-llama/Llama-2-7b-hf
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.arguments import parse_stage_args
from rlhf.errors import UserError, run_cli
from rlhf.modeling import (
    check_model_path,
    first_line,
    load_pretrained,
    load_tokenizer,
    loading_errors,
    merge_lora,
    read_json_file,
    size_mismatch,
)

logger = logging.getLogger("rlhf")

TASK_MODEL_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
}


@dataclass
class MergeArguments:
    adapter_model_name: str | None = field(default=None, metadata={"help": "Directory of the LoRA adapter."})
    output_name: str | None = field(default=None, metadata={"help": "Directory to write the merged model to."})
    base_model_name: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into a non-empty output directory."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the hub (off by default)."})
    bf16: bool = field(
        default=False, metadata={"help": "Write the merged weights in bfloat16 (default: the base checkpoint's dtype)."}
    )


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_config(adapter_dir: str) -> dict:
    """The adapter's config (a JSON object in adapter_config.json)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"--adapter_model_name {adapter_dir}: no adapter_config.json there; point it at a PEFT adapter")
    config = read_json_file(path, "--adapter_model_name")
    if not isinstance(config, dict):
        raise UserError(f"--adapter_model_name {adapter_dir}: adapter_config.json is not a JSON object; restore it")
    return config


def check_adapter_weights(adapter_dir: str) -> None:
    if not any((Path(adapter_dir) / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(
            f"--adapter_model_name {adapter_dir}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) there; "
            "point it at the complete adapter directory"
        )


def merge(adapter_dir: str, base_name: str, task_type: str, trust_remote_code: bool = False,
          base_flag: str = "--base_model_name"):
    """Base model + adapter, merged; returns the plain transformers model."""
    import transformers
    from peft import PeftModel

    auto_class = getattr(transformers, TASK_MODEL_CLASSES[task_type])
    kwargs = {"num_labels": 1} if task_type == "SEQ_CLS" else {}
    base = load_pretrained(auto_class, base_name, base_flag, trust_remote_code=trust_remote_code, **kwargs)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except loading_errors() as error:
        raise UserError(
            f"--adapter_model_name {adapter_dir}: the adapter cannot be loaded ({first_line(error)}); restore its "
            "adapter_model.safetensors"
        ) from None
    except RuntimeError as error:
        if not size_mismatch(error):
            raise
        raise UserError(
            f"--adapter_model_name {adapter_dir}: the adapter does not fit base model {base_name} (size mismatch); "
            "pass the base model it was trained on with --base_model_name"
        ) from None
    return merge_lora(model)


def main() -> None:
    parsed = parse_stage_args((MergeArguments,), False, sys.argv[1:])
    (args,) = parsed.values
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.adapter_model_name or not args.output_name:
        raise UserError("--adapter_model_name and --output_name are required")
    output = Path(args.output_name)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_name {output} is an existing file, not a directory; give a new directory path")
    adapter_dir = args.adapter_model_name
    if not Path(adapter_dir).is_dir():
        raise UserError(f"--adapter_model_name {adapter_dir}: no such directory; check the path")
    adapter_config = read_adapter_config(adapter_dir)
    task_type = adapter_config.get("task_type") or "CAUSAL_LM"
    if task_type not in TASK_MODEL_CLASSES:
        raise UserError(f"adapter task type {task_type} is not supported; only CAUSAL_LM and SEQ_CLS adapters merge")
    check_adapter_weights(adapter_dir)
    base_name = args.base_model_name or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise UserError("the adapter records no base model; pass --base_model_name")
    base_flag = "--base_model_name" if args.base_model_name else (
        "the base model in adapter_config.json (override with --base_model_name)"
    )
    base_name = check_model_path(base_name, base_flag)
    if output.is_dir() and any(output.iterdir()) and not args.overwrite_output_dir:
        raise UserError(f"--output_name {output} already holds files; pass --overwrite_output_dir or pick a new name")
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_name
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=args.trust_remote_code)

    logger.info("Merging %s adapter %s into %s", task_type, adapter_dir, base_name)
    model = merge(adapter_dir, base_name, task_type, args.trust_remote_code, base_flag)
    if task_type == "SEQ_CLS":
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.bf16:  # a cast for storage only: no bf16 compute, so no hardware check
        import torch

        model = model.to(torch.bfloat16)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    if not (output / "config.json").is_file():  # save_pretrained only logs when it cannot write
        raise RuntimeError(f"save_pretrained wrote no config.json to {output}")
    logger.info("Merged model and tokenizer written to %s", output)


if __name__ == "__main__":
    sys.exit(run_cli(main))
