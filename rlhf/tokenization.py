"""How every stage turns a rendered text into token ids, so SFT, the reward model and PPO agree.

One rule, used for SFT prompts, reward-model texts and PPO prompts alike: add the tokenizer's
special tokens (Llama's BOS, for instance) unless the text already starts with BOS, as a chat
template that writes ``{{ bos_token }}`` does. Tokenizing the same prompt two ways in two stages
gives the policy a context it never saw in SFT (a missing or doubled BOS), which a tokenizer that
adds nothing (SmolLM2, our tiny test model) hides.
"""

from __future__ import annotations


def adds_special_tokens(tokenizer, text: str) -> bool:
    """True unless ``text`` already starts with the tokenizer's BOS token."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode_text(tokenizer, text: str) -> list[int]:
    """``text`` as token ids, special tokens added unless it already starts with BOS."""
    return list(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text))["input_ids"])


def keep_end(ids: list[int], max_length: int) -> list[int]:
    """Truncate from the left: keep the last ``max_length`` ids (a prompt's question, an answer's end)."""
    return ids[-max_length:] if len(ids) > max_length else ids
