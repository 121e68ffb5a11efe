"""Retrieval benchmark: how well searching a user's memory finds the past interactions that tell
their answer, measured on their own history, without an LM.

    python -m personaagent.experiments.bench_retrieval --data ../shared/data/lamp/LaMP-2N-huffpost
        [--users 8] [--items 40]

For each of the first `--users` users, each of their last `--items` replayable interactions is
searched for as of its own time (memory shows only what came before it), and the majority label
of the k records found is its guess (the `search_memory` evidence PersonaAgent weighs). Rows: the
query (the whole question, or its subject: the item without the task's wording, `TaskSpec.subject`)
by search (hybrid, embedding only, full text only), beside the user's majority label as of then.
Results go to `--out` (experiments/results/retrieval) as <set>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from ..data.loaders import load
from ..optimizers.pipeline import examples
from ..program.memory import EpisodicMemory
from ..program.store import UserStore

RESULTS = Path(__file__).parent / "results" / "retrieval"
SEARCHES = {
    "hybrid": lambda memory, query, k: memory.search(query, k),
    "embedding": lambda memory, query, k: memory.search_vector(memory.embedder.embed([query])[0], k),
    "full text": lambda memory, query, k: memory.search_text(query, k),
}


def majority(records) -> str | None:
    found = Counter(r.output for r in records if r.output).most_common(1)
    return found[0][0] if found else None


def measure(memory: EpisodicMemory, queries: dict[str, str], gold: str, k: int) -> dict[str, bool]:
    """Whether each (query, search) guesses the user's real answer, and their majority label."""
    hits = {f"{name} / {search}": majority(run(memory, query, k)) == gold
            for name, query in queries.items() for search, run in SEARCHES.items()}
    hits["user's majority label"] = majority(memory.all()) == gold
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a LaMP-format folder")
    parser.add_argument("--users", type=int, default=8, help="the first N users of the file")
    parser.add_argument("--items", type=int, default=40, help="each user's latest N replayable interactions")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--store", help="a store whose users' memories are already built (else a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data = load(args.data).select(args.users)
    task = data.task
    hits: Counter = Counter()
    n = 0
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
        store = UserStore(args.store or tmp)
        for user in data.users.values():
            memory = store.memory(user.user_id)
            memory.add(user.memories)  # records already there are skipped
            for example in examples(user)[-args.items:]:
                with memory.as_of(example.as_of):
                    queries = {"whole question": example.question, "subject": task.subject(example.question)}
                    hits.update(measure(memory, queries, example.answer, args.k))
                n += 1
            print(f"{user.user_id}: {n} interactions so far", flush=True)
        store.close()
    rows = [{"guess": name, "accuracy": round(hits[name] / n, 3)} for name in sorted(hits, key=lambda x: -hits[x])]
    table = [f"{task.name}: majority label of the {args.k} records found, on the last {args.items} history "
             f"interactions of the first {len(data.users)} users ({n} interactions)", "",
             "| query / search | accuracy |", "|---|---|"] + [f"| {r['guess']} | {r['accuracy']:.3f} |" for r in rows]
    print("\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    name = Path(args.data).name
    (args.out / f"{name}.json").write_text(json.dumps(
        {"task": task.name, "users": len(data.users), "interactions": n, "k": args.k, "rows": rows,
         "command": "python -m personaagent.experiments.bench_retrieval " + " ".join(argv or sys.argv[1:])}, indent=1))
    (args.out / f"{name}.md").write_text("\n".join(table) + "\n")
    _plot(rows, args.out / f"{name}.png", table[0])
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    ax.barh([r["guess"] for r in rows][::-1], [r["accuracy"] for r in rows][::-1], color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy of the guess")
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
