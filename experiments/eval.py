"""Method-by-task evaluation: every method answers the same users' held-out questions.

Methods:
- `global_majority`: the most frequent answer over all chosen users' histories, ratings included (no LLM);
- `user_majority`: the user's most frequent past label, or their rounded mean rating (no LLM);
- `word_overlap` (tasks with candidates, LaMP-1): the candidate sharing more words with the author's
  past titles and citations, one more if they cited it before (no LLM);
- `none`, `icl`, `rag`, `membank`, `react`: the baselines, every method of `program.agent.STRATEGIES` that
  follows no persona;
- `persona_noalign`: PersonaAgent with its initial persona (the task's text, the default tools), not aligned;
- `persona`: PersonaAgent after test-time alignment (the paper's method);
- `persona_nopersona`, `persona_nomemory`, `persona_noaction`: the paper's ablations of the aligned
  program (`program.agent.ABLATIONS`), from the same compile;
- `gepa`: the same program with its instructions optimized per user by `dspy.GEPA`.

Every LM method decodes a closed-set answer the same way, from label likelihoods.

Users are the first N of the file (deterministic). Each (method, user) result is written as soon as
it exists, so a run can be resumed, and runs over different users or methods can share one output
directory: each writes its summary under its own `name` (`<name>.json`, `<name>.md`, `<name>.png`,
`<name>-alignment.png`; "results" by default) and logs one MLflow run per method. What a user's
compile and profile cost is kept beside the answers (`raw/_compile`, `raw/_profile`), so a resumed run,
or an ablation run before its compiled row, still counts it where a fresh run pays it. Each headline
metric comes with a 95% bootstrap interval over the users (each drawn with all of its questions),
and each method's difference to PersonaAgent with a paired one: they say how far a ranking can be
trusted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ..app.cli import add_engine, add_lm, add_settings, config_from, engine_from
from ..data.loaders import TaskData, UserData, load
from ..data.tasks import METRICS, TaskSpec
from ..optimizers import pipeline
from ..optimizers.compile import compile_users
from ..optimizers.engines import Engine
from ..optimizers.pipeline import CompileConfig
from ..optimizers.tracking import setup_mlflow
from ..program.agent import ABLATIONS, STRATEGIES
from ..program.lm import DEFAULT_LM, UsageMeter, make_lm, use_lm
from ..program.storage import write_json_atomic
from ..program.store import UserStore
from ..program.tools import author_history, candidate_scores

NON_LLM = ("global_majority", "user_majority", "word_overlap")
BASELINES = tuple(name for name, strategy in STRATEGIES.items() if not strategy.follows_persona)
UNKNOWN_COST = {"unknown": True}  # a profile written before the eval kept what profiles cost
COMPILED = {"persona_noalign": "unaligned", "persona": "persona", "gepa": "gepa"}  # method -> optimizer
ABLATED = {f"persona_{name}": name for name in ABLATIONS}  # method -> ablation of the aligned program
METHODS = NON_LLM + BASELINES + ("persona_noalign", "persona", *ABLATED, "gepa")
REFERENCE = "persona"  # every other method's difference to it gets an interval
BOOTSTRAP_ROUNDS = 2000


def _majority(task: TaskSpec, outputs: list[str], mean_rating: bool) -> str:
    if not outputs:
        return task.labels[0] if task.labels else ""
    if task.kind == "rating" and mean_rating:
        values = [float(o) for o in outputs if o.strip().lstrip("-").replace(".", "", 1).isdigit()]
        return str(round(sum(values) / len(values))) if values else Counter(outputs).most_common(1)[0][0]
    return Counter(outputs).most_common(1)[0][0]


def _word_overlap(question: str, user: UserData) -> str:
    scores = candidate_scores(question, author_history(user.memories))
    return max(scores, key=scores.get) if scores else ""


def _past_answers(task: TaskSpec, user: UserData) -> list[str]:
    """The user's past answers in the task's terms: replays carry the task's answer (a LaMP-1
    history item's own output is its reference list, its replay's output is a label)."""
    answers = [r.output for r in (user.replays or user.memories) if r.output]
    return [a for a in answers if a in task.labels] if task.labels else answers


def _compiled(method: str) -> str:
    """The compiled method whose program `method` answers with: an ablation's is PersonaAgent's."""
    return "persona" if method in ABLATED else method


class Evaluation:
    def __init__(self, data: TaskData, out: Path, lm_spec: str, config: CompileConfig, questions_per_user: int | None,
                 tracking_uri: str | None = None, engine: Engine | None = None):
        self.data, self.out, self.lm_spec, self.config = data, out, lm_spec, config
        self.questions_per_user = questions_per_user
        self.tracking_uri = tracking_uri
        self.engine = engine  # where the compiled methods' users are compiled (None: in this process)
        self.compiles: dict[str, dict] = {}  # method -> user -> UserResult of this run's compile
        self.lm = None

    def _lm(self):
        if self.lm is None:
            # Uncached, so every answer's cost is what a fresh run spends (a cached answer would count
            # as 0 calls and 0 s); a resumed run reuses the per-user results written as they finish.
            self.lm = make_lm(self.lm_spec, api_base=self.config.api_base)
        return self.lm

    def questions(self, user: UserData):
        # The user's latest questions (all of them when `questions_per_user` is None): what they
        # were asked after everything in their history.
        return user.questions[-self.questions_per_user:] if self.questions_per_user else user.questions

    def raw_path(self, method: str, user_id: str) -> Path:
        return self.out / "raw" / method / f"{user_id}.json"

    def run_method(self, method: str) -> list[dict]:
        if method == "word_overlap" and not self.data.task.has_candidates:
            return []  # the task has no candidates to compare
        rows = []
        users = list(map(UserData.from_row, self.data.dataset))
        # The global majority depends on which users are chosen: the free baselines are always
        # recomputed, never resumed.
        pending = {u.user_id for u in users if method in NON_LLM or not self.raw_path(method, u.user_id).exists()}
        compiled = _compiled(method)
        if compiled in COMPILED and pending:
            self._compile(compiled, [u for u in users if u.user_id in pending])
        for user in tqdm(users, desc=method, unit="user"):
            path = self.raw_path(method, user.user_id)
            if user.user_id in pending:
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    record = self._run_user(method, user)
                except Exception as exc:  # one user's failure is recorded; the others go on
                    record = {"user_id": user.user_id, "error": f"{type(exc).__name__}: {exc}", "answers": []}
                path.write_text(json.dumps(record, ensure_ascii=False, indent=1))
            rows.append({**json.loads(path.read_text()), "profile": self._profile_cost(method, user.user_id)})
        return rows

    def _run_user(self, method: str, user: UserData) -> dict:
        task = self.data.task
        if method in NON_LLM:
            users = self.data.users.values() if method == "global_majority" else [user]
            guess = _majority(task, [answer for u in users for answer in _past_answers(task, u)],
                              mean_rating=method == "user_majority")
            return {"user_id": user.user_id, "answers": [
                {"id": q.id, "pred": _word_overlap(q.question, user) if method == "word_overlap" else guess,
                 "gold": q.answer, "lm_calls": 0, "tokens": 0, "seconds": 0.0}
                for q in self.questions(user)]}
        compiled = _compiled(method)
        store, compile_cost = self._prepare(method, user)
        if compile_cost and compile_cost["status"] == "failed":
            raise RuntimeError(f"compile failed: {compile_cost['error']}")
        if compiled in COMPILED:
            program = store.load_program(user.user_id)
            if method in ABLATED:
                program = ABLATIONS[ABLATED[method]](program)
        else:
            program = store.build(user.user_id, task, method=method, k=self.config.k)
        answers = []
        lm = self._lm()
        with use_lm(lm):
            for q in self.questions(user):
                with UsageMeter(lm) as usage:
                    pred = program(question=q.question)
                answers.append({"id": q.id, "pred": str(pred.answer), "gold": q.answer, "lm_calls": usage.calls,
                                "tokens": usage.tokens, "seconds": usage.seconds,
                                "tools": [step["tool"] for step in pred.trajectory],
                                "confidence": pred.get("confidence"), "scoring": pred.get("scoring")})
        store.close()
        return {"user_id": user.user_id, "answers": answers, "compile": compile_cost}

    def _writes_profile(self, method: str) -> bool:
        """Whether a fresh run of `method` writes the user's profile: a compile whose profile stage
        writes one (`pipeline.writes_profile`), or a baseline that shows it."""
        compiled = _compiled(method)
        if compiled in COMPILED:
            return pipeline.writes_profile(self.data.task)
        return STRATEGIES[compiled].reads_profile

    def _profile_cost_path(self, user_id: str) -> Path:
        # Beside the answers (committed), so a resumed run still counts what the shared profile cost.
        return self.out / "raw" / "_profile" / f"{user_id}.json"

    def _profile_cost(self, method: str, user_id: str) -> dict | None:
        """What writing the user's profile cost, where a fresh run of `method` writes it (None where
        it does not; `UNKNOWN_COST` for a profile written before its cost was kept)."""
        if method in NON_LLM or not self._writes_profile(method):
            return None
        path = self._profile_cost_path(user_id)
        return json.loads(path.read_text()) if path.exists() else UNKNOWN_COST

    def _base(self, user: UserData, with_profile: bool = True) -> UserStore:
        """The store every method shares, made by the compile's own `ingest` and `write_profile`:
        the user's memory, and their profile (one generation, made once, its cost kept) for the
        methods whose fresh run writes it."""
        base = UserStore(self.out / "stores" / "base")
        if len(base.memory(user.user_id)) < len(user.memories):
            pipeline.ingest(base, user)
        if with_profile and not (base.user_dir(user.user_id) / "profile.json").exists():
            lm = self._lm()
            with use_lm(lm), UsageMeter(lm) as usage:
                pipeline.write_profile(base, user.user_id, self.data.task)
            write_json_atomic(self._profile_cost_path(user.user_id),
                              {"lm_calls": usage.calls, "tokens": usage.tokens, "seconds": usage.seconds})
        return base

    def _compile(self, method: str, users: list[UserData]) -> None:
        """Compile `users` with the method's optimizer through the compile's own pipeline
        (`compile_users`: histories, the population model, alignment) on the evaluation's engine,
        starting from the shared profile so that compiling does not pay for writing it again."""
        root = self.out / "stores" / method
        if self._writes_profile(method):
            compiled = UserStore(root)
            for user in tqdm(users, desc="profiles", unit="user"):
                base = self._base(user)
                compiled.save_profile(user.user_id, base.profile(user.user_id))
                base.close()
            compiled.close()
        config = CompileConfig(**{**asdict(self.config), "lm": self.lm_spec, "optimizer": COMPILED[method]})
        report = compile_users(self.data.select(user_ids=[u.user_id for u in users]), root, config,
                               tracking_uri=self.tracking_uri, lm=self._lm(), engine=self.engine)
        self.compiles[method] = {r.user_id: r for r in report.results}
        for result in report.results:
            if result.status == "compiled":
                write_json_atomic(self._compile_cost_path(method, result.user_id), result.usage)

    def _compile_cost_path(self, method: str, user_id: str) -> Path:
        # Beside the answers, as the profile's: the row a fresh run pays it in reads it back, whichever
        # row (an ablation's, or an interrupted run) happened to compile the user first.
        return self.out / "raw" / "_compile" / method / f"{user_id}.json"

    def _prepare(self, method: str, user: UserData) -> tuple[UserStore, dict | None]:
        """The store `method` answers from (compiled methods: their own, compiled by `_compile`),
        and what compiling the user cost a fresh run of it: an ablation reuses the compile it
        ablates (skipped, its cost is that row's); the compiled row counts its compile, kept when it ran."""
        compiled = _compiled(method)
        base = self._base(user, with_profile=self._writes_profile(compiled))
        if compiled not in COMPILED:
            return base, None
        base.close()
        result = self.compiles[compiled][user.user_id]
        kept = self._compile_cost_path(compiled, user.user_id)
        if method != compiled and result.status != "failed":
            cost = {"status": "skipped", "lm_calls": 0, "tokens": 0, "seconds": 0.0}
        elif result.status == "skipped" and kept.exists():
            cost = {"status": "compiled", **json.loads(kept.read_text())}
        else:
            cost = {"status": result.status, **result.usage}
        store = UserStore(self.out / "stores" / compiled)
        state = store.load_state(user.user_id)
        return store, {**cost, "error": result.error, "scores": result.scores,
                       "text_kept": bool(state and state.current.persona.text.strip())}


def summarize(task: TaskSpec, method: str, rows: list[dict]) -> dict:
    answers = [a for r in rows for a in r["answers"]]
    failed = [r["user_id"] for r in rows if r.get("error")]
    compiles = [r["compile"] for r in rows if r.get("compile") and r["compile"]["status"] == "compiled"]
    n = len(answers) or 1
    summary = {"method": method, **task.metrics([a["pred"] for a in answers], [a["gold"] for a in answers]),
               "ci95": bootstrap_interval(task, rows),
               "users": len(rows) - len(failed), "failed_users": failed,
               "lm_calls_per_question": sum(a["lm_calls"] for a in answers) / n,
               "tokens_per_question": sum(a["tokens"] for a in answers) / n,
               "seconds_per_question": sum(a["seconds"] for a in answers) / n,
               "seconds_p50": statistics.median([a["seconds"] for a in answers]) if answers else 0.0,
               # Answers generated because the LM gave no label likelihoods (0 on the embedded model).
               "generated_answers": sum(a.get("scoring") == "generation" for a in answers)}
    if compiles:
        summary["text_kept_share"] = sum(bool(c.get("text_kept")) for c in compiles) / len(compiles)
        summary["compile_lm_calls_per_user"] = sum(c["lm_calls"] for c in compiles) / len(compiles)
        summary["compile_seconds_per_user"] = sum(c["seconds"] for c in compiles) / len(compiles)
        summary["validation_scores"] = [c["scores"] for c in compiles]
    # What a user costs a fresh run before their first answer: their compile and the profile it (or
    # the baseline) writes; the eval writes each profile once and keeps what it cost. An ablation
    # reuses the compile it ablates (skipped): its cost is that row's. Left out where a profile's
    # cost was not kept (written by an earlier version of the eval): a part would read as the whole.
    fresh = [r for r in rows if not r.get("error") and (not r.get("compile") or r["compile"]["status"] == "compiled")]
    offline = [[c for c in (r.get("compile"), r.get("profile")) if c] for r in fresh]
    if any(offline) and not any(r.get("profile") == UNKNOWN_COST for r in fresh):
        summary["offline_lm_calls_per_user"] = sum(c["lm_calls"] for cs in offline for c in cs) / len(offline)
        summary["offline_seconds_per_user"] = sum(c["seconds"] for cs in offline for c in cs) / len(offline)
    return summary


def _paired(rows: list[dict], reference: list[dict] | None) -> tuple[dict, dict | None, list]:
    """Answers by (user, question) for this method and the reference, and the questions both answered."""
    mine = {(r["user_id"], a["id"]): a for r in rows for a in r["answers"]}
    theirs = {(r["user_id"], a["id"]): a for r in reference for a in r["answers"]} if reference is not None else None
    return mine, theirs, [k for k in mine if theirs is None or k in theirs]


def _headline(task: TaskSpec, answers: dict, keys: list) -> float | None:
    return task.metrics([answers[k]["pred"] for k in keys], [answers[k]["gold"] for k in keys])[METRICS[task.kind][0]]


def bootstrap_interval(task: TaskSpec, rows: list[dict], reference: list[dict] | None = None,
                       rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the headline metric with the users resampled with replacement
    (each drawn user brings all of their questions: one user's answers are not independent of
    each other); seeded, so a summary is reproducible. With `reference` (another method's rows),
    of the paired difference, this method minus the reference, on the questions both answered."""
    mine, theirs, keys = _paired(rows, reference)
    if not keys:
        return None
    by_user: dict[str, list] = {}
    for key in keys:
        by_user.setdefault(key[0], []).append(key)
    users = list(by_user)
    rng = random.Random(seed)
    values = []
    for _ in range(rounds):
        sample = [key for user in rng.choices(users, k=len(users)) for key in by_user[user]]
        values.append(_headline(task, mine, sample) - (_headline(task, theirs, sample) if theirs is not None else 0.0))
    values.sort()
    return [values[int(0.025 * rounds)], values[int(0.975 * rounds) - 1]]


def compare_to_reference(task: TaskSpec, summaries: list[dict], rows_by_method: dict[str, list[dict]]) -> None:
    """Adds to each summary its headline metric's difference to PersonaAgent's, with an interval."""
    if REFERENCE not in rows_by_method:
        return
    reference = rows_by_method[REFERENCE]
    for summary in summaries:
        rows = rows_by_method[summary["method"]]
        mine, theirs, keys = _paired(rows, reference)
        if summary["method"] != REFERENCE and keys:  # on the questions both answered, like its interval
            summary[f"minus_{REFERENCE}"] = {"diff": _headline(task, mine, keys) - _headline(task, theirs, keys),
                                             "ci95": bootstrap_interval(task, rows, reference)}


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _interval(interval: list[float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def markdown_table(task: TaskSpec, summaries: list[dict]) -> str:
    metrics = METRICS[task.kind]
    head = ["method", *metrics, f"{metrics[0]} 95% CI", f"{metrics[0]} - {REFERENCE} [95% CI]", "n", "LM calls/q",
            "tokens/q", "s/q", "p50 s/q", "offline calls/user", "offline s/user"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        versus = s.get(f"minus_{REFERENCE}")
        cells = [s["method"], *(_number(s[m], ".3f") for m in metrics), _interval(s.get("ci95")),
                 "-" if versus is None else f"{versus['diff']:+.3f} {_interval(versus['ci95'])}",
                 str(s["n"]), f"{s['lm_calls_per_question']:.2f}",
                 f"{s['tokens_per_question']:.0f}", f"{s['seconds_per_question']:.1f}",
                 f"{s.get('seconds_p50', 0):.1f}",
                 _number(s.get("offline_lm_calls_per_user"), ".1f"), _number(s.get("offline_seconds_per_user"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(task: TaskSpec, summaries: list[dict], out: Path, name: str) -> None:
    try:
        import matplotlib
    except ImportError:  # an optional extra: the tables are written all the same
        print("no plots: pip install 'personaagent[experiments]' for them", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = METRICS[task.kind][0]
    scored = [s for s in summaries if s[metric] is not None]  # a bar at 0 would read as a perfect MAE
    fig, ax = plt.subplots(figsize=(8, 3.5))
    # Error bars: the bootstrap interval, so a reader sees which bars a different draw of users could swap.
    intervals = [s.get("ci95") or [s[metric]] * 2 for s in scored]
    errors = [[s[metric] - low for s, (low, _) in zip(scored, intervals)],
              [high - s[metric] for s, (_, high) in zip(scored, intervals)]]
    ax.bar([s["method"] for s in scored], [s[metric] for s in scored], yerr=errors, capsize=3, color="#4c72b0")
    ax.set_ylabel(metric + (" (lower is better)" if metric == "mae" else ""))
    ax.set_title(f"{task.name}: {metric} per method, 95% bootstrap CI (n={max(s['n'] for s in summaries)})")
    # Rotated labels end at their bar's tick: centred ones read as the next bar's.
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)
    series = [scores for s in summaries if s["method"] == "persona" for scores in s.get("validation_scores", [])]
    series = [[v for v in scores if v is not None] for scores in series]
    if any(len(s) > 1 for s in series):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for scores in series:
            ax.plot(range(len(scores)), scores, color="#4c72b0", alpha=0.3)
        longest = max(len(s) for s in series)
        mean = [sum(s[i] for s in series if len(s) > i) / sum(len(s) > i for s in series) for i in range(longest)]
        ax.plot(range(longest), mean, color="#c44e52", linewidth=2, label="mean")
        ax.set_xlabel("persona version")
        ax.set_ylabel("validation score")
        ax.set_title(f"{task.name}: validation score over alignment")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}-alignment.png", dpi=120)
        plt.close(fig)


def evaluate(data_path: str, out: str | Path, methods: list[str], task: str | None = None, users: int | None = 30,
             lm: str = DEFAULT_LM, questions_per_user: int | None = 1, config: CompileConfig | None = None,
             tracking_uri: str | None = None, name: str = "results", engine: Engine | None = None) -> list[dict]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from: {', '.join(METHODS)}")
    data = load(data_path, task).select(users)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = Evaluation(data, out, lm, config or CompileConfig(lm=lm), questions_per_user, tracking_uri, engine)
    summaries, rows_by_method = [], {}
    mlflow = setup_mlflow(tracking_uri, "personaagent-eval", autolog=False)
    # Named, not taken from the active experiment: the compiles in between set their own.
    experiment_id = mlflow.get_experiment_by_name("personaagent-eval").experiment_id
    for method in methods:
        started = time.perf_counter()
        rows = evaluation.run_method(method)
        if not rows:
            print(f"{method}: does not apply to {data.task.name}", flush=True)
            continue
        rows_by_method[method] = rows
        summary = summarize(data.task, method, rows)
        summaries.append(summary)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"{data.task.name} {method}",
                              tags={"task": data.task.name, "method": method}):
            mlflow.log_params({"data": data.source, "users": len(data.users), "lm": lm, "method": method,
                               "questions_per_user": questions_per_user or "all"})
            mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        headline = METRICS[data.task.kind][0]
        print(f"{method}: {headline}={_number(summary[headline], '.3f')} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    compare_to_reference(data.task, summaries, rows_by_method)
    table = markdown_table(data.task, summaries)
    (out / f"{name}.json").write_text(json.dumps({"task": data.task.name, "data": data.source, "lm": lm,
                                                  "users": len(data.users),
                                                  "questions_per_user": questions_per_user or "all",
                                                  "methods": summaries}, indent=1))
    (out / f"{name}.md").write_text(f"# {data.task.name} ({len(data.users)} users, {lm})\n\n{table}\n")
    plot(data.task, summaries, out, name)
    print(table)
    return summaries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="LaMP folder/file or a .jsonl interaction log")
    parser.add_argument("--task", default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--questions-per-user", type=_questions_per_user, default=1,
                        help="each user's latest N questions, or 'all'")
    parser.add_argument("--out", required=True, help="results directory (resumable)")
    add_settings(parser, "gepa_budget")
    add_engine(parser)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--name", default="results", help="file name of this run's summary in --out")
    add_lm(parser)


def _questions_per_user(value: str) -> int | None:
    """An argument: a positive count, or 'all' (None)."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', not {value!r}")
    return int(value)


def run(args) -> int:
    evaluate(args.data, args.out, [m.strip() for m in args.methods.split(",") if m.strip()], args.task, args.users,
             args.lm, args.questions_per_user, config_from(args), args.tracking_uri, args.name, engine_from(args))
    return 0
