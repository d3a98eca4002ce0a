# Benchmarks: PPO / GRPO / SFT / RM / DPO speed and memory, ours vs trl 1.12, trl 0.11.4 and trl 1.16 (see bench/run_bench.py).
#   make bench                                   both sizes, all tasks, fp32 and (where the hardware has it) bf16
#   make bench BENCH_SIZES=tiny BENCH_TASKS=grpo,dpo  narrower; BENCH_STEPS, BENCH_BATCH, BENCH_NEW_TOKENS, ... too
# Creates bench/.venv-trl112 and bench/.venv-trl0114 on first use; results go to bench/results/ (gitignored).
.PHONY: bench bench-tiny

bench: setup
	$(PY) bench/run_bench.py

bench-tiny: setup
	$(PY) bench/run_bench.py --sizes tiny
