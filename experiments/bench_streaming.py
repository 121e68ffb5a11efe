"""Streamed chat on the embedded model, over HTTP on loopback: when the first token and the last token
of a reply reach the caller, beside the same turn asked without streaming (the whole reply at once).

    python -m personaagent.experiments.bench_streaming [--model qwen2.5-coder-1.5b] [--turns 8] [--max-tokens 200]

Users come from the LaMP-3 sample as in `bench_serving` (memory and an initial persona, no compile).
An opening turn asks for a few sentences about one of the user's reviews, once streamed and once not
(in alternating order, as each turn warms the engine's prompt cache for the next). Then each user's
conversation goes on with short follow-ups, the users taking turns: a follow-up's prompt extends its
conversation's previous turn and reply, whose evaluated state the engine resumes from (it keeps
generated prompts' states, bounded in bytes), so only the new message is evaluated before the first
token. Run it alone on the machine (llama.cpp slows about tenfold when its threads outnumber free cores). Results go to
experiments/results/streaming/<build tag>.json, one file per CPU kind (see `bench_engine`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from ..app.http import create_app, running
from ..app.service import PersonaService
from ..program.lm import LOCAL_PREFIX, make_lm
from ..program.models import DEFAULT_MODEL
from ..program.native_build import installed_build
from .bench_serving import SAMPLE, TOKEN, make_store

RESULTS = Path(__file__).parent / "results" / "streaming"


FOLLOW_UPS = ("Why do you think so?", "Say it in one sentence.", "What would they buy next?")


def streamed(client: httpx.Client, body: dict, keep_reply: bool = False):
    """Seconds to the first and to the last piece of the reply, and the number of pieces (about a
    token each); with `keep_reply`, the reply too."""
    started, arrivals, pieces = time.perf_counter(), [], []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and (piece := json.loads(line[6:])["choices"][0]["delta"].get("content")):
                arrivals.append(time.perf_counter() - started)
                pieces.append(piece)
    timing = arrivals[0], arrivals[-1], len(arrivals)
    return (*timing, "".join(pieces)) if keep_reply else timing


def whole(client: httpx.Client, body: dict) -> float:
    started = time.perf_counter()
    client.post("/v1/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - started


def percentiles(seconds: list[float]) -> dict:
    return {"p50_s": round(float(np.percentile(seconds, 50)), 3), "p95_s": round(float(np.percentile(seconds, 95)), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--turns", type=int, default=8, help="chat turns, each asked streamed and not")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--follow-ups", type=int, default=3, help="follow-up turns per user's conversation")
    args = parser.parse_args(argv)

    turns, replies, follow_ups = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        users, questions = make_store(str(SAMPLE), args.users, Path(tmp) / "store")
        bodies = [{"model": "persona", "user": user, "messages": [
            {"role": "user", "content": f"In a few sentences, what does this reviewer like and dislike? {question}"}]}
            for user, question in (questions * args.turns)[:args.turns]]
        service = PersonaService(Path(tmp) / "store", make_lm(LOCAL_PREFIX + args.model, max_tokens=args.max_tokens))
        with running(create_app(service, TOKEN)) as url, httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as client:
            streamed(client, bodies[0])  # warm-up: the first call's costs are not a turn's
            for i, body in enumerate(bodies):
                if i % 2:
                    replies.append(whole(client, body))
                turns.append(streamed(client, body))
                if not i % 2:
                    replies.append(whole(client, body))
            conversations = {body["user"]: body for body in bodies[:args.users]}
            for turn in range(args.follow_ups + 1):
                for user, body in conversations.items():
                    if turn:
                        body["messages"].append({"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]})
                    first_s, last_s, _, reply = streamed(client, body, keep_reply=True)
                    if turn > 1:  # the first follow-up may find its opening's state evicted by the others'
                        follow_ups.append((first_s, last_s))
                    body["messages"].append({"role": "assistant", "content": reply})
        service.close()
    first, last, pieces = zip(*turns)
    follow_first, follow_last = zip(*follow_ups)

    row = {"model": args.model, "threads": int(os.environ.get("PERSONAAGENT_THREADS") or os.cpu_count() or 1),
           "build": installed_build().get("tag", ""), "turns": args.turns, "max_tokens": args.max_tokens,
           "pieces_p50": int(np.percentile(pieces, 50)),
           "streamed_first_token": percentiles(first), "streamed_last_token": percentiles(last),
           "not_streamed_reply": percentiles(replies), "follow_ups": len(follow_ups),
           "follow_up_first_token": percentiles(follow_first), "follow_up_last_token": percentiles(follow_last),
           "command": "python -m personaagent.experiments.bench_streaming " + " ".join(argv or sys.argv[1:])}
    print(f"### Streamed chat, {args.model}, {row['threads']} threads, {args.turns} turns of up to "
          f"{args.max_tokens} tokens (p50 {row['pieces_p50']} pieces)\n")
    print("| reply reaches the caller | p50 s | p95 s |\n|---|---|---|")
    for name, key in (("opening turn, streamed: first token", "streamed_first_token"),
                      ("opening turn, streamed: last token", "streamed_last_token"),
                      ("opening turn, not streamed: whole reply", "not_streamed_reply"),
                      (f"follow-up, prefix resumed ({len(follow_ups)}): first token", "follow_up_first_token"),
                      ("follow-up, prefix resumed: last token", "follow_up_last_token")):
        print(f"| {name} | {row[key]['p50_s']} | {row[key]['p95_s']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{row['build'] or 'unrecorded-build'}.json"
    out.write_text(json.dumps(row, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
