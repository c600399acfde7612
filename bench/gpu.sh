#!/usr/bin/env bash
# GPU checks in one go, within 10 minutes on one CUDA GPU:
#   bash install.sh gpu test && bash bench/gpu.sh
# 1. the backend tests that use a GPU when there is one (vLLM engines, transformers
#    generation and scoring, batched log-probs, the runner);
# 2. bench/throughput.py on SmolLM2 (synthfb vs raw vLLM vs HF generate; the judge path);
# 3. bench/dpo_vs_trl.py for DPO, SFT and RM vs TRL (median of 3 alternating runs).
# Each step has its own time limit (they add up to under 10 minutes); one summary table
# is printed last. On a machine without a CUDA GPU it says so and exits 0.
# Python: $SYNTHFB_VENV (default .venv) as install.sh made it, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
venv="${SYNTHFB_VENV:-.venv}"
py="$venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "bench/gpu.sh: no CUDA GPU here (nvidia-smi finds none); skipping the GPU checks."
  exit 0
fi
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "bench/gpu.sh: a GPU is present but $py has no CUDA torch (install with: bash install.sh gpu test); skipping."
  exit 0
fi

logs="$(mktemp -d -t synthfb-gpu-XXXXXX)"
gpu="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
echo "bench/gpu.sh: $gpu; logs in $logs"
export TOKENIZERS_PARALLELISM=false
rows=()
start_all=$SECONDS

step() {  # step NAME LIMIT_S RESULT_PATTERN COMMAND...
  local name="$1" limit="$2" pattern="$3"
  shift 3
  local t0=$SECONDS status
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=15 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout" ;;
    *) status="failed ($rc)" ;;
  esac
  local result
  result="$(grep -E "$pattern" "$logs/$name.log" | sed 's/^ *//' | paste -sd ';' -)"
  [ -n "$result" ] || result="$(tail -1 "$logs/$name.log")"
  rows+=("$name|$status|$((SECONDS - t0))|$result")
  tail -3 "$logs/$name.log"
}

step backend-tests 180 '(passed|failed|error)' \
  "$py" -m pytest -q -p no:cacheprovider -m "not smollm2" --timeout 180 \
  tests/test_backends.py tests/test_runner.py tests/test_label_scoring.py tests/test_train_logprobs.py
step throughput 200 '(synthfb/raw|synthfb/HF|tok/s:)' \
  "$py" bench/throughput.py --model smollm2 --rows 256
step train-vs-trl 200 'ratio ours/TRL' \
  "$py" bench/dpo_vs_trl.py --method all --runs 3

echo
echo "summary ($gpu, $((SECONDS - start_all)) s in all)"
printf '%-14s | %-11s | %5s | %s\n' step status secs result
printf '%s\n' "---------------+-------------+-------+-------"
fail=0
for r in "${rows[@]}"; do
  IFS='|' read -r name status secs result <<<"$r"
  printf '%-14s | %-11s | %5s | %s\n' "$name" "$status" "$secs" "$result"
  [ "$status" = ok ] || fail=1
done
exit $fail
