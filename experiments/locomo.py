"""LoCoMo: long-term conversational memory (issue "Experiments", item 2).

Each conversation is one user: its turns go into that user's own episodic memory (hybrid search:
FAISS over MiniLM embeddings and SQLite full text, program/memory.py) and its questions are asked
against it alone; no conversation's turns ever reach another's memory, index or prompt.

1. Retrieval: for every question with annotated evidence, recall@k of the evidence turns among
   the top k, for the episodic memory, its embedding search alone ("dense") and BM25 over the
   same turns (rank_bm25, an implementation independent of the memory's), by question category.
2. QA: the LoCoMo token F1 by category of one DSPy call that answers from turns: the memory's
   top k, BM25's top k, and, as the full-context baseline, the latest turns that fit the LM's
   context window (whole conversations do not fit: their token counts are reported).

    python -m personaagent.experiments.locomo --out DIR [--lm local/qwen2.5-coder-1.5b] [--qa-per-conversation N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import dspy
import faiss
import numpy as np
from rank_bm25 import BM25Okapi

from ..data.locomo import (CATEGORIES, Conversation, LocomoQuestion, evidence_recall, load_locomo,
                           normalized_tokens, score_answer)
from ..program import models
from ..program.embedder import Embedder, default_embedder
from ..program.lm import DEFAULT_LM, LOCAL_PREFIX, UsageMeter, make_lm, use_lm
from ..program.memory import EpisodicMemory

DEFAULT_LOCOMO_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo"
PROMPT_RESERVE = 1024  # context tokens kept for the instructions, the question and the answer

Ranker = Callable[[str, int], list[str]]  # (question, k) -> dialogue ids, best first


class AnswerFromConversation(dspy.Signature):
    """Answer a question about a long conversation between two people, using only the excerpts of
    it given. Each excerpt is one turn, dated with its session's date and time; resolve relative
    dates ("yesterday", "last week") against that date. Answer with a short phrase (a name, a date,
    a few words), not a sentence. If the excerpts do not say, answer: Not mentioned in the conversation."""

    excerpts: str = dspy.InputField(desc="turns of the conversation, oldest first")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a short phrase")


class ConversationQA(dspy.Module):
    """Answers from the turns `select` picks for the question, shown in conversation order."""

    def __init__(self, conversation: Conversation, select: Callable[[str], list[str]]):
        super().__init__()
        self.conversation = conversation
        self.select = select
        self.answer = dspy.Predict(AnswerFromConversation)

    def forward(self, question: str) -> dspy.Prediction:
        turns = sorted((self.conversation.turn(d) for d in self.select(question)), key=lambda t: t.timestamp)
        return self.answer(excerpts="\n".join(t.input for t in turns), question=question)


# ---------------------------------------------------------------- retrieval

def memory_ranker(memory: EpisodicMemory) -> Ranker:
    return lambda question, k: [r.metadata["dia_id"] for r in memory.search(question, k)]


def dense_ranker(memory: EpisodicMemory) -> Ranker:
    def rank(question: str, k: int) -> list[str]:
        return [r.metadata["dia_id"] for r in memory.search_vector(memory.embedder.embed([question])[0], k)]
    return rank


def bm25_ranker(conversation: Conversation) -> Ranker:
    bm25 = BM25Okapi([normalized_tokens(t.input) for t in conversation.turns])
    ids = [t.metadata["dia_id"] for t in conversation.turns]

    def rank(question: str, k: int) -> list[str]:
        scores = bm25.get_scores(normalized_tokens(question))
        return [ids[i] for i in np.argsort(-scores, kind="stable")[:k]]
    return rank


def recent_window(conversation: Conversation, budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """The latest turns that fit in `budget` tokens: what a model with that context window can see."""
    chosen, used = [], 0
    for turn in reversed(conversation.turns):
        used += count_tokens(turn.input + "\n")
        if used > budget:
            break
        chosen.append(turn.metadata["dia_id"])
    return chosen[::-1]


def token_counter(model_name: str) -> Callable[[str], int]:
    """Counts tokens with the embedded model's own tokenizer (its vocabulary only: no weights loaded)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(models.prepare(model_name, progress=False)), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False))


def stratified_sample(questions: list[LocomoQuestion], n: int) -> list[LocomoQuestion]:
    """n questions spread evenly over the categories and, within each, over the conversation."""
    by_category = defaultdict(list)
    for q in questions:
        by_category[q.category].append(q)
    quota = dict.fromkeys(sorted(by_category), 0)
    while sum(quota.values()) < min(n, len(questions)):
        for c in quota:
            if quota[c] < len(by_category[c]) and sum(quota.values()) < n:
                quota[c] += 1
    return [by_category[c][int((j + 0.5) * len(by_category[c]) / quota[c])] for c in quota for j in range(quota[c])]


def mean_by_category(rows: list[tuple[str, str, float]]) -> dict[str, dict[str, dict]]:
    """{method: {category: {mean, n}}}, with 'all' over each method's rows of (method, category, score)."""
    groups = defaultdict(lambda: defaultdict(list))
    for method, category, score in rows:
        groups[method][category].append(score)
        groups[method]["all"].append(score)
    return {method: {c: {"mean": round(float(np.mean(s)), 4), "n": len(s)} for c, s in by_category.items()}
            for method, by_category in groups.items()}


# ---------------------------------------------------------------- the run

def recall_rows(conv: Conversation, rankers: dict[str, Ranker], ks: tuple[int, ...],
                window_ids: list[str]) -> list[tuple[str, str, float]]:
    """(method@k, category, recall) for every question of the conversation that has evidence."""
    rows = []
    for q in conv.questions:
        if not q.evidence:
            continue
        for method, rank in rankers.items():
            ranked = rank(q.question, max(ks))
            rows += [(f"{method}@{k}", q.category_name, evidence_recall(ranked, q.evidence, k)) for k in ks]
        if window_ids:
            rows.append(("full_context_window", q.category_name,
                         evidence_recall(window_ids, q.evidence, len(window_ids))))
    return rows


def answer_questions(conv: Conversation, method: str, select: Callable[[str], list[str]],
                     questions: list[LocomoQuestion], lm: dspy.LM) -> tuple[list[dict], UsageMeter]:
    program = ConversationQA(conv, select)
    predictions = []
    with use_lm(lm), UsageMeter(lm) as meter:
        for q in questions:
            try:
                answer, error = str(program(question=q.question).answer), None
            except Exception as exc:  # one failed call must not lose the whole run
                answer, error = "", f"{type(exc).__name__}: {exc}"
            predictions.append({"id": q.id, "method": method, "category": q.category_name, "question": q.question,
                                "gold": q.answer, "prediction": answer, "score": round(score_answer(answer, q), 4),
                                "error": error})
    return predictions, meter


def run_locomo(out_dir: str | Path, lm_spec: str = DEFAULT_LM, max_questions_per_conv: int = 10,
               ks: tuple[int, ...] = (5, 10, 20), qa_k: int = 10, full_context_tokens: int | None = None,
               data_dir: str | Path = DEFAULT_LOCOMO_DIR, embedder: Embedder | None = None) -> dict:
    """Retrieval recall@k for every question, then QA F1 on `max_questions_per_conv` questions of
    each conversation (0: retrieval only). `full_context_tokens` is the window of the full-context
    baseline (default: the embedded model's context less PROMPT_RESERVE; 0: skip it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.omp_set_num_threads(1)  # single queries: OpenMP start-up costs more than the search
    conversations = load_locomo(data_dir)
    embedder = embedder or default_embedder()
    # Token counts use the embedded model's tokenizer, also when the LM is elsewhere.
    model_name = lm_spec[len(LOCAL_PREFIX):] if lm_spec.startswith(LOCAL_PREFIX) else models.DEFAULT_MODEL
    count_tokens = token_counter(model_name)
    window = (models.get_model(model_name).context_window - PROMPT_RESERVE
              if full_context_tokens is None else full_context_tokens)
    lm = make_lm(lm_spec) if max_questions_per_conv > 0 else None

    recalls, predictions, contexts = [], [], []
    timing = defaultdict(float)
    lm_usage = defaultdict(lambda: {"calls": 0, "cached": 0, "tokens": 0})
    with tempfile.TemporaryDirectory(prefix="locomo_memory_") as tmp:
        for conv in conversations:
            start = time.perf_counter()
            memory = EpisodicMemory(Path(tmp) / conv.id, embedder)  # this conversation's user only
            memory.add(conv.turns)
            timing["ingest_s"] += time.perf_counter() - start
            rankers = {"memory": memory_ranker(memory), "dense": dense_ranker(memory), "bm25": bm25_ranker(conv)}
            window_ids = recent_window(conv, window, count_tokens) if window > 0 else []
            contexts.append({"conversation": conv.id, "turns": len(conv.turns), "window_turns": len(window_ids),
                             "tokens": sum(count_tokens(t.input + "\n") for t in conv.turns)})

            start = time.perf_counter()
            recalls += recall_rows(conv, rankers, ks, window_ids)
            timing["retrieval_s"] += time.perf_counter() - start

            qa_seconds = {}
            if lm is not None:
                selectors = {method: (lambda question, rank=rank: rank(question, qa_k))
                             for method, rank in rankers.items()}
                if window_ids:
                    selectors["full_context_window"] = lambda question: window_ids
                sample = stratified_sample(conv.questions, max_questions_per_conv)
                # One method at a time: the window method's questions then share their long prompt
                # prefix, which llama.cpp evaluates once.
                for method, select in selectors.items():
                    answered, meter = answer_questions(conv, method, select, sample, lm)
                    predictions += answered
                    qa_seconds[method] = meter.seconds
                    timing[f"qa_{method}_s"] += meter.seconds
                    for key in ("calls", "cached", "tokens"):
                        lm_usage[method][key] += getattr(meter, key)
            memory.close()
            print(f"conversation {conv.id}: {len(conv.turns)} turns, {len(conv.questions)} questions"
                  + "".join(f", {method} QA {s:.0f} s" for method, s in qa_seconds.items()), flush=True)

    results = {
        "lm": lm_spec if lm else None, "qa_k": qa_k, "ks": list(ks), "window_tokens": window,
        "data": {
            "conversations": len(conversations),
            "turns": sum(len(c.turns) for c in conversations),
            "questions": sum(len(c.questions) for c in conversations),
            "questions_without_evidence": sum(not q.evidence for c in conversations for q in c.questions),
            "unresolved_evidence": [list(u) for c in conversations for u in c.unresolved_evidence],
        },
        "contexts": contexts,
        "recall": mean_by_category(recalls),
        "qa_f1": mean_by_category([(p["method"], p["category"], p["score"]) for p in predictions]),
        "lm_usage": dict(lm_usage),
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
        "predictions": predictions,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(markdown(results, model_name))
    plot_recall(results, out_dir / "recall_at_k.png")
    return results


# ---------------------------------------------------------------- reporting

def _category_table(title: str, rows: dict[str, dict], note: str = "") -> list[str]:
    names = list(CATEGORIES.values()) + ["all"]
    lines = [title, "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, by_category in rows.items():
        cells = [f"{by_category[n]['mean']:.3f} ({by_category[n]['n']})" if n in by_category else "-" for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + (["", note] if note else []) + [""]


def markdown(r: dict, model_name: str) -> str:
    d, t = r["data"], r["timing_s"]
    budget = models.get_model(model_name).context_window - PROMPT_RESERVE
    tokens = [c["tokens"] for c in r["contexts"]]
    lines = [
        f"LoCoMo: {d['conversations']} conversations, {d['turns']} turns, {d['questions']} questions "
        f"({d['questions_without_evidence']} without evidence, left out of recall; "
        f"{len(d['unresolved_evidence'])} evidence ids naming no turn: {d['unresolved_evidence']}).",
        "",
        *_category_table("Recall of the evidence turns (mean over questions, n in brackets):", r["recall"],
                         "`full_context_window`: share of the evidence inside the latest turns that fit "
                         f"{r['window_tokens']} tokens (independent of k)." if r["window_tokens"] else ""),
        f"Whole conversations: {min(tokens):,} to {max(tokens):,} tokens (median {int(np.median(tokens)):,}, "
        f"{model_name} tokenizer); {sum(n <= budget for n in tokens)} of {len(tokens)} fit in {budget:,} tokens "
        f"(its context window less {PROMPT_RESERVE} for the prompt and answer)."
        + (" The full-context baseline therefore sees only the latest turns that fit: "
           f"{', '.join(str(c['window_turns']) for c in r['contexts'])} turns of "
           f"{', '.join(str(c['turns']) for c in r['contexts'])}." if r["window_tokens"] else ""),
        "",
    ]
    if r["qa_f1"]:
        lines += _category_table(
            f"QA with {r['lm']} (memory, bm25: the top {r['qa_k']} turns as context; full_context_window: the "
            "latest turns that fit): LoCoMo token F1 by category (adversarial: share of abstentions), n in brackets:",
            r["qa_f1"],
            "Tokens are not stemmed (the official scorer stems with NLTK's Porter stemmer).")
        lines += ["| method | LM calls | answered from DSPy's cache | tokens | seconds | s per LM call |",
                  "|---|---:|---:|---:|---:|---:|"]
        for method, usage in r["lm_usage"].items():
            seconds = t[f"qa_{method}_s"]
            per_call = f"{seconds / usage['calls']:.1f}" if usage["calls"] else "-"
            lines.append(f"| {method} | {usage['calls']} | {usage['cached']} | {usage['tokens']:,} | {seconds} "
                         f"| {per_call} |")
        lines.append("")
    lines.append(f"Time: ingest (embedding + memory) {t['ingest_s']} s, "
                 f"retrieval for all questions {t['retrieval_s']} s.")
    return "\n".join(lines) + "\n"


def plot_recall(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {"memory": "episodic memory (hybrid)", "dense": "embeddings only (FAISS, MiniLM)", "bm25": "BM25"}
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = {m: label for m, label in methods.items() if f"{m}@{r['ks'][0]}" in r["recall"]}
    width = 0.8 / len(methods)
    for i, (method, label) in enumerate(methods.items()):
        values = [r["recall"][f"{method}@{k}"]["all"]["mean"] for k in r["ks"]]
        ax.bar(np.arange(len(r["ks"])) + i * width, values, width, label=label)
    if "full_context_window" in r["recall"]:
        ax.axhline(r["recall"]["full_context_window"]["all"]["mean"], color="gray", linestyle="--",
                   label=f"latest {r['window_tokens']:,} tokens")
    ax.set_xticks(np.arange(len(r["ks"])) + width * (len(methods) - 1) / 2, [f"k={k}" for k in r["ks"]])
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall of evidence turns")
    ax.set_title("LoCoMo retrieval recall@k (all questions with evidence)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="LoCoMo: retrieval recall@k and QA F1 by question category.")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, recall_at_k.png")
    parser.add_argument("--data", type=Path, default=DEFAULT_LOCOMO_DIR, help="folder of LoCoMo *.json files")
    parser.add_argument("--lm", default=DEFAULT_LM, help="local/<embedded model> or a DSPy model string")
    parser.add_argument("--qa-per-conversation", type=int, default=10,
                        help="questions answered per conversation, stratified by category (0: retrieval only)")
    parser.add_argument("--qa-k", type=int, default=10, help="retrieved turns the answerer sees")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--full-context-tokens", type=int, default=None,
                        help="window of the full-context baseline (default: context window less "
                             f"{PROMPT_RESERVE}; 0: skip it)")
    args = parser.parse_args(argv)
    results = run_locomo(args.out, args.lm, args.qa_per_conversation, tuple(args.ks), args.qa_k,
                         args.full_context_tokens, args.data)
    print((args.out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
