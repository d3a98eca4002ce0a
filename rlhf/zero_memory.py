"""Model-state memory per device under ZeRO, for docs/distributed.md (not on any run-time path).

``model_states_bytes`` (the ZeRO paper's formulas), ``memory_table`` (Llama-2 7B/13B/70B, SFT/RM/PPO,
LoRA/full, ZeRO-2/3) and ``deepspeed_estimates`` (DeepSpeed's own estimators, for comparison).
``python -m rlhf.zero_memory`` prints both tables."""

from __future__ import annotations

from dataclasses import dataclass


GIB = 2**30
BYTES_16BIT = 2  # bf16/fp16 parameters, and their gradients
BYTES_ADAM = 12  # fp32 master weights + Adam's two moments


@dataclass(frozen=True)
class LlamaShape:
    """The Llama-2 shapes the memory table uses (hub configs of meta-llama/Llama-2-{7,13,70}b-hf)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # hidden / heads * key-value heads (70B uses grouped-query attention)
    vocab: int = 32000

    def causal_lm(self) -> int:
        """Parameters of the causal LM (untied embedding and LM head)."""
        h = self.hidden
        per_layer = 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h  # attention, MLP, 2 norms
        return self.vocab * h + self.layers * per_layer + h + self.vocab * h

    def classifier(self) -> int:
        """Parameters of the one-output sequence classifier (reward model): no LM head, a ``score`` row."""
        return self.causal_lm() - self.vocab * self.hidden + self.hidden

    def lora(self, rank: int = 8) -> int:
        """LoRA parameters on q/k/v/o (our default targets): ``rank * (in + out)`` per projection."""
        h = self.hidden
        return self.layers * rank * ((h + h) + (h + self.kv_dim) * 2 + (h + h))

    def largest_layer(self) -> int:
        return self.vocab * self.hidden


LLAMA2 = (LlamaShape("7B", 4096, 32, 11008, 4096), LlamaShape("13B", 5120, 40, 13824, 5120),
          LlamaShape("70B", 8192, 80, 28672, 1024))


def model_states_bytes(total: int, trainable: int, devices: int, stage: int, frozen_models: int = 0) -> float:
    """Bytes per device of model states for mixed-precision Adam, from the ZeRO paper's formulas.

    ``total`` parameters of the trained model, ``trainable`` of them trained (all: full fine-tune;
    LoRA: the adapter), ``frozen_models`` parameters of other models kept in 16-bit (PPO's reward
    model). 16-bit parameters: 2 bytes each, replicated under ZeRO-2 and partitioned over ``devices``
    under ZeRO-3; trainable parameters add 2 bytes of gradient and 12 of optimizer state, partitioned
    under both stages."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage {stage}: only 2 and 3 are tabulated")
    partitioned = (BYTES_16BIT + BYTES_ADAM) * trainable / devices
    weights = BYTES_16BIT * (total + frozen_models)
    return (weights if stage == 2 else weights / devices) + partitioned


def memory_rows(devices: int = 8) -> list[tuple[str, str, str, float, float]]:
    """(model, stage, PEFT, ZeRO-2 GiB, ZeRO-3 GiB) per device for the Llama-2 sizes.

    PPO: the policy (trained as in SFT, plus a value head) and the reward model (16-bit, frozen); with
    LoRA the reference policy is the base with the adapter switched off (no copy), with a full
    fine-tune it is a frozen 16-bit copy."""
    rows = []
    for shape in LLAMA2:
        lm, rm, lora = shape.causal_lm(), shape.classifier(), shape.lora()
        head = shape.hidden + 1  # PPO's value head
        cases = {
            ("SFT", "LoRA"): (lm + lora, lora, 0),
            ("SFT", "full"): (lm, lm, 0),
            ("RM", "LoRA"): (rm + lora + shape.hidden, lora + shape.hidden, 0),  # + score head trained in full
            ("RM", "full"): (rm, rm, 0),
            ("PPO", "LoRA"): (lm + lora + head, lora + head, rm),
            ("PPO", "full"): (lm + head, lm + head, rm + lm),
        }
        for (stage, peft), (total, trainable, frozen) in cases.items():
            rows.append((shape.name, stage, peft, model_states_bytes(total, trainable, devices, 2, frozen) / GIB,
                         model_states_bytes(total, trainable, devices, 3, frozen) / GIB))
    return rows


def memory_table(devices: int = 8) -> str:
    """``memory_rows`` as the Markdown table in docs/distributed.md."""
    lines = ["| model | stage | PEFT | ZeRO-2 GiB/device | ZeRO-3 GiB/device |", "|---|---|---|---:|---:|"]
    for model, stage, peft, zero2, zero3 in memory_rows(devices):
        lines.append(f"| {model} | {stage} | {peft} | {zero2:.1f} | {zero3:.1f} |")
    return "\n".join(lines)


def deepspeed_estimates(devices: int = 8) -> list[tuple[str, int, float, float, float, float]]:
    """Full fine-tune of each causal LM, 1 node of ``devices``, no offload: (model, parameters, formula and
    DeepSpeed-estimator GiB for ZeRO-2, then for ZeRO-3). The estimators count 18 bytes per parameter
    partitioned (they add an fp32 gradient) where the formula has 14 (ZeRO-2) or 16 (ZeRO-3), and for
    ZeRO-3 also the largest layer gathered in fp32."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for shape in LLAMA2:
        n = shape.causal_lm()
        _, ds2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=devices, cpu_offload=False)
        _, ds3, _ = estimate_zero3_model_states_mem_needs(n, shape.largest_layer(), num_gpus_per_node=devices,
                                                          cpu_offload=False, cpu_offload_params=False)
        rows.append((shape.name, n, model_states_bytes(n, n, devices, 2) / GIB, ds2 / GIB,
                     model_states_bytes(n, n, devices, 3) / GIB, ds3 / GIB))
    return rows


if __name__ == "__main__":
    print(memory_table())
    print("\n| model | parameters | ZeRO-2 formula | ZeRO-2 DeepSpeed | ZeRO-3 formula | ZeRO-3 DeepSpeed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, f2, d2, f3, d3 in deepspeed_estimates():
        print(f"| {name} | {n:,} | {f2:.1f} | {d2:.1f} | {f3:.1f} | {d3:.1f} |")
