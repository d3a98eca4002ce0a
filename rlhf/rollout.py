"""Rollout engines: what samples the responses PPO, GRPO, RLOO and DPO's held-out report learn from.

One small interface (as verl's ``workers/rollout/base.py``) and a registry, so that adding an engine
is one module and one ``@register_engine`` line, and the trainers never branch on which one runs:

    engine = make_engine("hf", model=policy.model, eos_token_id=..., pad_token_id=..., device=...)
    rollout = engine.generate(prompt_ids, SamplingParams(max_new_tokens=128, temperature=0.7))
    rollout.responses   # list of 1-D token id tensors, each cut right after its first EOS (EOS kept)
    rollout.logprobs    # the SAMPLER's own log-prob of each response token (float32, same lengths)
    engine.push_weights(policy)   # after an update; a no-op for an engine that samples from the policy

``SamplingParams`` holds only what the update's log-probs can follow: ``softmax(logits / temperature)``
over the whole vocabulary. The sampler's log-probs come back with the responses so the trainer can log
how far they are from its own (the number TRL, verl and OpenRLHF log for their engines): with the
``hf`` engine a few 1e-7, from KV-cache vs full forward; a checkpoint's ``generation_config`` that
sneaks in a ``repetition_penalty`` would show up there at once, which is why the ``hf`` engine never
lets it in (``clean_generation_config``).

Imports neither trl nor vllm (the Gaudi stack runs this module with transformers 4.55).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from rlhf.backend import innermost_model
from rlhf.errors import UserError
from rlhf.modeling import fold_lm_head_input
from rlhf.sequences import pad_sequences, padded_width, truncate_after_eos

logger = logging.getLogger("rlhf")

ROLLOUT_ENGINES: dict[str, Callable[..., "RolloutEngine"]] = {}


def register_engine(name: str):
    """Class decorator: make an engine choosable as ``--rollout_engine NAME``."""

    def register(cls):
        ROLLOUT_ENGINES[name] = cls
        cls.name = name
        return cls

    return register


#: engines in modules of their own, imported only when chosen (their dependencies are optional)
OPTIONAL_ENGINES = {"vllm": ("rlhf.vllm_engine", "vllm",
                             "make setup-vllm and run the script with .venv-vllm/bin/python")}


def check_engine_available(name: str) -> None:
    """Refuse (one line) an unknown engine, or one whose package is not installed, before any model loads."""
    import importlib.util

    if name not in OPTIONAL_ENGINES:
        if name in ROLLOUT_ENGINES:
            return
        known = sorted({*ROLLOUT_ENGINES, *OPTIONAL_ENGINES})
        raise UserError(f"--rollout_engine {name} is unknown; use one of {', '.join(known)}")
    _, package, install = OPTIONAL_ENGINES[name]  # its package, whether or not its module was imported
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--rollout_engine {name} needs the {package} package, which is not installed here; "
                        f"install it with {install}, or use --rollout_engine hf")


def make_engine(name: str, **kwargs) -> "RolloutEngine":
    """The engine registered as ``name``, built with ``kwargs`` (each engine documents its own)."""
    check_engine_available(name)
    if name not in ROLLOUT_ENGINES:
        import importlib

        importlib.import_module(OPTIONAL_ENGINES[name][0])  # registers it
    return ROLLOUT_ENGINES[name](**kwargs)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: ``softmax(logits / temperature)``, nothing truncated, at most ``max_new_tokens``."""

    max_new_tokens: int
    temperature: float = 1.0
    #: benchmarks only: forces at least this many tokens (suppresses EOS, so no longer the policy's samples)
    min_new_tokens: int = 0


@dataclass
class Rollout:
    """Responses (1-D ids, cut after the first EOS) and the sampler's log-prob of each of their tokens."""

    responses: list[torch.Tensor]
    logprobs: list[torch.Tensor]


class RolloutEngine:
    """Base class: ``generate`` and ``push_weights``. ``name`` is set by ``register_engine``."""

    name = "base"
    #: True when the engine samples from the trained module itself (nothing to push)
    samples_from_policy = True
    #: the DeepSpeed engine training the policy (ZeRO-3: gathered through it), or None; an engine built
    #: before the trainer gets it from ``PPOTrainer`` once the policy is prepared
    deepspeed_engine = None

    def generate(self, prompts: Sequence[torch.Tensor], sampling: SamplingParams,
                 batch_size: Optional[int] = None) -> Rollout:
        raise NotImplementedError

    def push_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (no-op when it samples from them)."""

    def close(self) -> None:
        """Release what the engine holds (memory, processes)."""


# --------------------------------------------------------------------------------------------
# hf: transformers' generate on the policy itself
# --------------------------------------------------------------------------------------------


def clean_generation_config(model, sampling: SamplingParams, eos_token_id: int, pad_token_id: int):
    """A ``GenerationConfig`` with our sampling settings and nothing else.

    Not ``generate(generation_config=...)`` alone: transformers fills every field a passed config leaves
    at its default from ``model.generation_config``, so a checkpoint's ``repetition_penalty`` (Qwen2.5
    ships 1.05), ``no_repeat_ngram_size``, ``min_p`` ... would still reshape the distribution.
    ``temperature`` stays 1 here: the engine applies it itself, before recording log-probs."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    # optimum-habana's GaudiGenerationConfig carries its generate's own switches: a fresh one of that class
    config_class = type(base) if isinstance(base, GenerationConfig) else GenerationConfig
    config = config_class(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, use_cache=True)
    if sampling.min_new_tokens:
        config.min_new_tokens = sampling.min_new_tokens
    for flag in ("attn_softmax_bf16", "use_flash_attention", "flash_attention_recompute",
                 "flash_attention_causal_mask", "use_fused_rope", "reuse_cache", "bucket_size"):
        if base is not None and hasattr(base, flag):  # optimum-habana's kernel switches: not sampling settings
            setattr(config, flag, getattr(base, flag))
    return config


def ignored_sampling_settings(model) -> dict:
    """The checkpoint's ``generation_config`` entries that would change what is sampled (reported once)."""
    base = getattr(model, "generation_config", None)
    if base is None:
        return {}
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
               "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_length": 0,
               "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "sequence_bias": None, "top_h": None}
    found = {}
    for key, value in neutral.items():
        current = getattr(base, key, value)
        if current not in (value, None) and not (key == "min_length" and current == 0):
            found[key] = current
    return found


@contextlib.contextmanager
def _generation_config_swapped(model, config):
    """``model.generation_config`` (and the wrappers') replaced by ``config`` for the block."""
    holders = [m for m in {id(m): m for m in (model, innermost_model(model))}.values()
               if hasattr(m, "generation_config")]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = config
    try:
        yield
    finally:
        for m, original in zip(holders, saved):
            m.generation_config = original


class _SamplerLogprobs:
    """A logits processor placed LAST (after the temperature): it records ``log_softmax`` of the scores
    each token was drawn from, and at the next step keeps only the drawn token's entry (one vocabulary
    row per sequence held at a time). ``finish(sequences)`` adds the last step's."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: Optional[torch.Tensor] = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.pending is not None:
            self.picked.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, generated width) log-probs of ``new_tokens`` (the generated columns)."""
        if self.pending is not None and len(self.picked) < new_tokens.shape[1]:
            self.picked.append(self.pending.gather(1, new_tokens[:, len(self.picked)].unsqueeze(1)).squeeze(1))
        self.pending = None
        if not self.picked:
            return new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.picked, dim=1)


def _no_op() -> None:
    pass


@register_engine("hf")
class HFEngine(RolloutEngine):
    """transformers' ``generate`` on the policy itself: KV cache, left-padded prompts, dropout off.

    Args:
        model: the policy's language model (a PEFT model is fine; its adapter is active).
        eos_token_id, pad_token_id: from the tokenizer (pad may equal EOS).
        device: where prompts go.
        deepspeed_engine: the DeepSpeed engine training ``model`` (ZeRO-3: the whole weights are gathered
            once per ``generate`` call instead of once per layer per token). None: the caller gathers.
        static_prompt_width: HPU graphs: every prompt batch padded to this width (a longer prompt is refused).
        pad_to_multiple_of: round prompt widths up to a multiple of this (fewer shapes to capture).
        mark_step: HPU lazy-mode graph cut after each call (a no-op elsewhere).
        wrap_for_generation: ``Backend.wrap_for_generation`` (Gaudi: ``generate``'s forward passes run through
            HPU graphs, training forwards stay plain), applied once here; None: ``generate`` as it is.
    """

    samples_from_policy = True

    def __init__(self, model, eos_token_id: int, pad_token_id: int, device, deepspeed_engine=None,
                 static_prompt_width: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 mark_step: Optional[Callable[[], None]] = None, wrap_for_generation: Optional[Callable] = None):
        fold_lm_head_input(model)  # the prefill's head sees hidden[:, -1:] (rlhf.modeling: a bf16 slow path)
        self.model = wrap_for_generation(model) if wrap_for_generation is not None else model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.device = device
        self.deepspeed_engine = deepspeed_engine
        self.static_prompt_width = static_prompt_width
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mark_step = mark_step or _no_op
        ignored = ignored_sampling_settings(innermost_model(model))
        if ignored:
            logger.info("Rollouts ignore the checkpoint's generation_config %s: they sample from softmax(logits / "
                        "temperature), the distribution every log-prob of the update assumes", ignored)

    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor], sampling: SamplingParams,
                 batch_size: Optional[int] = None) -> Rollout:
        from transformers import LogitsProcessorList

        from rlhf.zero import full_parameters

        rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
        if any(r.numel() == 0 for r in rows):
            raise UserError("an empty prompt reached the sampler; drop empty prompts from the dataset")
        config = clean_generation_config(innermost_model(self.model), sampling, self.eos_token_id, self.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        rollout = Rollout(responses=[], logprobs=[])
        step = batch_size or len(rows)
        try:
            # ZeRO-3: gathered here only for the engine's own model (a caller may already hold it gathered)
            gathered = (full_parameters(self.model, self.deepspeed_engine) if self.deepspeed_engine is not None
                        else contextlib.nullcontext())
            with gathered, _generation_config_swapped(self.model, config):
                for i in range(0, len(rows), step):
                    chunk = rows[i : i + step]
                    width = padded_width(max(r.numel() for r in chunk), self.static_prompt_width, self.pad_to_multiple_of)
                    padded = pad_sequences(chunk, self.pad_token_id, side="left", pad_to=width, device=self.device)
                    recorder = _SamplerLogprobs(sampling.temperature)
                    output = self.model.generate(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                                 generation_config=config,
                                                 logits_processor=LogitsProcessorList([recorder]))
                    if not isinstance(output, torch.Tensor):  # return_dict_in_generate=True
                        output = output.sequences
                    new_tokens = output[:, width:]
                    logprobs = recorder.finish(new_tokens)
                    ids, mask, _ = truncate_after_eos(new_tokens, self.eos_token_id, self.pad_token_id)
                    lengths = mask.sum(1).tolist()
                    rollout.responses.extend(ids[j, : lengths[j]] for j in range(len(chunk)))
                    rollout.logprobs.extend(logprobs[j, : lengths[j]].float() for j in range(len(chunk)))
        finally:
            self.model.train(was_training)
            self.mark_step()
        return rollout
