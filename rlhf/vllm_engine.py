"""The ``vllm`` rollout engine: vLLM colocated in the training process (TRL's ``vllm_mode="colocate"``).

    engine = make_engine("vllm", model=policy.model, model_path=checkpoint_dir, eos_token_id=...,
                         pad_token_id=..., device=..., dtype="float32", seed=0)
    rollout = engine.generate(prompt_ids, SamplingParams(max_new_tokens=128, temperature=0.7))
    engine.push_weights(policy.model)      # after every update: the engine samples from the new weights

vLLM starts from ``model_path`` (the checkpoint the policy was loaded from) and from then on holds its
own copy of the weights, so ``samples_from_policy`` is False: the trainer must call ``push_weights``
after each optimizer update. The push sends every weight, with LoRA merged into a COPY of the state
dict (as TRL does; the trained model is never left merged), under the names of the plain transformers
checkpoint (``base_model.model.``, ``.base_layer`` and ``lora_`` entries gone).

Two ways to put weights into a running vLLM, and which build needs which (logged at the first push):

- ``collective_rpc("reload_weights", weights_iterator=...)``: used on the CPU backend. It re-runs the
  loader's post-processing; vLLM's CPU backend repacks linear weights for oneDNN at load time, so the
  call TRL 1.16 uses fails there ("'Parameter' object has no attribute 'weight_loader'").
- ``model_runner.model.load_weights(...)`` on the in-process driver worker (TRL 1.16's colocate call):
  used on CUDA builds, where the weights stay in checkpoint layout and a direct copy is cheapest. When
  that worker cannot be reached (vLLM in its own processes) ``reload_weights`` is used there too.

What vLLM does to the process it runs in, and what this engine does about it:
- in-process only (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weights are pushed without a copy between
  processes, and scripts need no spawn guard for vLLM's sake;
- it seeds the global RNGs and replaces ``torch.set_num_threads`` with a no-op (CPU backend): both are
  put back after start-up, so the trainer's RNG stream and thread setting are its own;
- it would apply the checkpoint's ``generation_config`` (repetition_penalty, top_k ...) to every
  request: started with ``generation_config="vllm"`` so it samples from ``softmax(logits / T)`` only,
  like the ``hf`` engine; log-probs are vLLM's ``processed_logprobs`` (after the temperature), i.e. the
  distribution the tokens were drawn from.
- it needs a torch.distributed group: with none it makes a world of 1 (gloo) that lives until
  ``close()``; under torchrun it joins the launch's (``external_launcher``, one vLLM per rank), so build
  the engine after the trainer's process group exists, and ``close()`` then leaves that group alone;
- KV cache on CPU: ``VLLM_CPU_KVCACHE_SPACE`` GiB (``kv_cache_space_gb``, default 10% of the machine's
  memory, 1-4 GiB); on GPU ``gpu_memory_utilization`` (TRL's ``--vllm_gpu_memory_utilization``).

This module imports vllm only inside the engine (``make setup-vllm`` builds ``.venv-vllm``, the one
environment that has it); without vllm, building the engine is a one-line UserError.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Optional, Sequence

import torch

from rlhf.errors import UserError
from rlhf.rollout import Rollout, RolloutEngine, SamplingParams, register_engine
from rlhf.sequences import is_peft_model

logger = logging.getLogger("rlhf")

INSTALL_HINT = "run `make setup-vllm` and start the script with .venv-vllm/bin/python"


def import_vllm():
    """The ``vllm`` module, or a UserError saying how to get it."""
    try:
        import vllm
    except ModuleNotFoundError as error:
        if error.name != "vllm" and not str(error.name or "").startswith("vllm."):
            raise UserError(f"vLLM is installed but does not import (missing module {error.name}); "
                            f"reinstall it: {INSTALL_HINT}") from error
        raise UserError(f"--rollout_engine vllm needs vLLM, which is not installed here; {INSTALL_HINT}") from error
    except ImportError as error:
        raise UserError(f"vLLM is installed but does not import ({error}); reinstall it: {INSTALL_HINT}") from error
    return vllm


def default_kv_cache_space_gb() -> int:
    """CPU KV cache: 10% of the machine's memory, at least 1 and at most 4 GiB (2 GiB on 24 GiB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 2
    return int(min(4, max(1, total // 10)))


# --------------------------------------------------------------------------------------------
# The weights vLLM gets: plain transformers names, LoRA merged into a copy
# --------------------------------------------------------------------------------------------


def _unwrap(model):
    """The module under DDP / DeepSpeed wrappers (a PEFT model stays a PEFT model)."""
    while not is_peft_model(model) and hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _lora_deltas(model) -> dict[str, torch.Tensor]:
    """``{module name: summed delta weight of its active LoRA adapters}`` of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "disable_adapters", False):
            continue
        active = module.active_adapters
        if isinstance(active, str):
            active = [active]
        delta = None
        for adapter in active:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise UserError("--rollout_engine vllm cannot push a DoRA adapter (use_dora); "
                                "use plain LoRA or --rollout_engine hf")
            piece = module.get_delta_weight(adapter)
            delta = piece if delta is None else delta + piece
        if delta is not None:
            deltas[name] = delta
    return deltas


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The policy's weights as a plain transformers checkpoint would name them, LoRA merged.

    For a PEFT model: each LoRA-wrapped ``...q_proj.base_layer.weight`` becomes ``...q_proj.weight`` +
    the active adapters' delta (a new tensor: the model itself is not touched), ``lora_*`` entries are
    dropped, ``modules_to_save`` copies replace their originals, and the ``base_model.model.`` prefix
    goes. Tensors are detached views of the model's own where nothing is merged (no copy)."""
    model = _unwrap(model)
    with torch.no_grad():
        state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        if not is_peft_model(model):
            return state
        deltas = _lora_deltas(model)
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if "lora_" in name or ".original_module." in name:
                continue
            module_name, _, leaf = name.rpartition(".")
            if module_name.endswith(".base_layer"):
                owner = module_name[: -len(".base_layer")]
                if leaf == "weight" and owner in deltas:
                    tensor = tensor + deltas[owner].to(tensor.dtype)
                name = f"{owner}.{leaf}"
            if ".modules_to_save." in name:
                head, _, rest = name.partition(".modules_to_save.")
                name = f"{head}.{rest.partition('.')[2]}"
            if name.startswith("base_model.model."):
                name = name[len("base_model.model."):]
            out[name] = tensor
        return out


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    """vLLM in the training process, started from ``model_path``; weights pushed after every update.

    Args:
        model: the trained policy LM (a PEFT model is fine: its LoRA is merged into what is pushed).
        model_path: the checkpoint directory vLLM loads at start (the one ``model`` was loaded from).
        eos_token_id, pad_token_id: from the tokenizer; responses are cut after the first EOS.
        device: unused (vLLM places its own copy: CPU backend on CPU builds, the current GPU on CUDA).
        dtype: "float32" or "bfloat16" (vLLM's copy; the log-probs it returns are float32 either way).
        seed: vLLM's sampling seed (plus ``rank // tensor_parallel_size`` under torchrun, as TRL). No
            per-request seed: vLLM would give the same seed's identical prompts (a GRPO group) one sample.
        max_model_len: longest prompt + response (default: the checkpoint's, capped at 4096).
        gpu_memory_utilization: GPU builds: share of GPU memory vLLM takes (weights + KV cache).
        tensor_parallel_size: GPU builds: shards per vLLM instance (colocated: ranks of the launch).
        kv_cache_space_gb: CPU builds: KV cache GiB (``VLLM_CPU_KVCACHE_SPACE``); default fits the machine.
        enforce_eager: no torch.compile / CUDA graphs (start-up seconds instead of minutes on CPU).
        deepspeed_engine: under ZeRO-3, the engine training ``model``: weights are gathered once per push.
        **_ignored: the ``hf`` engine's HPU settings (static_prompt_width, pad_to_multiple_of, mark_step).
    """

    samples_from_policy = False

    def __init__(self, model, model_path: str, eos_token_id: int, pad_token_id: int, device=None,
                 dtype: str = "float32", seed: int = 0, max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 kv_cache_space_gb: Optional[float] = None, enforce_eager: bool = True,
                 deepspeed_engine=None, **_ignored):
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"vLLM engine dtype {dtype!r}: use float32 or bfloat16")
        if not model_path or not os.path.isfile(os.path.join(str(model_path), "config.json")):
            raise UserError(f"vLLM engine: model_path {model_path!r} holds no config.json; pass the policy's "
                            "checkpoint directory (a hub id is not loadable offline)")
        self.model = model
        self.model_path = str(model_path)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.device = device
        self.dtype = dtype
        self.deepspeed_engine = deepspeed_engine
        self.push_method: Optional[str] = None
        #: more vLLM SamplingParams for every request (benchmarks: {"ignore_eos": True}); empty for training
        self.extra_sampling: dict = {}
        self.last_push_s: Optional[float] = None

        # before vllm reads them (its env values are read when used, not at import)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if kv_cache_space_gb is not None:
            if int(kv_cache_space_gb) < 1 or int(kv_cache_space_gb) != kv_cache_space_gb:
                raise UserError(f"vLLM KV cache space {kv_cache_space_gb} GiB: use a whole number of GiB, at least 1")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_space_gb))
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(default_kv_cache_space_gb()))
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        config = self._check_loadable(current_platform)
        if max_model_len is None:
            max_model_len = min(4096, int(getattr(config, "max_position_embeddings", 4096) or 4096))
        self.max_model_len = int(max_model_len)
        rank, world = _rank_and_world()
        kwargs = dict(model=self.model_path, tokenizer=self.model_path, dtype=dtype,
                      seed=int(seed) + rank // max(1, tensor_parallel_size), max_model_len=int(max_model_len),
                      enforce_eager=bool(enforce_eager), tensor_parallel_size=int(tensor_parallel_size),
                      gpu_memory_utilization=float(gpu_memory_utilization), generation_config="vllm",
                      logprobs_mode="processed_logprobs", trust_remote_code=False)
        if world > 1 or tensor_parallel_size > 1:
            # colocated under torchrun: one vLLM per rank group, on the launch's process group (as TRL)
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.vllm_version = getattr(vllm, "__version__", "?")
        # vLLM's shutdown destroys the default process group: its own (a world of 1 it creates when there is
        # none), or the launch's under torchrun, which close() must then leave to the trainer
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        saved_rng = _rng_state()
        set_num_threads = torch.set_num_threads
        started = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            _set_rng_state(saved_rng)
        self.startup_s = time.perf_counter() - started
        logger.info("vLLM %s engine started in %.1f s (%s, %s, enforce_eager=%s, max_model_len=%d%s)",
                    self.vllm_version, self.startup_s, "CPU backend" if self.on_cpu else current_platform.device_name,
                    dtype, bool(enforce_eager), int(max_model_len),
                    f", KV cache {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB" if self.on_cpu
                    else f", gpu_memory_utilization={gpu_memory_utilization}")
        self._sampling_class = vllm.SamplingParams
        # "no top-k truncation" is 0 in recent vLLM and -1 in older ones; use this build's default
        self._no_top_k = self._sampling_class().top_k
        tokenizer_eos = getattr(self.llm.get_tokenizer(), "eos_token_id", None)
        if tokenizer_eos is not None and tokenizer_eos != self.eos_token_id:
            logger.warning("vLLM also stops at the tokenizer's EOS %d besides eos_token_id %d; a response it "
                           "ends there is kept whole", tokenizer_eos, self.eos_token_id)

    def _check_loadable(self, platform):
        """The checkpoint's config; UserError for an architecture (or CPU head size) this vLLM cannot run."""
        from transformers import AutoConfig
        from vllm import ModelRegistry

        config = AutoConfig.from_pretrained(self.model_path)
        architectures = list(getattr(config, "architectures", None) or [])
        supported = set(ModelRegistry.get_supported_archs())
        if not architectures or not any(a in supported for a in architectures):
            raise UserError(f"vLLM cannot load {self.model_path}: architecture {architectures or 'unknown'} is not "
                            "one vLLM supports; use --rollout_engine hf")
        if self.on_cpu:
            text = getattr(config, "get_text_config", lambda: config)()
            heads = getattr(text, "num_attention_heads", None)
            head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if head_dim is not None and head_dim not in sizes:
                raise UserError(f"vLLM's CPU backend cannot run {self.model_path}: attention head size {head_dim} "
                                f"is not one of {sizes}; use --rollout_engine hf")
        return config

    def _sampling(self, **kwargs):
        return self._sampling_class(top_k=self._no_top_k, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                    presence_penalty=0.0, frequency_penalty=0.0, detokenize=False,
                                    **{**kwargs, **self.extra_sampling})

    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor], sampling: SamplingParams,
                 batch_size: Optional[int] = None) -> Rollout:
        """Responses cut after the first EOS and vLLM's log-prob of each token (``log_softmax(logits / T)``).

        ``batch_size`` is not used: vLLM batches all prompts itself within its KV cache."""
        rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
        if any(r.numel() == 0 for r in rows):
            raise UserError("an empty prompt reached the sampler; drop empty prompts from the dataset")
        longest = max((r.numel() for r in rows), default=0)
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise UserError(f"a prompt of {longest} tokens + {sampling.max_new_tokens} new tokens exceeds the vLLM "
                            f"engine's max_model_len {self.max_model_len}; raise max_model_len or shorten prompts")
        if sampling.temperature <= 0:
            raise UserError(f"temperature {sampling.temperature} must be > 0 for sampled rollouts")
        params = self._sampling(temperature=float(sampling.temperature), max_tokens=int(sampling.max_new_tokens),
                                logprobs=0, stop_token_ids=[self.eos_token_id])
        outputs = self.llm.generate([{"prompt_token_ids": r.tolist()} for r in rows], params, use_tqdm=False)
        rollout = Rollout(responses=[], logprobs=[])
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            if self.eos_token_id in ids:
                ids = ids[: ids.index(self.eos_token_id) + 1]
            logprobs = [completion.logprobs[i][token].logprob for i, token in enumerate(ids)]
            rollout.responses.append(torch.tensor(ids, dtype=torch.long))
            rollout.logprobs.append(torch.tensor(logprobs, dtype=torch.float32))
        return rollout

    @torch.no_grad()
    def score(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """vLLM's ``log_softmax(logits)`` (temperature 1) of tokens 1.. of each sequence (its prompt
        log-probs): what the engine's current weights give fixed sequences, e.g. to check a push."""
        rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
        if any(r.numel() < 2 for r in rows):
            raise ValueError("score needs sequences of at least 2 tokens")
        params = self._sampling(temperature=1.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": r.tolist()} for r in rows], params, use_tqdm=False)
        scores = []
        for row, output in zip(rows, outputs):
            picked = output.prompt_logprobs
            ids = row.tolist()
            scores.append(torch.tensor([picked[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float32))
        return scores

    def _choose_push(self):
        """``(method name, callable(weights list))``: see the module docstring for why each build gets which."""
        if self.on_cpu:
            reason = ("CPU backend: it repacks linear weights for oneDNN at load time, so a direct "
                      "model.load_weights (TRL's colocate call) fails; reload_weights re-runs that processing")
            return "collective_rpc('reload_weights')", self._reload_weights, reason
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
        runner_model = getattr(getattr(worker, "model_runner", None), "model", None)
        if runner_model is not None and hasattr(runner_model, "load_weights"):
            reason = "GPU backend, in-process worker: weights stay in checkpoint layout, a direct copy (as TRL 1.16)"
            return "model_runner.model.load_weights", runner_model.load_weights, reason
        reason = "GPU backend, but the worker is not in this process: vLLM's own reload_weights RPC"
        return "collective_rpc('reload_weights')", self._reload_weights, reason

    def _reload_weights(self, weights):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    @torch.no_grad()
    def push_weights(self, model: Optional[torch.nn.Module] = None) -> None:
        """Send ``model``'s current weights (LoRA merged into a copy) to vLLM; drop its prefix cache.

        Under ZeRO-3 every rank must call it (the weights are gathered once, on every rank)."""
        from rlhf.zero import full_parameters

        model = self.model if model is None else model
        if self.push_method is None:
            self.push_method, self._push, reason = self._choose_push()
            logger.info("vLLM weight push: %s (%s)", self.push_method, reason)
        started = time.perf_counter()
        with full_parameters(model, self.deepspeed_engine):
            weights = list(merged_state_dict(model).items())
            self._push(weights)
            del weights
        self.llm.reset_prefix_cache()
        self.last_push_s = time.perf_counter() - started
        logger.debug("vLLM weight push took %.2f s", self.last_push_s)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        import gc

        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)  # the in-process client
        if self._owns_process_group:
            if core is not None:
                core.shutdown()  # also destroys the world-of-1 process group vLLM made for itself
        elif core is not None:
            # vLLM's shutdown (run again by the client's finalizer when collected) ends with
            # destroy_process_group() on the trainer's group: do its other steps only
            finalizer = getattr(core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            inner = getattr(core, "engine_core", None)
            for part in (getattr(inner, "model_executor", None), getattr(inner, "scheduler", None)):
                if part is not None:
                    part.shutdown()
            from vllm.distributed import destroy_model_parallel

            destroy_model_parallel()
        del llm, core
        gc.unfreeze()  # vLLM gc.freeze()s everything alive at its start
        gc.collect()


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _rng_state():
    import numpy

    return random.getstate(), numpy.random.get_state(), torch.get_rng_state()


def _set_rng_state(state) -> None:
    import numpy

    random.setstate(state[0])
    numpy.random.set_state(state[1])
    torch.set_rng_state(state[2])
