#!/usr/bin/env bash
# The comparison of issue 5 on the embedded 1.5B model, as run for BENCHMARKS.md. Resumable:
# each (method, user) result is kept under --out, so rerunning skips what is done.
set -u
cd "$(dirname "$0")/.."
USERS=${USERS:-12}
M=${METHODS:-global_majority,user_majority,none,rag,membank,react,persona_noalign,persona}
for set in LaMP-3-amazon LaMP-2N-huffpost LaMP-1-acl; do
  .venv/bin/personaagent eval --data ../shared/data/lamp/$set --users "$USERS" --methods "$M" \
      --out experiments/results/eval/$set --tracking-uri sqlite:///experiments/results/eval/mlflow.db
done
