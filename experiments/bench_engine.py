"""Speed of the embedded engine on this machine's CPU, and what isolating it in a child process
costs per answer.

    python -m personaagent.experiments.bench_engine [--model qwen2.5-coder-1.5b] [--answers 12]

- prompt tokens/s: a 512-token prompt evaluated from an empty context, best of 3;
- generation tokens/s: 32 tokens decoded greedily after a short prompt;
- one answer's p50: a LaMP-3 sample question answered from label likelihoods (`LabelPredict`, one
  pass over the prompt), in this process (`LlamaCppEngine`) and through the child process that
  serves and restarts (`IsolatedEngine`), on the same questions, each asked once cold and then again;
- the isolation's own cost: the p50 of scoring one short prompt again (its prefix reused, so
  llama.cpp does almost nothing) on each engine; the difference is the pipe and pickling.
  The fake LM answers in-process with no engine, so isolation costs it nothing;
- users asked in turns: one answer's p50 when users take turns, each with a persona of their own
  (their past reviews) in the system message, with each user's prompt prefix kept
  (`PERSONAAGENT_PREFIX_CACHE_MB`) and without (`--interleaved-users`, 0 skips it); the scores
  must be identical.

Each row names the CPU's relevant flags and the llama.cpp build in use. Run it alone on the machine
(llama.cpp slows about tenfold when its threads outnumber free cores). Results go to
experiments/results/engine/<build tag>.json and .md, one file per CPU kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import dspy

from ..data import SAMPLE_DIR, load
from ..program.agent import answer_module
from ..program.isolated import IsolatedEngine, build_features
from ..program.lm import LlamaCppEngine, use_lm
from ..program.models import DEFAULT_MODEL
from ..program.native_build import RELEVANT_FLAGS, cpu_flags, installed_build
from ..program.persona import BASE_INSTRUCTION

RESULTS = Path(__file__).parent / "results" / "engine"


def prompt_speed(engine: LlamaCppEngine, tokens: int = 512) -> float:
    llama = engine._llama
    text = " ".join(f"word{i}" for i in range(tokens))
    ids = llama.tokenize(text.encode(), add_bos=False)[:tokens]
    best = float("inf")
    for _ in range(3):
        llama.reset()
        started = time.perf_counter()
        llama.eval(ids)
        best = min(best, time.perf_counter() - started)
    return len(ids) / best


def generation_speed(engine: LlamaCppEngine, tokens: int = 32) -> float:
    llama = engine._llama
    llama.reset()
    started = time.perf_counter()
    out = llama.create_completion("Once upon a time", max_tokens=tokens, temperature=0.0)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - started)


def answer_seconds(engine, model: str, questions: list[str]) -> list[float]:
    """Seconds per answer; every question twice (cold, then with its prompt's prefix reused)."""
    task = load(SAMPLE_DIR / "LaMP-3-amazon").task
    predict = answer_module(task, BASE_INSTRUCTION)
    lm = dspy.LM(f"local/{model}", engine=engine, cache=False, temperature=0.0)
    seconds = []
    with use_lm(lm):
        for question in [*questions, *questions]:
            started = time.perf_counter()
            predict(question=question, context="(nothing)")
            seconds.append(time.perf_counter() - started)
    return seconds


def interleaved_answers(engine, model: str, users: list) -> tuple[list[float], list[dict]]:
    """Seconds per answer and the label scores, the users asked in turns (their question, then three
    later reviews of theirs as questions): the context never holds the prefix of the user asked next,
    only a kept one can spare evaluating it."""
    task = load(SAMPLE_DIR / "LaMP-3-amazon").task
    personas = [answer_module(task, f"{BASE_INSTRUCTION}\nThis user's past reviews: "
                                    + " | ".join(m.input[-300:] for m in user.memories[:3])) for user in users]
    asked = [[user.questions[0].question] + [m.input for m in user.memories[3:6]] for user in users]
    lm = dspy.LM(f"local/{model}", engine=engine, cache=False, temperature=0.0)
    seconds, scores = [], []
    with use_lm(lm):
        for questions in zip(*asked):
            for predict, question in zip(personas, questions):
                started = time.perf_counter()
                scores.append(predict(question=question, context="(nothing)").label_scores)
                seconds.append(time.perf_counter() - started)
    return seconds, scores


def repeated_score_seconds(engine, repeats: int = 20) -> float:
    """p50 seconds of scoring the same short prompt again (its prefix reused: almost no llama.cpp
    work), so the difference between engines is the cost of the call itself."""
    messages = [{"role": "user", "content": "Rate this review from 1 to 5: great strings."}]
    engine.score(messages, ["1", "5"])
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.score(messages, ["1", "5"])
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--answers", type=int, default=12, help="questions, each answered twice")
    parser.add_argument("--interleaved-users", type=int, default=3, help="users asked in turns (0: skip)")
    args = parser.parse_args(argv)
    data = load(SAMPLE_DIR / "LaMP-3-amazon")
    questions = [q.question for u in data.users.values() for q in u.questions][:args.answers]

    engine = LlamaCppEngine(args.model)
    prompt_tps, generation_tps = prompt_speed(engine), generation_speed(engine)
    in_process = answer_seconds(engine, args.model, questions)
    call_in_process = repeated_score_seconds(engine)
    engine.close()
    interleaved = {}
    if args.interleaved_users:
        users, runs = list(data.users.values())[:args.interleaved_users], {}
        for name, megabytes in (("kept", None), ("not_kept", 0)):
            engine = LlamaCppEngine(args.model, prefix_cache_mb=megabytes)
            runs[name] = interleaved_answers(engine, args.model, users)
            engine.close()
        interleaved = {f"interleaved_answer_p50_s_prefix_{name}": round(statistics.median(seconds), 3)
                       for name, (seconds, _) in runs.items()}
        interleaved["interleaved_scores_identical"] = runs["kept"][1] == runs["not_kept"][1]
        interleaved["interleaved_answers"] = len(runs["kept"][0])
    started = time.perf_counter()
    isolated_engine = IsolatedEngine(args.model)
    start_seconds = time.perf_counter() - started  # spawn, load, self-test: what a restart costs
    isolated = answer_seconds(isolated_engine, args.model, questions)
    call_isolated = repeated_score_seconds(isolated_engine)
    isolated_engine.close()

    flags = cpu_flags()
    row = {
        "model": args.model, "threads": int(os.environ.get("PERSONAAGENT_THREADS") or os.cpu_count() or 1),
        "cpu_flags": " ".join(f for f in RELEVANT_FLAGS if f in flags), "build": installed_build().get("tag", ""),
        "instruction_sets": build_features(), "prompt_tokens_per_s": round(prompt_tps, 1),
        "generation_tokens_per_s": round(generation_tps, 1),
        "answer_p50_s_in_process": round(statistics.median(in_process), 3),
        "answer_p50_s_isolated": round(statistics.median(isolated), 3),
        "repeated_score_p50_ms_in_process": round(1000 * call_in_process, 2),
        "repeated_score_p50_ms_isolated": round(1000 * call_isolated, 2),
        "isolation_cost_ms_per_call": round(1000 * (call_isolated - call_in_process), 2),
        "engine_start_s": round(start_seconds, 2), "answers": len(in_process), **interleaved,
        "command": "python -m personaagent.experiments.bench_engine " + " ".join(argv or sys.argv[1:]),
    }
    table = ["| what | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in row.items()]
    print("\n".join(table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = row["build"] or "unrecorded-build"
    (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=1))
    (RESULTS / f"{name}.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
