"""rlhf.vllm_engine: vLLM colocated as the rollout engine (run by `make test-vllm` in .venv-vllm).

In the main venv vLLM is absent: the engine tests skip and the missing-vLLM UserError is tested. One
engine start for the whole file (module fixture, eager mode: a few seconds on CPU).

The tiny model here has hidden size 128 (4 heads of 32): vLLM's CPU attention has no kernel for the
default tiny model's head size 16 (tested: it is refused with a UserError before vLLM starts).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from rlhf.errors import UserError
from rlhf.rollout import SamplingParams, make_engine
from rlhf.sequences import logprobs_from_logits
from rlhf.vllm_engine import merged_state_dict

TOL = 1e-4
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [5, 6, 7], [30]]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory) -> str:
    from rlhf.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("vllm_tiny") / "model"), seed=0, hidden_size=128)


@pytest.fixture(scope="module")
def policy(vllm_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(vllm_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vllm_model_dir)


@pytest.fixture(scope="module")
def started(vllm_model_dir, policy, tokenizer):
    """(engine, what the process looked like before and after vLLM started)."""
    pytest.importorskip("vllm")
    import numpy

    torch.manual_seed(123)
    before = {"torch": torch.get_rng_state(), "numpy": numpy.random.get_state()[1].copy(),
              "set_num_threads": torch.set_num_threads}
    engine = make_engine("vllm", model=policy, model_path=vllm_model_dir, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, device="cpu", dtype="float32", seed=0,
                         max_model_len=128, kv_cache_space_gb=1, enforce_eager=True,
                         static_prompt_width=None, mark_step=None)  # the hf engine's kwargs are accepted
    after = {"torch": torch.get_rng_state(), "numpy": numpy.random.get_state()[1].copy(),
             "set_num_threads": torch.set_num_threads}
    yield engine, before, after
    engine.close()


@pytest.fixture
def engine(started, policy):
    engine = started[0]
    yield engine
    engine.push_weights(policy)  # every test leaves the engine on the unmodified policy


def forward_logprobs(model, prompt, response, temperature=1.0):
    """fp32 transformers forward: log_softmax(logits / T) of each response token."""
    ids = torch.cat([torch.as_tensor(prompt), torch.as_tensor(response)]).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    start = len(prompt)
    return logprobs_from_logits(logits[start - 1 : -1], ids[0, start:])


def fixed_sequences():
    return [torch.tensor(p + list(range(40, 60))) for p in PROMPTS]


def max_score_gap(engine, model):
    gaps = []
    for seq, scored in zip(fixed_sequences(), engine.score(fixed_sequences())):
        gaps.append((forward_logprobs(model, seq[:1], seq[1:]) - scored).abs().max().item())
    return max(gaps)


# --------------------------------------------------------------------------------------------
# (c) without vLLM, and inputs refused before vLLM starts (these run in every venv)
# --------------------------------------------------------------------------------------------


def test_missing_vllm_is_one_user_error_with_the_install_command(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as if it were not installed
    with pytest.raises(UserError) as error:
        make_engine("vllm", model=None, model_path=tiny_model_dir, eos_token_id=2, pad_token_id=0)
    message = str(error.value)
    assert "make setup-vllm" in message and "\n" not in message


def test_model_path_without_a_checkpoint_is_refused(tmp_path):
    from rlhf.vllm_engine import VLLMEngine  # directly: make_engine refuses first where vLLM is not installed

    with pytest.raises(UserError, match="config.json"):
        VLLMEngine(model=None, model_path=str(tmp_path), eos_token_id=2, pad_token_id=0)


def test_head_size_the_cpu_backend_lacks_is_refused_before_start(tiny_model_dir):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU backend only")
    with pytest.raises(UserError, match="head size 16"):
        make_engine("vllm", model=None, model_path=tiny_model_dir, eos_token_id=2, pad_token_id=0)


# --------------------------------------------------------------------------------------------
# merged state dict (no vLLM needed)
# --------------------------------------------------------------------------------------------


def test_lora_state_dict_is_merged_into_a_copy_under_plain_names(policy):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(policy), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    base_q = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    merged = merged_state_dict(peft_model)
    assert set(merged) == set(policy.state_dict())
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected = base_q + layer.get_delta_weight("default")
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    assert not torch.allclose(expected, base_q)
    assert torch.equal(layer.base_layer.weight, base_q)  # the trained model is not left merged
    assert not getattr(layer, "merged", False)


# --------------------------------------------------------------------------------------------
# (a) the sampler's log-probs, (b) pushes: need vLLM (make test-vllm)
# --------------------------------------------------------------------------------------------


def test_start_leaves_the_trainers_rng_and_thread_setting_alone(started):
    engine, before, after = started
    assert torch.equal(before["torch"], after["torch"])
    assert (before["numpy"] == after["numpy"]).all()
    assert after["set_num_threads"] is before["set_num_threads"]
    assert engine.startup_s > 0 and not engine.samples_from_policy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_a_transformers_forward(engine, policy, tokenizer, temperature):
    rollout = engine.generate([torch.tensor(p) for p in PROMPTS], SamplingParams(max_new_tokens=16,
                                                                               temperature=temperature))
    assert len(rollout.responses) == len(PROMPTS) == len(rollout.logprobs)
    for prompt, response, logprobs in zip(PROMPTS, rollout.responses, rollout.logprobs):
        assert response.dtype == torch.long and logprobs.dtype == torch.float32
        assert 1 <= len(response) <= 16 and logprobs.shape == response.shape
        eos = (response == tokenizer.eos_token_id).nonzero()
        assert len(eos) == 0 or eos[0].item() == len(response) - 1
        reference = forward_logprobs(policy, prompt, response, temperature)
        assert (reference - logprobs).abs().max().item() < TOL
    # the same prompt twice gets its own sample (no per-request seed shared between rows)
    assert not torch.equal(rollout.responses[0], rollout.responses[2])


def test_responses_are_cut_after_the_first_eos(engine, policy, tokenizer):
    eos = tokenizer.eos_token_id
    likes_eos = copy.deepcopy(policy)
    with torch.no_grad():  # EOS logit 7 after the prompt (p about 0.7): most responses end early
        hidden = likes_eos.model(torch.tensor([PROMPTS[0]])).last_hidden_state[0, -1]
        likes_eos.lm_head.weight[eos] = hidden / hidden.norm() ** 2 * 7.0
    engine.push_weights(likes_eos)
    rollout = engine.generate([torch.tensor(PROMPTS[0])] * 8, SamplingParams(max_new_tokens=32))
    ended = [r for r in rollout.responses if r[-1].item() == eos]
    assert ended, "no response sampled EOS"
    for response, logprobs in zip(rollout.responses, rollout.logprobs):
        assert (response == eos).sum() <= 1
        assert (forward_logprobs(likes_eos, PROMPTS[0], response) - logprobs).abs().max().item() < TOL


def test_pushed_weights_are_what_the_engine_samples_from(engine, policy):
    assert max_score_gap(engine, policy) < TOL
    perturbed = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    assert max_score_gap(engine, perturbed) > 1e-2  # before the push the engine still has the old weights
    engine.push_weights(perturbed)
    assert engine.push_method and engine.last_push_s is not None
    assert max_score_gap(engine, perturbed) < TOL
    rollout = engine.generate([torch.tensor(PROMPTS[1])], SamplingParams(max_new_tokens=16))
    gap = (forward_logprobs(perturbed, PROMPTS[1], rollout.responses[0]) - rollout.logprobs[0]).abs().max()
    assert gap.item() < TOL


def test_pushed_lora_update_is_what_the_engine_samples_from(engine, policy):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    peft_model = get_peft_model(copy.deepcopy(policy), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # a LoRA update (lora_B starts at zero)
                parameter.normal_(0, 0.5)
    assert max_score_gap(engine, peft_model) > 1e-2
    engine.push_weights(peft_model)
    assert max_score_gap(engine, peft_model) < TOL
    with peft_model.disable_adapter():  # the trained model kept its LoRA unmerged
        assert max_score_gap(engine, peft_model) > 1e-2
        for seq in fixed_sequences():
            assert torch.allclose(forward_logprobs(peft_model, seq[:1], seq[1:]),
                                  forward_logprobs(policy, seq[:1], seq[1:]), atol=1e-6)


# --------------------------------------------------------------------------------------------
# under torchrun (DDP): one vLLM per rank on the launch's process group, which survives close()
# --------------------------------------------------------------------------------------------

DDP_WORKER = '''
import json, sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from rlhf.rollout import SamplingParams, make_engine
from rlhf.sequences import logprobs_from_logits
import rlhf.vllm_engine

def main(model_dir, out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = make_engine("vllm", model=model, model_path=model_dir, eos_token_id=2, pad_token_id=0,
                         max_model_len=64, kv_cache_space_gb=1)
    total = torch.tensor([rank + 1.0]); dist.all_reduce(total)
    rollout = engine.generate([torch.tensor([5, 6, 7])], SamplingParams(max_new_tokens=4))
    torch.manual_seed(1)  # the same update on every rank, as DDP's
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    engine.push_weights(model)
    sequence = torch.tensor([5, 6, 7] + list(range(40, 50)))
    with torch.no_grad():
        reference = logprobs_from_logits(model(sequence[None]).logits[0, :-1], sequence[1:])
    gap = (engine.score([sequence])[0] - reference).abs().max().item()
    engine.close()
    after = torch.tensor([rank + 1.0]); dist.all_reduce(after)
    with open(f"{out}/rank{rank}.json", "w") as handle:  # not stdout: the two ranks' prints interleave
        json.dump({"sum": total.item(), "after_close": after.item(), "tokens": len(rollout.responses[0]),
                   "gap": gap}, handle)
    dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''


def test_two_ranks_under_torchrun_each_get_the_pushed_weights(vllm_model_dir, tmp_path):
    import json
    import os
    import subprocess

    from ports import free_port

    pytest.importorskip("vllm")

    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "VLLM_CPU_KVCACHE_SPACE")}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=repo)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                             vllm_model_dir, str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    for rank in (0, 1):
        row = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert row["sum"] == 3.0 and row["after_close"] == 3.0  # the trainer's group works after start and close
        assert 1 <= row["tokens"] <= 4
        assert row["gap"] < TOL


def test_prompt_plus_response_longer_than_max_model_len_is_refused(engine):
    with pytest.raises(UserError, match="max_model_len 128"):
        engine.generate([torch.tensor([5] * 120)], SamplingParams(max_new_tokens=16))


# --------------------------------------------------------------------------------------------
# rl_training.py through the engine, as a user runs it


def test_grpo_run_through_vllm_logs_the_mismatch_pushes_and_resumes(vllm_model_dir, tmp_path):
    import json
    import os
    import subprocess

    pytest.importorskip("vllm")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = tmp_path / "train.jsonl"
    with open(os.path.join(repo, "data", "demo", "train.jsonl")) as handle:
        data.write_text("".join(handle.readlines()[:60]))
    reward = tmp_path / "length_reward.py"  # varies within every group, so the first update moves the adapter
    reward.write_text("def reward(prompts, responses, **columns):\n    return [len(r) / 10 for r in responses]\n")
    out = tmp_path / "out"
    args = [sys.executable, "rl_training.py", "--model_name", vllm_model_dir, "--reward_fn",
            f"{reward}:reward", "--train_file", str(data), "--device", "cpu", "--use_vllm", "True",
            "--advantage_estimator", "grpo", "--num_generations", "4", "--batch_size", "8", "--mini_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--ppo_epochs", "1", "--learning_rate", "5e-3",
            "--output_max_length", "8", "--input_max_length", "64", "--eval_samples", "4", "--batched_gen", "True",
            "--save_freq", "1", "--vllm_kv_cache_gb", "1", "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*args, "--steps", "2"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # vLLM's sampler vs the trainer's fp32 forward: float noise, not another distribution
        assert row["rollout/logprob_mismatch_max"] < 1e-3, row["rollout/logprob_mismatch_max"]
        assert row["time/push_s"] >= 0 and abs(row["rollout/is_ratio_mean"] - 1) < 1e-3
    assert rows[1]["objective/kl"] > 0  # the second step sampled from the pushed, updated adapter
    resumed = subprocess.run([*args, "--steps", "3", "--resume_from_checkpoint", "true"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["algorithm"] == "grpo"
    again = subprocess.run([*args, "--steps", "3", "--resume_from_checkpoint", "true"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and (out / "summary.json").read_text() == json.dumps(summary, indent=2)


@pytest.mark.parametrize("zero", [2, 3])
def test_grpo_under_deepspeed_zero_samples_from_the_gathered_update(vllm_model_dir, tmp_path, zero):
    """Two ranks, each with its own colocated vLLM, training under ZeRO-2 / ZeRO-3 (tests/configs/zero3_release.json
    releases every parameter, as a real model would be partitioned): each push gathers the whole weights
    (``rlhf.zero.full_parameters``) on every rank. The second step's samples must come from the updated policy:
    the sampler's log-probs of them match the trainer's forward (a push of partitioned placeholders would fail
    to load or sample from other weights)."""
    import json
    import os
    import subprocess

    from ports import free_port

    pytest.importorskip("vllm")
    pytest.importorskip("deepspeed")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = tmp_path / "train.jsonl"
    with open(os.path.join(repo, "data", "demo", "train.jsonl")) as handle:
        data.write_text("".join(handle.readlines()[:60]))
    reward = tmp_path / "length_reward.py"
    reward.write_text("def reward(prompts, responses, **columns):\n    return [len(r) / 10 for r in responses]\n")
    config = {2: os.path.join(repo, "configs", "deepspeed", "zero2.json"),
              3: os.path.join(repo, "tests", "configs", "zero3_release.json")}[zero]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "VLLM_CPU_KVCACHE_SPACE")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix,
                                                                                            "torch_extensions"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "rl_training.py", "--model_name", vllm_model_dir, "--reward_fn",
            f"{reward}:reward", "--train_file", str(data), "--device", "cpu", "--use_vllm", "True",
            "--advantage_estimator", "grpo", "--num_generations", "4", "--batch_size", "8", "--mini_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--ppo_epochs", "1", "--learning_rate", "5e-3",
            "--output_max_length", "8", "--input_max_length", "64", "--eval_samples", "4", "--batched_gen", "True",
            "--save_freq", "2", "--steps", "2", "--vllm_kv_cache_gb", "1", "--deepspeed", config,
            "--output_dir", str(out)]
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert f"DeepSpeed ZeRO stage {zero}" in log, log[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["rollout/logprob_mismatch_max"] < 1e-3, row["rollout/logprob_mismatch_max"]
    assert rows[1]["objective/kl"] > 0  # step 2 sampled from the pushed update, not the starting weights
