"""Reliability benchmark: what a demanding operator would try, with the figures BENCHMARKS.md reports.

    python -m personaagent.experiments.bench_reliability [--fuzz 40] [--rounds 5]

Real servers, stores, SQLite and MLflow; only the LM is fake (`program.testing`), so the figures
are about the service and the store, not the model:
- fuzzing: schemathesis against the real server's OpenAPI description; requests, 5xx, and
  responses that break the description;
- appends under kill -9: a client appends one interaction at a time to a server process that is
  killed at a random moment; acknowledged appends against those found in the store afterwards;
- compiles under kill -9: a compile process killed at random moments; users whose persona file no
  longer loads, or who lost a version they had;
- forgetting: after `forget`, bytes of the deleted user's text found in everything the project wrote;
- shutdown: seconds from SIGTERM to exit with answers queued behind a slow LM.
Results go to experiments/results/reliability/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ..data import SAMPLE_DIR

RESULTS = Path(__file__).parent / "results" / "reliability"
TOKEN = "bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVER = textwrap.dedent("""
    import time, dspy
    from personaagent.app.http import serve
    from personaagent.program.testing import FakeEngine

    class Slow(FakeEngine):
        def complete(self, request):
            time.sleep({lm_seconds})
            return super().complete(request)

        def score(self, messages, continuations):
            time.sleep({lm_seconds})
            return super().score(messages, continuations)

    serve({store!r}, token={token!r}, port={port},
          lm=dspy.LM("local/fake", engine=Slow({{"answer": "4"}}), cache=False))
""")
COMPILE = textwrap.dedent("""
    from personaagent.data import load
    from personaagent.optimizers.compile import compile_users
    from personaagent.optimizers.pipeline import CompileConfig
    from personaagent.program.testing import fake_lm

    data = load({data!r})
    lm = fake_lm({{"summary": "Rates gear.", "gradient": "Rate 5.", "rules": ["rate 5"], "answer": "4"}})
    compile_users(data, {store!r}, CompileConfig(n_recent={n_recent}), tracking_uri={uri!r}, progress=False, lm=lm)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(store: Path, lm_seconds: float = 0.0) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    code = SERVER.format(store=str(store), token=TOKEN, port=port, lm_seconds=lm_seconds)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def fuzz(root: Path, per_operation: int) -> dict:
    import dspy
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    from ..app.http import create_app, running
    from ..app.service import PersonaService
    from ..program.testing import FakeEngine

    statuses: dict[int, int] = {}
    nonconforming = []
    service = PersonaService(root / "fuzz", dspy.LM("local/fake", engine=FakeEngine({"answer": "4"}), cache=False))
    with running(create_app(service, TOKEN)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        for operation in [result.ok() for result in schema.get_all_operations()]:
            @given(case=operation.as_strategy())
            @settings(max_examples=per_operation, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                response = case.call(headers=AUTH)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                try:
                    case.validate_response(response, excluded_checks=[positive_data_acceptance])
                except Exception as exc:  # noqa: BLE001 (recorded, the run goes on)
                    nonconforming.append(f"{operation.label}: {str(exc).splitlines()[0]}")

            check()
    service.close()
    return {"requests": sum(statuses.values()), "5xx": sum(n for s, n in statuses.items() if s >= 500),
            "statuses": dict(sorted(statuses.items())), "nonconforming": nonconforming}


def appends_under_kill(root: Path, rounds: int, rng: random.Random) -> dict:
    from ..program.store import UserStore

    store_dir = root / "appends"
    acknowledged: list[str] = []
    for round_ in range(rounds):
        server, url = _start_server(store_dir)
        stop = threading.Event()

        def append_until_stopped():
            with httpx.Client(base_url=url, headers=AUTH, timeout=10) as client:
                i = 0
                while not stop.is_set():
                    text = f"round {round_} append {i}"
                    try:
                        if client.post("/v1/users/ops/interactions",
                                       json={"input": text, "output": "5"}).status_code == 201:
                            acknowledged.append(text)
                    except httpx.HTTPError:
                        return  # the server is gone
                    i += 1

        writer = threading.Thread(target=append_until_stopped)
        writer.start()
        time.sleep(rng.uniform(0.5, 2.0))
        server.send_signal(signal.SIGKILL)
        server.wait()
        stop.set()
        writer.join()
    store = UserStore(store_dir)
    persisted = {r.input for r in store.memory("ops").all()}
    store.close()
    return {"rounds": rounds, "acknowledged": len(acknowledged), "persisted": sum(a in persisted for a in acknowledged),
            "lost": sum(a not in persisted for a in acknowledged)}


def compiles_under_kill(root: Path, rounds: int, rng: random.Random) -> dict:
    from ..program.store import UserStore

    store_dir, data = root / "compiles", SAMPLE_DIR / "LaMP-3-amazon"
    uri = f"sqlite:///{root / 'compiles.db'}"
    killed, lost = 0, 0
    for round_ in range(rounds):
        store = UserStore(store_dir, embedder=object())
        before = {u: len(store.load_state(u).versions) for u in store.users()}
        code = COMPILE.format(data=str(data), store=str(store_dir), uri=uri, n_recent=1 + round_ % 3)
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(8.0, 25.0))  # past start-up (imports, the embedder), into the users
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.wait()
        for user, versions in before.items():
            try:
                if len(store.load_state(user).versions) < versions:
                    lost += 1
            except Exception:  # noqa: BLE001 (a persona that no longer loads is lost)
                lost += 1
    return {"rounds": rounds, "killed": killed, "personas_lost": lost,
            "users_with_persona": len(UserStore(store_dir, embedder=object()).users())}


def forgetting(root: Path) -> dict:
    from ..data.loaders import load
    from ..optimizers.compile import compile_users
    from ..optimizers.pipeline import CompileConfig
    from ..app.cli import main
    from ..program.testing import fake_lm

    written, secrets = root / "written", {"keep": "OKAPI-TURPENTINE-9902", "forget": "ZEBRA-MARMALADE-4471"}
    written.mkdir()
    log = root / "log.jsonl"
    log.write_text("\n".join(json.dumps({"user_id": u, "timestamp": t, "input": f"review {t}: {s} held up",
                                         "output": "5"})
                             for u, s in secrets.items() for t in range(6)))
    uri = f"sqlite:///{written / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(written)  # MLflow's artifacts go under the working directory
    try:
        compile_users(load(log, "rating"), written / "store", CompileConfig(), tracking_uri=uri, progress=False,
                      lm=fake_lm({"summary": "Rates.", "answer": "5"}))
        main(["forget", "--store", str(written / "store"), "--user", "forget", "--tracking-uri", uri])
    finally:
        os.chdir(cwd)

    def found(secret: str) -> int:
        return sum(p.read_bytes().count(secret.encode()) for p in written.rglob("*") if p.is_file())

    return {"files_written": sum(p.is_file() for p in written.rglob("*")),
            "bytes_found_of_deleted_user": found(secrets["forget"]),
            "occurrences_of_kept_user": found(secrets["keep"])}


def shutdown_under_load(root: Path) -> dict:
    from ..program.store import UserStore

    store = UserStore(root / "shutdown", embedder=object())
    store.user_dir("ops").mkdir(parents=True)
    store.close()
    server, url = _start_server(root / "shutdown", lm_seconds=0.5)
    httpx.post(f"{url}/v1/users/ops/interactions", json={"input": "a review", "output": "5"}, headers=AUTH)
    pool = ThreadPoolExecutor(40)
    for i in range(40):
        pool.submit(lambda i=i: httpx.post(f"{url}/v1/users/ops/answer", json={"text": f"review {i}"}, headers=AUTH,
                                           timeout=60))
    time.sleep(2.0)
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    finally:
        server.kill()
    seconds = time.monotonic() - started
    pool.shutdown(wait=False, cancel_futures=True)
    return {"queued_answers": 40, "seconds_to_exit_after_sigterm": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=40, help="fuzzed requests per API operation")
    parser.add_argument("--rounds", type=int, default=5, help="kill -9 rounds, for appends and for compiles")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_reliability_") as tmp:
        root = Path(tmp)
        for name, run in [("fuzzing", lambda: fuzz(root, args.fuzz)),
                          ("appends_under_kill", lambda: appends_under_kill(root, args.rounds, rng)),
                          ("compiles_under_kill", lambda: compiles_under_kill(root, args.rounds, rng)),
                          ("forgetting", lambda: forgetting(root)),
                          ("shutdown", lambda: shutdown_under_load(root))]:
            started = time.perf_counter()
            results[name] = run()
            print(f"{name}: {results[name]} ({time.perf_counter() - started:.0f} s)", flush=True)
    fuzzing, appends, compiles = results["fuzzing"], results["appends_under_kill"], results["compiles_under_kill"]
    rows = [
        ("fuzzed requests (schemathesis)", fuzzing["requests"]),
        ("5xx responses", fuzzing["5xx"]),
        ("responses breaking the OpenAPI description", len(fuzzing["nonconforming"])),
        ("appends acknowledged under kill -9", appends["acknowledged"]),
        ("acknowledged appends persisted", appends["persisted"]),
        ("compiles killed (kill -9)", compiles["killed"]),
        ("personas lost", compiles["personas_lost"]),
        ("bytes of a deleted user found", results["forgetting"]["bytes_found_of_deleted_user"]),
        ("seconds from SIGTERM to exit, 40 answers queued", results["shutdown"]["seconds_to_exit_after_sigterm"]),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps({
        "results": results, "seed": args.seed,
        "command": "python -m personaagent.experiments.bench_reliability " + " ".join(argv or sys.argv[1:])},
        indent=1))
    (RESULTS / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
