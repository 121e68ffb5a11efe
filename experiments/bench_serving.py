"""Load benchmark of the HTTP service, on loopback: latency and throughput of answer, OpenAI-style
chat and append, and the time to load a compiled persona.

    python -m personaagent.experiments.bench_serving --lm fake
    python -m personaagent.experiments.bench_serving --lm local/qwen2.5-coder-1.5b --answers 20

Users come from a LaMP file: their history goes to memory and their program file is written
directly (the initial persona, no LM), so the benchmark needs no compile. The server runs in this
process on 127.0.0.1 with a real socket; the client is httpx. Sequential requests also give the
time outside LM calls (latency minus the time inside them) and the process CPU per request
(client, server and an in-process LM together), which other programs on the machine do not
inflate. Each phase stops sending after its time budget. Results go to experiments/results/serving/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import httpx
import numpy as np
from dspy.utils.callback import BaseCallback

from ..data.loaders import load
from ..data.tasks import task_to_dict
from ..app.http import create_app, running
from ..program.lm import make_lm
from ..app.service import PersonaService
from ..program.persona import PersonaVersion
from ..program.store import ProgramState, UserStore
from ..program.testing import FakeEngine

RESULTS = Path(__file__).parent / "results" / "serving"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "LaMP-3-amazon"
TOKEN = "bench"


class LMTimer(BaseCallback):
    """Adds up the seconds spent inside LM calls."""

    def __init__(self):
        self.seconds = 0.0
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        self._started[call_id] = time.perf_counter()

    def on_lm_end(self, call_id, outputs, exception=None):
        with self._lock:
            self.seconds += time.perf_counter() - self._started.pop(call_id)


def fake_lm(timer: LMTimer) -> dspy.LM:
    """The tests' fake LM (instant answers, every tool chosen): what remains is the service's own time."""
    engine = FakeEngine({"answer": "5", "tools": ["search_memory", "read_profile", "answer_habits"],
                         "memory_query": "sound quality and price"})
    return dspy.LM("fake/model", engine=engine, cache=False, callbacks=[timer])


def make_store(data_path: str, n_users: int, root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Users with memory and a program file; returns their ids and (user, question) pairs."""
    data = load(data_path).select(n_users)
    store = UserStore(root)
    for user_id, user in data.users.items():
        memory = store.memory(user_id)
        memory.add(user.memories)
        program = store.build(user_id, data.task)
        store.save_state(ProgramState(user_id, task_to_dict(data.task), "bench", [
            PersonaVersion(1, program.persona, program.instructions_by_predictor(), note="initial persona")]))
    store.close()
    questions = [(u, ex.question) for u, user in data.users.items() for ex in user.questions]
    return list(data.users), questions


def stats(wall: list[float], seconds: float, cpu: list[float] = ()) -> dict:
    """Percentiles in ms; `cpu` (process CPU per request) grows far less than latency when other
    programs share the cores: it is close to what the latency would be on an idle machine."""
    out = {"n": len(wall), **_percentiles("", wall), "throughput_per_s": round(len(wall) / seconds, 2)}
    return {**out, **_percentiles("cpu_", cpu)} if cpu else out


def _percentiles(prefix: str, seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {f"{prefix}p50_ms": round(float(np.percentile(ms, 50)), 2),
            f"{prefix}p95_ms": round(float(np.percentile(ms, 95)), 2)}


def timed(call) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def load_times(service: PersonaService, users: list[str]) -> dict:
    """Cold load (program file, memory files, program build), reload after a new version, cache hit."""
    def measure() -> dict:
        wall, cpu = zip(*[timed(lambda: service.program(u)) for u in users])
        return stats(wall, sum(wall), cpu)

    cold, hit = measure(), measure()
    store = service.store
    for user in users:  # what a compile or an alignment does: a new version, written atomically
        state = store.load_state(user)
        state.versions.append(PersonaVersion(2, state.current.persona, state.current.instructions, note="bench"))
        store.save_state(state)
    return {"cold_load": cold, "reload_new_version": measure(), "cache_hit": hit}


def run_phase(client: httpx.Client, requests: list[tuple[str, dict]], concurrency: int, budget_s: float,
              timer: LMTimer) -> dict:
    """POST each (path, body) with `concurrency` requests in flight, until done or out of time.
    Sequential phases also give each request's CPU and its time outside LM calls."""
    wall, cpu, outside_lm, failures = [], [], [], 0
    deadline = time.perf_counter() + budget_s

    def send(request: tuple[str, dict]) -> None:
        nonlocal failures
        if time.perf_counter() > deadline:
            return
        lm_before = timer.seconds
        response = []
        elapsed, used = timed(lambda: response.append(client.post(request[0], json=request[1])))
        if response[0].status_code >= 300:
            failures += 1
            return
        wall.append(elapsed)
        if concurrency == 1:
            cpu.append(used)
            outside_lm.append(elapsed - (timer.seconds - lm_before))

    started, lm_started = time.perf_counter(), timer.seconds
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, requests))
    result = {**stats(wall, time.perf_counter() - started, cpu), "concurrency": concurrency, "failures": failures}
    if concurrency == 1 and timer.seconds > lm_started:
        result["outside_lm"] = stats(outside_lm, sum(wall))
        result["lm_ms_per_request"] = round((sum(wall) - sum(outside_lm)) / len(wall) * 1000, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SAMPLE),
                        help="LaMP folder or file the users come from (default: the sample)")
    parser.add_argument("--lm", default="fake", help="'fake' (instant, the tests' fake LM) or an --lm string")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--answers", type=int, default=300, help="answers per answer phase")
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=90, help="time budget per phase")
    args = parser.parse_args(argv)

    # Other work on the machine skews the numbers: the load before the run is recorded with them.
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "load_average_1min": os.getloadavg()[0]}
    timer = LMTimer()
    lm = fake_lm(timer) if args.lm == "fake" else make_lm(args.lm, callbacks=[timer])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        users, questions = make_store(args.data, args.users, root)
        service = PersonaService(root, lm, lm_workers=1)
        loading = load_times(service, users)
        # Distinct requests, the concurrent phases' apart from the sequential ones': nothing the service
        # or the engine keeps from one request (a prompt state, a query vector) serves another.
        asked = [(u, f"{q} (asked {i})") for i, (u, q) in enumerate((questions * 2 * args.answers)[:2 * args.answers])]
        answers = [(f"/v1/users/{u}/answer", {"text": q}) for u, q in asked]
        chats = [("/v1/chat/completions", {"model": "persona", "user": u, "messages": [{"role": "user", "content": q}]})
                 for u, q in asked]
        appends = [(f"/v1/users/{users[i % len(users)]}/interactions",
                    {"input": f"review {i}: solid build, decent sound for the price", "output": str(i % 5 + 1)})
                   for i in range(2 * args.appends)]
        with running(create_app(service, TOKEN)) as url, \
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600,
                             limits=httpx.Limits(max_connections=args.concurrency)) as client:
            client.post(answers[-1][0], json=answers[-1][1])  # warm-up: first-call costs are not load
            # Answers, then the OpenAI-compatible chat (persona as system prompt, a memory search, the turn
            # remembered), then appends: each one at a time, then from concurrent clients.
            phases = {}
            for name, requests in [("answer", answers), ("chat", chats), ("append", appends)]:
                half = len(requests) // 2
                sequential = run_phase(client, requests[:half], 1, args.seconds, timer)
                phases[f"{name}, sequential"] = sequential
                # Queued requests finish after the budget: send only as many as one worker gets through in it.
                affordable = requests[half:][:max(1, int(args.seconds * 1000 / sequential["p50_ms"]))]
                concurrency = min(args.concurrency, len(affordable))
                phases[f"{name}, {concurrency} concurrent"] = concurrent_phase(url, affordable, concurrency,
                                                                               args.seconds)
        service.close()

    result = {"lm": lm.model, "users": len(users), "lm_workers": service.lm_workers, "loading": loading,
              "phases": phases, "machine": machine,
              "command": "python -m personaagent.experiments.bench_serving " + " ".join(argv or sys.argv[1:]),
              "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{lm.model.replace('/', '_')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten to {out}")
    return 0


def concurrent_phase(url: str, requests: list[tuple[str, dict]], concurrency: int, budget_s: float) -> dict:
    """`run_phase` from clients in another process, as real clients are: in the server's process
    their Python would take turns with the server's on one interpreter lock, and their time would
    count as the server's."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_client_phase, (url, requests, concurrency, budget_s))


def _client_phase(url: str, requests: list[tuple[str, dict]], concurrency: int, budget_s: float) -> dict:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600,
                      limits=httpx.Limits(max_connections=concurrency)) as client:
        client.get("/healthz")  # warm-up: the client's first-call costs
        return run_phase(client, requests, concurrency, budget_s, LMTimer())


def table(result: dict) -> str:
    machine = result["machine"]
    lines = [f"### Serving, LM {result['lm']} ({result['users']} users, {machine['cpus']} CPUs, "
             f"load average {machine['load_average_1min']:.1f} before the run)", "",
             "| what | n | p50 ms | p95 ms | CPU p50 ms | CPU p95 ms | per second |", "|---|---|---|---|---|---|---|"]
    rows = [(f"load persona: {k.replace('_', ' ')}", v) for k, v in result["loading"].items()]
    for name, phase in result["phases"].items():
        rows.append((name, phase))
        if "outside_lm" in phase:
            rows.append((f"{name}: all but LM time (LM: {phase['lm_ms_per_request']} ms per answer)",
                         phase["outside_lm"]))
    lines += [f"| {name} | {s['n']} | {s['p50_ms']} | {s['p95_ms']} | {s.get('cpu_p50_ms', '-')} | "
              f"{s.get('cpu_p95_ms', '-')} | {s['throughput_per_s']} |" for name, s in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
