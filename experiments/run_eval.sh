#!/usr/bin/env bash
# The comparison of issue 5 on the embedded 1.5B model, as run for BENCHMARKS.md. Resumable:
# each (method, user) result is kept under --out, so rerunning skips what is done.
#   1. every method but GEPA on the first 30 users of each LaMP set, in stages of users over all
#      three sets (the first N users of a file are a prefix of the first 2N), so an interrupted
#      run still covers every set evenly;
#   2. LoCoMo: retrieval recall@k and QA F1 (one pass, not resumable: before GEPA, which is);
#   3. GEPA, as costly per user as PersonaAgent's compile, on the first GEPA_USERS users, its
#      summary (gepa.json, .md, .png) comparing every method on those same users.
set -u
cd "$(dirname "$0")/.."
# A cache of this run only: answers cached by earlier code would count as free LM calls.
export DSPY_CACHEDIR=${DSPY_CACHEDIR:-$PWD/experiments/results/eval/dspy_cache}
STAGES=${STAGES:-10 20 30}
M=${METHODS:-global_majority,user_majority,none,icl,rag,membank,react,persona_noalign,persona}
SETS="LaMP-3-amazon LaMP-2N-huffpost LaMP-1-acl"
eval_set() {  # set, users, methods, extra arguments
  .venv/bin/personaagent eval --data ../shared/data/lamp/$1 --users "$2" --methods "$3" \
      --gepa-budget "${GEPA_BUDGET:-9}" --out experiments/results/eval/$1 \
      --tracking-uri sqlite:///experiments/results/eval/mlflow.db "${@:4}"
}
for users in $STAGES; do
  for set in $SETS; do eval_set "$set" "$users" "$M"; done
done
# Skipped once it has written its results (delete experiments/results/locomo/results.json to redo).
[ -e experiments/results/locomo/results.json ] || .venv/bin/python -m personaagent.experiments.locomo \
    --out experiments/results/locomo --qa-per-conversation "${LOCOMO_QA:-5}"
for set in $SETS; do eval_set "$set" "${GEPA_USERS:-10}" "$M,gepa" --name gepa; done
