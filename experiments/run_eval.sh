#!/usr/bin/env bash
# The comparison of issue 5 on the embedded 1.5B model, as run for BENCHMARKS.md. Resumable:
# each (method, user) result is kept under --out, so rerunning skips what is done. Users grow in
# stages over all three sets (the first N users of a file are a prefix of the first 2N), so an
# interrupted run still covers every set evenly.
set -u
cd "$(dirname "$0")/.."
# A cache of this run only: answers cached by earlier code would count as free LM calls.
export DSPY_CACHEDIR=${DSPY_CACHEDIR:-$PWD/experiments/results/eval/dspy_cache}
STAGES=${STAGES:-10 20 30}
M=${METHODS:-global_majority,user_majority,none,icl,rag,membank,react,persona_noalign,persona}
for users in $STAGES; do
  for set in LaMP-3-amazon LaMP-2N-huffpost LaMP-1-acl; do
    .venv/bin/personaagent eval --data ../shared/data/lamp/$set --users "$users" --methods "$M" \
        --gepa-budget "${GEPA_BUDGET:-9}" --out experiments/results/eval/$set \
        --tracking-uri sqlite:///experiments/results/eval/mlflow.db
  done
done
