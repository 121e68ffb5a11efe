"""Scale benchmark of the offline compile: users per hour on this machine's processes and on a local
Ray cluster with 1 and 2 workers, on the fake LM so that the framework's own cost shows (ingest,
embedding, FAISS, SQLite, the alignment's bookkeeping, saving, MLflow), and a projection to 1M users.

    python -m personaagent.experiments.bench_scale [--users 24] [--compile-seconds 150]

Users are the bundled LaMP-3 sample users, copied under new ids. `--compile-seconds` is a measured
compile time per user with the embedded model (BENCHMARKS.md, personalization), for the projection.
Results go to experiments/results/scale/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..data import SAMPLE_DIR, load
from ..data.loaders import TaskData
from ..optimizers.compile import compile_users
from ..optimizers.pipeline import CompileConfig
from ..optimizers.engines import LocalEngine, RayEngine
from ..program.lm import FAKE_LM

RESULTS = Path(__file__).parent / "results" / "scale"
USERS_AT_SCALE = 1_000_000
CORES_PER_WORKER = 2  # what one llama.cpp worker uses well here (design notes)


def copies(data: TaskData, n: int) -> TaskData:
    """`n` users made from the sample's, each under a new id."""
    originals = list(data.users.values())
    users = {f"{originals[i % len(originals)].user_id}-{i}":
             replace(originals[i % len(originals)], user_id=f"{originals[i % len(originals)].user_id}-{i}")
             for i in range(n)}
    return replace(data, users=users)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--compile-seconds", type=float, default=150.0,
                        help="measured compile seconds per user on the embedded 1.5B model, for the projection")
    args = parser.parse_args(argv)
    data = copies(load(SAMPLE_DIR / "LaMP-3-amazon"), args.users)
    config = CompileConfig(lm=FAKE_LM)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for name, engine in [("local, 1 process", LocalEngine(1)), ("ray, 1 worker", RayEngine(workers=1)),
                             ("ray, 2 workers", RayEngine(workers=2))]:
            started = time.perf_counter()
            report = compile_users(data, Path(tmp) / name.replace(" ", "_").replace(",", ""), config,
                                   tracking_uri=f"sqlite:///{tmp}/mlflow.db", progress=False, engine=engine)
            seconds = time.perf_counter() - started
            if isinstance(engine, RayEngine):
                import ray

                ray.shutdown()
            rows.append({"engine": name, "users": args.users, "compiled": report.counts["compiled"],
                         "seconds": round(seconds, 1), "users_per_hour": round(args.users / seconds * 3600)})
            print(rows[-1], flush=True)
    one, two = rows[1]["seconds"], rows[2]["seconds"]
    overhead_s = rows[0]["seconds"] / args.users  # per user, one process, no LM time
    projection = {
        "embedded_1.5B_core_hours": round(USERS_AT_SCALE * args.compile_seconds * CORES_PER_WORKER / 3600),
        "framework_only_core_hours": round(USERS_AT_SCALE * overhead_s / 3600),
        "framework_seconds_per_user": round(overhead_s, 2),
    }
    table = ["| engine | users | compiled | seconds | users/hour |", "|---|---|---|---|---|"]
    table += [f"| {r['engine']} | {r['users']} | {r['compiled']} | {r['seconds']} | {r['users_per_hour']} |"
              for r in rows]
    table += ["", f"Ray speed-up, 2 workers over 1: {one / two:.2f}x",
              f"1M users, embedded 1.5B at {args.compile_seconds:g} s/user on {CORES_PER_WORKER} cores: "
              f"{projection['embedded_1.5B_core_hours']:,} core-hours",
              f"1M users, framework alone (a served LM's time not counted): "
              f"{projection['framework_only_core_hours']:,} "
              f"core-hours ({projection['framework_seconds_per_user']} s/user)"]
    print("\n".join(table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps({"rows": rows, "speedup_2_over_1": round(one / two, 2),
                                                       "projection": projection,
                                                       "command": "python -m personaagent.experiments.bench_scale "
                                                                  + " ".join(argv or sys.argv[1:])}, indent=1))
    (RESULTS / "results.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
