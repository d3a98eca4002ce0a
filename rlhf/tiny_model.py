"""Build a tiny random-init Llama model and a BPE tokenizer, offline, for tests and demos.

Usage:
    python -m rlhf.tiny_model --output_dir ./tiny-llama [--seed 0] [--vocab_size 512] \
        [--hidden_size 64] [--num_layers 2]

    from rlhf.tiny_model import build_tiny_model
    path = build_tiny_model("./tiny-llama", seed=0)

The output directory holds a ``LlamaForCausalLM`` (4 heads, intermediate size 2 x hidden,
1024 positions, untied embeddings) as safetensors, its ``generation_config.json``, and a
byte-level BPE tokenizer trained with ``tokenizers`` on the demo data (``data/demo/*.jsonl``,
when present) plus built-in sentences. Special tokens: ``<pad>``, ``<s>`` (bos), ``</s>``
(eos), ``<unk>``, and the chat role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``.
The tokenizer adds no special tokens by itself; the chat template starts with bos:

    <s><|system|>
    You are a helpful assistant.
    <|user|>
    What is Mars?
    <|assistant|>
    Mars is a planet.</s>

The assistant turn ends with eos (no newline after it). With ``add_generation_prompt=True``
the text ends with ``<|assistant|>\\n``. The same seed gives byte-identical files. The
directory loads with ``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``
(``num_labels=1``) and ``AutoTokenizer``; for
transformers 4.55, ``PreTrainedTokenizerFast(tokenizer_file=<dir>/tokenizer.json)`` works too,
and ``tokenizer_config.json`` records the special tokens and the chat template.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from glob import glob

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK] + ROLE_TOKENS  # ids 0..6 in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

GENERIC_SENTENCES = [
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please answer the question in one or two sentences.",
    "Thanks for asking! Happy to help with anything else.",
    "A language model predicts the next token from the previous tokens.",
    "The weather today is sunny with a light breeze and a few clouds.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "She said: \"Hello, world!\" and then left (quietly); it was 5:30 pm.",
    "Reinforcement learning from human feedback trains a reward model and a policy.",
    "def add(a, b):\n    return a + b\n",
]


@dataclass
class TinyModelArguments:
    output_dir: str = field(metadata={"help": "Directory to write the model and tokenizer to."})
    seed: int = field(default=0, metadata={"help": "Seed for the weight initialisation."})
    vocab_size: int = field(default=512, metadata={"help": "Target BPE vocabulary size (>= 300)."})
    hidden_size: int = field(default=64, metadata={"help": "Hidden size (divisible by 4 heads)."})
    num_layers: int = field(default=2, metadata={"help": "Number of decoder layers."})


def _corpus() -> list[str]:
    """Demo data texts (if the repo has them) plus the built-in generic sentences."""
    texts = list(GENERIC_SENTENCES)
    data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")
    for path in sorted(glob(os.path.join(data_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    texts.extend(str(v) for v in row.values() if isinstance(v, str) and v)
    return texts


def build_tokenizer(vocab_size: int = 512, adds_bos: bool = False):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    ``adds_bos``: encoding with special tokens prepends ``<s>``, as Llama's tokenizers do (the
    double of that behaviour for tests; by default the tokenizer adds nothing, as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf.errors import UserError

    if vocab_size < 300:
        raise UserError(f"--vocab_size {vocab_size} is too small; use at least 300 (256 bytes + specials)")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    if adds_bos:
        bos_id = tokenizer.token_to_id(BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _fix_tokenizer_config(output_dir: str, adds_bos: bool) -> None:
    """Make tokenizer_config.json self-contained for transformers 4.55 as well as 5.x."""
    path = os.path.join(output_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
        add_bos_token=adds_bos,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    # transformers 5 writes the extra tokens as a list, which 4.55 expects to be a dict of named
    # tokens; additional_special_tokens carries the same tokens for both versions.
    config.pop("extra_special_tokens", None)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def build_tiny_model(
    output_dir: str, seed: int = 0, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
    adds_bos: bool = False,
) -> str:
    """Write a tiny random-init Llama causal LM and its tokenizer to ``output_dir``; return it.

    ``adds_bos``: a Llama-style tokenizer that prepends BOS when encoding with special tokens."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rlhf.errors import UserError

    if hidden_size % 4 or hidden_size < 8:
        raise UserError(f"--hidden_size {hidden_size} must be a multiple of 4 (4 heads), at least 8")
    if num_layers < 1:
        raise UserError(f"--num_layers {num_layers} must be at least 1")
    tokenizer = build_tokenizer(vocab_size, adds_bos=adds_bos)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("pad", PAD), ("bos", BOS), ("eos", EOS), ("unk", UNK))}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    _fix_tokenizer_config(output_dir, adds_bos)
    return output_dir


def build_tiny_reward_model(model_dir: str, output_dir: str, seed: int = 0) -> str:
    """A one-output sequence classifier on ``model_dir`` (seeded random score head), saved with its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


def main() -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(TinyModelArguments).parse_args_into_dataclasses()
    path = build_tiny_model(args.output_dir, args.seed, args.vocab_size, args.hidden_size, args.num_layers)
    print(f"wrote tiny Llama model and tokenizer to {path}")


if __name__ == "__main__":
    from rlhf.errors import run_cli

    sys.exit(run_cli(main))
