"""The embedders side by side (program/embedder.py): speed, ingest into a user's memory, and what
each costs retrieval.

    python -m personaagent.experiments.bench_embedder [--embedders minilm model2vec] [--conversations 8]
        [--lamp ../shared/data/lamp/LaMP-2N-huffpost ...] [--users 8] [--items 40]

Per embedder, on LoCoMo turns as texts:
- texts/s embedding one text per call (what a request does) and 64 per call, in wall time and in
  CPU time per text (other processes on the machine inflate wall times, not CPU time);
- ingest: interactions/s added to a new EpisodicMemory in calls of 1 and of 256 (embedding,
  SQLite and FAISS: the memory's whole add path);
- LoCoMo recall@10 of the evidence turns (experiments/locomo.py) for the memory's hybrid search
  and its embedding search alone, over the first `--conversations` conversations;
- for each `--lamp` set, bench_retrieval's accuracy of the majority label of the k records found,
  querying with the item's subject, by hybrid and by embedding search.

Torch runs PERSONAAGENT_THREADS threads (default: all cores), FAISS one. Results go to
experiments/results/embedder/<cpu tag>.json (the tag names the CPU's instruction sets, as the
engine's wheel does). Run it alone on the machine for the numbers that count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from ..data.loaders import load
from ..data.locomo import evidence_recall, load_locomo
from ..program.embedder import EMBEDDERS, Embedder
from ..program.memory import EpisodicMemory
from ..program.native_build import RELEVANT_FLAGS, build_tag, cpu_flags, enabled_options
from ..optimizers.pipeline import examples
from .bench_retrieval import SEARCHES, majority
from .locomo import DEFAULT_LOCOMO_DIR

RESULTS = Path(__file__).parent / "results" / "embedder"
K = 10


def texts_per_second(embedder: Embedder, texts: list[str], batch: int) -> tuple[float, float]:
    """(texts/s in wall time, CPU ms per text) embedding `texts` `batch` at a time."""
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(texts), batch):
        embedder.embed(texts[start:start + batch])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(texts) / wall, 1000 * cpu / len(texts)


def ingest_rate(embedder: Embedder, interactions: list, batch: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench_embedder_") as tmp:
        memory = EpisodicMemory(Path(tmp), embedder)
        start = time.perf_counter()
        for i in range(0, len(interactions), batch):
            memory.add(interactions[i:i + batch])
        rate = len(interactions) / (time.perf_counter() - start)
        memory.close()
    return rate


def locomo_recall(embedder: Embedder, conversations: list) -> dict[str, float]:
    """Mean recall@K of the evidence turns, hybrid search and embedding search alone."""
    found = {"hybrid": [], "embedding": []}
    with tempfile.TemporaryDirectory(prefix="bench_embedder_") as tmp:
        for conv in conversations:
            memory = EpisodicMemory(Path(tmp) / conv.id, embedder)
            memory.add(conv.turns)
            for q in conv.questions:
                if q.evidence:
                    for search in found:
                        ranked = [r.metadata["dia_id"] for r in SEARCHES[search](memory, q.question, K)]
                        found[search].append(evidence_recall(ranked, q.evidence, K))
            memory.close()
    return {search: round(float(np.mean(values)), 4) for search, values in found.items()}


def lamp_accuracy(embedder: Embedder, data_dir: str, users: int, items: int, k: int = 4) -> dict[str, float]:
    """bench_retrieval's guess (the majority label of the k records found for the item's subject)."""
    data = load(data_dir).select(users)
    hits = {"hybrid": 0, "embedding": 0}
    n = 0
    with tempfile.TemporaryDirectory(prefix="bench_embedder_") as tmp:
        for user in data.users.values():
            memory = EpisodicMemory(Path(tmp) / user.user_id, embedder)
            memory.add(user.memories)
            for example in examples(user)[-items:]:
                with memory.as_of(example.as_of):
                    subject = data.task.subject(example.question)
                    for search in hits:
                        hits[search] += majority(SEARCHES[search](memory, subject, k)) == example.answer
                n += 1
            memory.close()
    return {search: round(count / max(n, 1), 4) for search, count in hits.items()} | {"interactions": n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedders", nargs="+", choices=list(EMBEDDERS), default=list(EMBEDDERS))
    parser.add_argument("--texts", type=int, default=2048, help="LoCoMo turns timed per batch size")
    parser.add_argument("--conversations", type=int, default=8, help="LoCoMo conversations for recall (0: none)")
    parser.add_argument("--lamp", nargs="*", default=[], help="LaMP folders for bench_retrieval's accuracy")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--data", default=str(DEFAULT_LOCOMO_DIR), help="the LoCoMo folder")
    args = parser.parse_args(argv)
    import torch

    threads = int(os.environ.get("PERSONAAGENT_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(1)  # single queries: OpenMP start-up costs more than the search
    conversations = load_locomo(args.data)
    turns = [t for c in conversations for t in c.turns][:args.texts]
    texts = [t.input for t in turns]
    flags = cpu_flags()
    tag = build_tag(enabled_options(flags))
    print(f"CPU {tag}; flags: {' '.join(f for f in RELEVANT_FLAGS if f in flags)}; {os.cpu_count()} cores, "
          f"torch {threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)

    rows = []
    for kind in args.embedders:
        started = time.perf_counter()
        embedder = EMBEDDERS[kind]()
        row = {"embedder": kind, "name": embedder.name, "dim": embedder.dim,
               "load_s": round(time.perf_counter() - started, 2)}
        embedder.embed(texts[:8])  # warm-up
        for batch in (1, 64):
            rate, cpu_ms = texts_per_second(embedder, texts, batch)
            row |= {f"texts_per_s_batch_{batch}": round(rate, 1), f"cpu_ms_per_text_batch_{batch}": round(cpu_ms, 3)}
        for batch in (1, 256):
            row[f"ingest_per_s_batch_{batch}"] = round(ingest_rate(embedder, turns, batch), 1)
        if args.conversations:
            row["locomo_recall_at_10"] = locomo_recall(embedder, conversations[:args.conversations])
        for data_dir in args.lamp:
            row[f"lamp_{Path(data_dir).name}"] = lamp_accuracy(embedder, data_dir, args.users, args.items)
        rows.append(row)
        print(json.dumps(row), flush=True)

    quality = [key for key in rows[0] if key.startswith(("locomo", "lamp"))]
    header = ["embedder", "dim", "texts/s b1", "texts/s b64", "CPU ms/text b1", "ingest/s b1", "ingest/s b256",
              *[f"{key} {search}" for key in quality for search in ("hybrid", "embedding")]]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(v) for v in [
            r["embedder"], r["dim"], r["texts_per_s_batch_1"], r["texts_per_s_batch_64"], r["cpu_ms_per_text_batch_1"],
            r["ingest_per_s_batch_1"], r["ingest_per_s_batch_256"],
            *[r[key][search] for key in quality for search in ("hybrid", "embedding")]]) + " |"
        for r in rows]
    print("\n".join(table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"cpu_tag": tag, "cpu_flags": " ".join(f for f in RELEVANT_FLAGS if f in flags),
              "cores": os.cpu_count(), "torch_threads": threads, "load_average_after": round(os.getloadavg()[0], 2),
              "texts": len(texts), "conversations": args.conversations, "rows": rows,
              "command": "python -m personaagent.experiments.bench_embedder " + " ".join(argv or sys.argv[1:])}
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
