#!/usr/bin/env bash
# A reported run of BENCHMARKS.md: every question of a set's first N users, one method at a time, so
# each finished row's answers can be committed (COMMIT=1: its raw/ only) and a run spread over
# sessions keeps what it did; then the table over every row. Resumable: run it again, same arguments.
#   bash experiments/reported_run.sh LaMP-1-acl 120 "global_majority user_majority word_overlap persona ..."
# The rows in the order they were run for LaMP-2N and LaMP-4: PersonaAgent and its ablations first,
# the plain baselines, then the costlier MemBank, ReAct and GEPA.
set -u
cd "$(dirname "$0")/.."
SET=$1 USERS=$2 METHODS=$3
OUT=experiments/results/run-all-questions/$SET
for method in $METHODS; do
  echo "== $method $(date -u +%H:%M:%S)"
  .venv/bin/personaagent eval --data "../shared/data/lamp/$SET" --users "$USERS" --questions-per-user all \
      --methods "$method" --out "$OUT" || echo "FAILED $method"
  [ -z "${COMMIT:-}" ] || { git add "$OUT/raw" && git commit -q -m "Eval: $SET reported run, the $method row's answers" -- "$OUT/raw"; }
done
# Every row resumed from raw/ (no LM call): results.{md,json,png}.
.venv/bin/personaagent eval --data "../shared/data/lamp/$SET" --users "$USERS" --questions-per-user all \
    --methods "$(echo $METHODS | tr ' ' ,)" --out "$OUT"
