#!/usr/bin/env bash
# The personalization comparison on the embedded 1.5B model, as run for BENCHMARKS.md. Resumable:
# each (method, user) result is kept under --out, so rerunning skips what is done.
# Stages of users over all three sets (the first N users of a file are a prefix of the first 2N),
# so an interrupted run still covers every set evenly. Within a stage: the free baselines, the
# plain LM baselines, PersonaAgent before and after alignment and its ablations, then the
# two-call baselines (MemBank, ReAct), then GEPA (as costly per user as a compile) if asked.
set -u
cd "$(dirname "$0")/.."
# A cache of this run only: answers cached by earlier code would count as free LM calls.
export DSPY_CACHEDIR=${DSPY_CACHEDIR:-$PWD/experiments/results/eval/dspy_cache}
STAGES=${STAGES:-8 16 30 60}
CORE=${CORE:-global_majority,user_majority,word_overlap,none,icl,rag,\
persona_noalign,persona,persona_nopersona,persona_nomemory,persona_noaction}
MORE=${MORE-membank,react}  # MORE="" runs the core methods only
SETS=${SETS:-LaMP-1-acl LaMP-3-amazon LaMP-2N-huffpost}
eval_set() {  # set, users, methods, extra arguments
  .venv/bin/personaagent eval --data ../shared/data/lamp/$1 --users "$2" --methods "$3" \
      --gepa-budget "${GEPA_BUDGET:-9}" --out experiments/results/eval/$1 \
      --tracking-uri sqlite:///experiments/results/eval/mlflow.db "${@:4}"
  # COMMIT=1: each finished set is committed (its results only), so a long run keeps what it did.
  [ -z "${COMMIT:-}" ] || { git add experiments/results/eval/$1 &&
      git commit -q -m "Eval results: $1, first $2 users" -- experiments/results/eval/$1; }
}
for users in $STAGES; do
  for set in $SETS; do eval_set "$set" "$users" "$CORE"; done
  [ -z "$MORE" ] || for set in $SETS; do eval_set "$set" "$users" "$CORE,$MORE"; done
  [ -z "${GEPA:-}" ] || for set in $SETS; do eval_set "$set" "$users" "$CORE,$MORE,gepa"; done
done
