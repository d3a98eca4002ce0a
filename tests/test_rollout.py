"""rlhf/rollout.py: the hf engine samples exactly from softmax(logits / T) whatever the checkpoint's
generation_config says, returns the sampler's own log-probs, and the assembled step logs their mismatch
with the trainer's."""

from __future__ import annotations

import pytest
import torch

from rlhf.rollout import ROLLOUT_ENGINES, check_engine_available, ignored_sampling_settings
from tests.test_ppo import chat_prompts, fresh_accelerator_state, make_trainer, prompt_ids, tiny_dir, tokenizer  # noqa: F401



def test_registry_and_refusals():
    assert "hf" in ROLLOUT_ENGINES
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="unknown"):
        check_engine_available("sglang")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(UserError, match="make setup-vllm"):
            check_engine_available("vllm")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_checkpoint_generation_config_does_not_change_sampling(tiny_dir, tokenizer, temperature):
    # Qwen2.5-Instruct ships repetition_penalty 1.05: a checkpoint's extra processors must not reshape the
    # distribution the update's log-probs assume. Here: repetition_penalty 1.3 and no_repeat_ngram_size 2.
    trainer = make_trainer(tiny_dir, tokenizer, temperature=temperature, batch_size=8, mini_batch_size=4)
    inner = trainer.policy.model.get_base_model()
    inner.generation_config.repetition_penalty = 1.3
    inner.generation_config.no_repeat_ngram_size = 2
    assert ignored_sampling_settings(inner) == {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
    texts = chat_prompts(tokenizer, 8)
    ids = prompt_ids(tokenizer, texts)
    for _ in range(2):  # the second step samples from an updated adapter
        rollout = trainer.rollout(ids)
        assert [len(r) for r in rollout.responses] == [len(lp) for lp in rollout.logprobs]
        stats = trainer.step(ids, rollout.responses, trainer.score(texts, rollout.responses),
                             sampler_logprobs=rollout.logprobs)
        assert stats["rollout/logprob_mismatch_max"] < 1e-5, stats["rollout/logprob_mismatch_max"]
    assert inner.generation_config.repetition_penalty == 1.3  # the model's own config is left as it was

    # The trap it avoids: generate with the checkpoint's config samples from another distribution.
    torch.manual_seed(0)
    padded = trainer._pad(ids[:4], max(len(i) for i in ids[:4]), "left")
    out = inner.generate(input_ids=padded[0], attention_mask=padded[1], do_sample=True, temperature=temperature,
                         top_k=0, top_p=1.0, max_new_tokens=8, output_scores=True, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=trainer.pad_token_id)
    processed = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1)
    plain = torch.stack([torch.log_softmax(s / temperature, -1) for s in out.logits], 1)
    finite = torch.isfinite(processed)
    assert (processed[finite] - plain[finite]).abs().max() > 0.05


def test_engine_logprobs_equal_generates_processed_scores(tiny_dir, tokenizer):
    # transformers' own generate (output_scores: the scores it sampled from) is the oracle.
    trainer = make_trainer(tiny_dir, tokenizer, temperature=0.8)
    ids = prompt_ids(tokenizer, chat_prompts(tokenizer, 4))
    torch.manual_seed(1)
    rollout = trainer.rollout(ids, min_new_tokens=0)
    torch.manual_seed(1)
    padded = trainer._pad(ids, max(len(i) for i in ids), "left")
    out = trainer.policy.model.eval().generate(input_ids=padded[0], attention_mask=padded[1], do_sample=True,
                                        temperature=0.8, top_k=0, top_p=1.0,
                                        max_new_tokens=trainer.config.output_max_length, output_scores=True,
                                        return_dict_in_generate=True, pad_token_id=trainer.pad_token_id,
                                        eos_token_id=trainer.eos_token_id)
    new = out.sequences[:, padded[0].shape[1]:]
    oracle = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, new[..., None])[..., 0]
    for row, (response, logprobs) in enumerate(zip(rollout.responses, rollout.logprobs)):
        assert torch.equal(response, new[row, : len(response)])  # the same samples: no extra processor
        torch.testing.assert_close(logprobs, oracle[row, : len(response)], atol=1e-6, rtol=0)


def test_hf_engine_applies_the_backends_generation_wrapper_once(tiny_dir, tokenizer):
    # Gaudi's HPU-graph wrapping sits behind the engine: the trainer only hands the backend's wrapper over.
    wrapped = []
    trainer = make_trainer(tiny_dir, tokenizer, wrap_for_generation=lambda model: wrapped.append(model) or model)
    assert wrapped == [trainer.policy.model]
    assert trainer.rollout_engine.model is trainer.policy.model
    trainer.rollout(prompt_ids(tokenizer, chat_prompts(tokenizer, 2)))
    assert len(wrapped) == 1


def test_vllm_without_vllm_installed_is_one_line_before_any_model_loads(tmp_path):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from tests.conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "rl_training.py", "--model_name", str(tmp_path / "missing"),
                             "--reward_fn", "rlhf.demo_rule:rule_reward", "--use_vllm", "True",
                             "--output_dir", str(tmp_path / "out")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "make setup-vllm" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
