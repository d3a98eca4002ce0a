"""A reward model's accuracy on preference pairs whose answers are cut at N tokens.

The policy is judged on answers it writes within ``--output_max_length`` tokens, cut there when they
have not ended, so what matters is how well the reward model ranks answers of that length, not the
whole answers ``reward_modeling.py`` evaluates it on. Here both answers of each validation pair are cut
to their first N tokens (the policy's tokenizer, no EOS: the text the policy's answer would be) and
scored as ``rl_training.py`` scores a response: the rendered prompt + the answer text, the input cut to
``--prompt_tokens + N`` tokens from the left. Accuracy: the fraction of pairs with chosen > rejected.
``cut``: the fraction of pairs in which at least one answer was longer than N (only those can change).

    python -m rlhf.reward_accuracy --rm_dir outputs/recipe-hh/rm \\
        --pairs_file outputs/recipe-hh/data/valid.jsonl --answer_tokens 48 96 160 \\
        --output outputs/recipe-hh/rm/accuracy_by_answer_length.json
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.data import load_local_file, prepare_examples, resolve_template
from rlhf.errors import UserError, run_cli
from rlhf.tokenization import encode_text

logger = logging.getLogger("rlhf")


@dataclass
class AccuracyArguments:
    rm_dir: str = field(metadata={"help": "Reward model directory (reward_modeling.py's output)."})
    pairs_file: str = field(metadata={"help": "Preference pairs (the validation file), any format reward_modeling reads."})
    answer_tokens: list[int] = field(default_factory=lambda: [48, 96, 160],
                                     metadata={"help": "Answer lengths to cut at (tokens)."})
    prompt_tokens: int = field(default=128, metadata={"help": "rl_training.py's --input_max_length."})
    whole_max_length: int = field(default=256, metadata={"help": "Input length for the uncut answers (rm.yaml's)."})
    prompt_template: str = field(default="auto", metadata={"help": "As reward_modeling.py's --prompt_template."})
    batch_size: int = field(default=16, metadata={"help": "Texts per reward-model forward."})
    bf16: bool = field(default=False, metadata={"help": "Load the reward model in bf16, as rl_training.py --bf16 does."})
    max_pairs: int | None = field(default=None, metadata={"help": "Use the first N pairs only."})
    output: str | None = field(default=None, metadata={"help": "JSON file to write the figures to."})

    def check(self) -> None:
        if not self.answer_tokens or min(self.answer_tokens) <= 0:
            raise UserError(f"--answer_tokens {self.answer_tokens}: give one or more positive token counts")
        if self.prompt_tokens <= 0 or self.whole_max_length <= 0:
            raise UserError("--prompt_tokens and --whole_max_length must be positive")


def cut_answer(tokenizer, answer: str, tokens: int) -> tuple[str, bool]:
    """The answer's first ``tokens`` tokens as text, and whether anything was cut."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) <= tokens:
        return answer, False
    return tokenizer.decode(ids[:tokens], skip_special_tokens=True), True


def pairwise_accuracy(scorer, prompts: list[str], chosen: list[str], rejected: list[str], label: str) -> float:
    from tqdm.auto import tqdm

    step = 4 * scorer.batch_size
    better = []
    for start in tqdm(range(0, len(prompts), step), desc=label, unit="chunk", leave=False):
        end = start + step
        better += (scorer(prompts[start:end], chosen[start:end]) > scorer(prompts[start:end], rejected[start:end])).tolist()
    return sum(better) / len(better)


def accuracy_by_length(args: AccuracyArguments) -> dict:
    import torch

    from rlhf.modeling import check_model_path, load_sequence_classifier, load_tokenizer
    from rlhf.reward import RewardScorer

    rm_dir = check_model_path(args.rm_dir, "--rm_dir")
    tokenizer = load_tokenizer(rm_dir)
    dtype = torch.bfloat16 if args.bf16 else None
    model = load_sequence_classifier(rm_dir, tokenizer, dtype=dtype, flag="--rm_dir").eval().requires_grad_(False)
    raw = load_local_file(args.pairs_file, "--pairs_file")
    pairs, _ = prepare_examples(raw, args.pairs_file, tokenizer, resolve_template(args.prompt_template, tokenizer),
                                allow_sft=False)
    if args.max_pairs:
        pairs = pairs.select(range(min(args.max_pairs, len(pairs))))
    prompts, chosen, rejected = pairs["prompt"], pairs["chosen"], pairs["rejected"]
    whole = RewardScorer(model, tokenizer, batch_size=args.batch_size, max_length=args.whole_max_length)
    whole_accuracy = pairwise_accuracy(whole, prompts, chosen, rejected, "whole answers")
    results = {"pairs": len(prompts), "precision": "bf16" if args.bf16 else "fp32",
               "whole_answers": {"max_length": args.whole_max_length, "accuracy": whole_accuracy}}
    logger.info("%d pairs, whole answers (input cut at %d tokens): accuracy %.3f", len(prompts),
                args.whole_max_length, whole_accuracy)
    for tokens in args.answer_tokens:
        chosen_text, chosen_cut = zip(*(cut_answer(tokenizer, a, tokens) for a in chosen))
        rejected_text, rejected_cut = zip(*(cut_answer(tokenizer, a, tokens) for a in rejected))
        scorer = RewardScorer(model, tokenizer, batch_size=args.batch_size, max_length=args.prompt_tokens + tokens)
        row = {"accuracy": pairwise_accuracy(scorer, prompts, list(chosen_text), list(rejected_text),
                                             f"cut at {tokens}"),
               "cut": sum(a or b for a, b in zip(chosen_cut, rejected_cut)) / len(prompts)}
        results[f"answers_cut_at_{tokens}"] = row
        logger.info("answers cut at %d tokens (%.0f%% of pairs cut): accuracy %.3f", tokens, 100 * row["cut"],
                    row["accuracy"])
    return results


def main() -> None:
    from transformers import HfArgumentParser

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(AccuracyArguments).parse_args_into_dataclasses()
    args.check()
    results = accuracy_by_length(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
