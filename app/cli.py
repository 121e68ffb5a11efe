"""The `personaagent` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import fields
from importlib.metadata import entry_points

from ..optimizers.tracking import DEFAULT_TRACKING_URI, offline_environment, tracking_uri_or_default


def add_settings(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """An option per `CompileConfig` field in `names` (`n_recent`: --n-recent), with the field's
    default (unless `defaults` overrides it), help and choices: the settings are declared only there."""
    from ..optimizers.pipeline import CompileConfig

    settings = {setting.name: setting for setting in fields(CompileConfig)}
    for name in names:
        setting = settings[name]
        # A bool is a flag (argparse's type=bool reads "False" as true); any other type is the
        # default's, and a setting that defaults to None (reflection_lm) is a string.
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(setting.default, bool) else {
            "type": str if setting.default is None else type(setting.default),
            "choices": setting.metadata.get("choices")}
        parser.add_argument("--" + name.replace("_", "-"), default=defaults.get(name, setting.default),
                            help=setting.metadata["help"], **kind)


def add_lm(parser: argparse.ArgumentParser, **defaults) -> None:
    add_settings(parser, "lm", "api_base", **defaults)


def config_from(args):
    """The `CompileConfig` of the settings the command has options for; the others keep their defaults."""
    from ..optimizers.pipeline import CompileConfig

    return CompileConfig(**{s.name: getattr(args, s.name) for s in fields(CompileConfig) if hasattr(args, s.name)})


def add_engine(parser: argparse.ArgumentParser) -> None:
    """Where a command runs its users' compiles (`optimizers.engines`): `engine_from` reads these options."""
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes or Ray actors (each loads its own model)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this machine's processes; ray: actors on a Ray cluster "
                             "(pip install personaagent[ray])")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address for --engine ray (default: start a local one)")


def engine_from(args):
    """The engine `add_engine`'s options name; None for one local worker: this process, where
    `compile_users` may use the caller's LM object."""
    if args.engine == "ray":
        from ..optimizers.engines import RayEngine

        return RayEngine(args.address, max(1, args.workers))
    if args.workers > 1:
        from ..optimizers.engines import LocalEngine

        return LocalEngine(args.workers)
    return None


def _require_store(path: str) -> None:
    """Commands that read a store must not create an empty one where a path is mistyped."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such store (compile users into it first)")


# ---------------------------------------------------------------- models

def cmd_models(args) -> int:
    from ..program import models
    from ..program.embedder import prepare_embedder
    from ..program.isolated import EngineSelfTestFailed, build_features, self_test
    from ..program.native_build import installed_build

    if args.action == "prepare":
        name = args.name or models.DEFAULT_MODEL
        path = models.prepare(name)
        prepare_embedder()  # a distilled embedder is built here once, not by the first request
        try:
            self_test(name)  # one real decode in a child process: a build that crashes here cannot serve
        except EngineSelfTestFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{name}: ready (self-test passed), {path.stat().st_size / 1e6:.0f} MB at {path}")
        return 0
    print(f"cache: {models.cache_dir()} (set {models.CACHE_ENV} to move it)")
    print(f"engine: llama.cpp built for {installed_build().get('tag') or 'an unrecorded CPU'}; "
          f"instruction sets in use: {build_features()}")
    for name, model in models.MODELS.items():
        default = " (default)" if name == models.DEFAULT_MODEL else ""
        state = "ready" if models.is_ready(name) else "not prepared"
        print(f"  local/{name:<22} {state:<13} {model.description}{default}")
    return 0


# ---------------------------------------------------------------- ask

def cmd_ask(args) -> int:
    from ..program.lm import make_lm, use_lm
    from ..program.store import UserStore

    _require_store(args.store)
    store = UserStore(args.store)
    state = store.load_state(args.user)
    if state is None:
        print(f"error: no compiled program for user {args.user!r} in {args.store} "
              f"(users: {', '.join(store.users()[:10]) or 'none'})", file=sys.stderr)
        return 2
    program = store.load_program(args.user)
    lm = make_lm(args.lm or state.lm, api_base=args.api_base)
    with use_lm(lm):
        pred = program(question=args.text)
    if args.verbose:
        print(f"persona v{state.current.version}:\n{program.instructions}\n")
        for step in pred.trajectory:
            print(f"tool {step['tool']}({step['args']}):\n{step['result']}\n")
    print(pred.answer)
    store.close()
    return 0


# ---------------------------------------------------------------- forget

def cmd_forget(args) -> int:
    from ..optimizers.tracking import forget_user
    from ..program.store import UserStore

    _require_store(args.store)
    # MLflow first: if it fails, the user is still whole in the store and the command can be rerun.
    runs = forget_user(args.user, args.tracking_uri)
    found = UserStore(args.store, embedder=object()).delete_user(args.user)
    print(f"forgot {args.user!r}: {'their store data' if found else 'nothing in the store'}, {runs} MLflow runs "
          f"({args.tracking_uri or DEFAULT_TRACKING_URI})")
    return 0


# ---------------------------------------------------------------- rollback

def cmd_rollback(args) -> int:
    from ..program.store import UserStore

    _require_store(args.store)
    store = UserStore(args.store, embedder=object(), max_versions=args.max_versions)
    if not store.user_dir(args.user).exists():
        raise KeyError(f"unknown user {args.user!r} in {args.store}")
    state = store.rollback(args.user, args.version)
    print(f"{args.user}: v{state.current.version} is now current ({state.current.note})")
    return 0


# ---------------------------------------------------------------- compile

def cmd_compile(args) -> int:
    from ..data.loaders import load
    from ..optimizers.compile import compile_users

    data = load(args.data, args.task).select(args.users, args.user)
    config = config_from(args)
    # SIGTERM stops a compile as Ctrl-C does: MLflow runs end KILLED, every user keeps their last good persona.
    signal.signal(signal.SIGTERM, _interrupt)
    report = compile_users(data, args.store, config, tracking_uri=args.tracking_uri, engine=engine_from(args))
    for r in report.results:
        scores = " -> ".join("-" if s is None else f"{s:.2f}" for s in r.scores)
        line = f"{r.status:<8} {r.user_id:<30} validation score {scores or '-'}"
        if r.status == "compiled":
            line += f"  ({r.lm_calls} LM calls, {r.tokens} tokens, {r.seconds:.1f} s; ran {', '.join(r.stages_run)})"
        print(line + (f"  {r.error}" if r.error else ""))
        if r.tracking_errors:
            print(f"         tracking failed, the persona was saved: {r.tracking_errors[0]}")
    if report.tracking_errors:
        print(f"tracking failed for the compile's run: {report.tracking_errors[0]}")
    counts = report.counts
    print(f"{counts['compiled']} compiled, {counts['skipped']} skipped (unchanged), {counts['failed']} failed; "
          f"MLflow run {report.run_id} ({args.tracking_uri or DEFAULT_TRACKING_URI})")
    return 1 if report.all_failed else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- serve

def cmd_serve(args) -> int:
    from ..data.tasks import generic_task, resolve_task
    from ..program.lm import make_lm
    from .http import serve

    token = args.token or os.environ.get("PERSONAAGENT_TOKEN")
    if not token:
        print("error: set PERSONAAGENT_TOKEN (or pass --token): requests must carry it as a bearer token",
              file=sys.stderr)
        return 2
    kinds = ("classification", "rating", "generation")
    default_task = generic_task(args.default_task) if args.default_task in kinds else resolve_task(args.default_task)
    lm = make_lm(args.lm, api_base=args.api_base)
    reflection_lm = make_lm(args.reflection_lm) if args.reflection_lm else None
    print(f"serving {args.store} on http://{args.host}:{args.port} (OpenAPI description at /openapi.json)", flush=True)
    serve(args.store, token=token, host=args.host, port=args.port, lm=lm, reflection_lm=reflection_lm,
          default_task=default_task, max_loaded=args.max_loaded, max_versions=args.max_versions,
          align_every=args.align_every, register_prompts=args.register_prompts, persona_alias=args.persona_alias,
          tracking_uri=tracking_uri_or_default(args.tracking_uri))
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    """The README's main job: compile the bundled sample users, show the personas, answer with one."""
    from ..data import SAMPLE_DIR, load
    from ..optimizers.compile import compile_users
    from ..optimizers.population import PopulationModel
    from ..program.agent import combine
    from ..program.lm import make_lm, use_lm
    from ..program.store import UserStore

    data = load(SAMPLE_DIR / args.sample).select(args.users)
    config = config_from(args)
    print(f"Compiling {len(data.users)} sample users of {data.task.name} on {config.lm} "
          f"(persona alignment, n={config.n_recent}, {config.iterations} iteration) into {args.store}\n", flush=True)
    report = compile_users(data, args.store, config, tracking_uri=args.tracking_uri)
    for r in report.results:
        print(f"=== user {r.user_id}: {r.status}"
              + (f" ({r.lm_calls} LM calls, {r.seconds:.0f} s)" if r.lm_calls else ""))
        if r.status == "failed":
            print(f"    {r.error}")
            continue
        state = UserStore(args.store, embedder=object()).load_state(r.user_id)
        first, current = state.versions[0], state.current
        print(f"--- persona before (v{first.version}, validation score {_score(first.score)}):\n"
              f"{first.instructions['answer']}")
        for v in state.versions[1:]:
            print(f"--- v{v.version}: {'accepted' if v.accepted else 'rejected'}, validation score {_score(v.score)}"
                  f" (likelihood {_score(v.likelihood)}): {v.note or 'rewritten from feedback'}; "
                  f"feedback: {v.feedback.splitlines()[0] if v.feedback else '-'}")
        persona = current.persona
        print(f"--- persona after (v{current.version}): shown {', '.join(persona.sources) or 'no tools'}, "
              f"{len(persona.demos)} demos, evidence weights {_rounded(persona.weights)}, "
              f"label offsets {_rounded(persona.bias)}\n"
              f"{current.instructions['answer']}\n")
    compiled = [r.user_id for r in report.results if r.status != "failed"]
    if not compiled:
        print("every user failed to compile", file=sys.stderr)
        return 1
    user = data.users[compiled[0]]
    store = UserStore(args.store)
    program = store.load_program(user.user_id)
    saved = store.load_population()
    prior = PopulationModel.from_dict(saved["model"]).prior_for(user.user_id) if saved else None
    state = store.load_state(user.user_id)
    text = state.current.persona.text
    print(f"User {user.user_id}'s persona text: " + (text.replace("\n", " / ") if text.strip()
          else "none: " + next((v.note for v in reversed(state.versions) if not v.accepted),
                               "no rewrite was tried (every replayed answer was right)")))
    with use_lm(make_lm(config.lm, api_base=config.api_base)):
        for question in user.questions:
            pred = program(question=question.question)
            tools = ", ".join(step["tool"] for step in pred.trajectory) or "none"
            confidence = f" (probability {pred.confidence:.2f})" if pred.get("confidence") is not None else ""
            print(f"Asked as user {user.user_id} (tools used: {tools}):\n  {question.question[:160]}...")
            if prior is not None and pred.get("lm_scores"):
                # The same LM distribution and evidence, combined as the population model would, unadapted.
                shared = data.task.decide(combine(pred.lm_scores, pred.evidence, prior.weights, prior.bias))
                print(f"  the population model's answer (population v{saved['version']}, without this user): {shared}")
            print(f"  this user's adapted answer: {pred.answer}{confidence}   "
                  f"what the user really gave: {question.answer}")
    store.close()
    print(f"\nSee the runs: personaagent ui --tracking-uri {args.tracking_uri or DEFAULT_TRACKING_URI}  "
          "(then open http://127.0.0.1:5000)")
    return 0


def _rounded(values: dict | None) -> str:
    return ", ".join(f"{k} {v:+.2f}" for k, v in values.items()) if values else "none"


def _score(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------- ui

def cmd_ui(args) -> int:
    offline_environment()
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", args.tracking_uri or DEFAULT_TRACKING_URI,
               "--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    os.execvpe(command[0], command, os.environ)
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Options that load the optimizers, and so the models, are added only to the
    command `argv` names (`when_named`), so `--help` stays instant: the settings, whose choices are
    the optimizers' registries, and `eval`'s options, which list every method."""
    parser = argparse.ArgumentParser(prog="personaagent",
                                     description="Per-user personas for LLM agents, aligned at test time.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    named = sys.argv[1:] if argv is None else argv

    def when_named(command: argparse.ArgumentParser, add_options, *args, **kwargs) -> None:
        if command.prog.split()[-1] in named:  # its prog: "personaagent <command>"
            add_options(command, *args, **kwargs)

    for add_command in (_models_command, _ask_command, _compile_command, _forget_command, _rollback_command,
                        _serve_command, _demo_command):
        add_command(sub, when_named)
    # Commands of a layer above the app (`eval`, in experiments/) plug in as `personaagent.commands`
    # entry points (pyproject.toml): the app finds them without importing them, so imports stay one
    # way, and `eval` stays with the experiments (moved below the app, the evaluation, its baselines
    # and plots would ship with what users deploy).
    for command in entry_points(group="personaagent.commands"):
        command.load()(sub, when_named)
    _ui_command(sub, when_named)
    return parser


# Each command's parser, added to `commands` (the subparsers) as a `personaagent.commands` entry
# point adds its own: `when_named` adds the options that load the optimizers.

def _models_command(commands, when_named) -> None:
    p = commands.add_parser("models", help="list the embedded models, or prepare one",
                            description="List the embedded models and whether each is ready; `prepare [NAME]` "
                                        "installs, joins and verifies one, then runs one decode of it in a child "
                                        "process (a self-test: a crash there is reported as one line, exit status "
                                        "2).")
    p.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    p.add_argument("name", nargs="?", help="model name, e.g. qwen2.5-coder-1.5b (default)")
    p.set_defaults(func=cmd_models)


def _ask_command(commands, when_named) -> None:
    p = commands.add_parser("ask", help="answer as a user's compiled program",
                            description="Answer TEXT with the saved program of one user.")
    p.add_argument("--store", required=True, help="compile output directory")
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("text", help="the question")
    p.add_argument("--verbose", action="store_true", help="show the persona, the tools used and their results")
    when_named(p, add_lm, lm=None)  # None: the LM the program was compiled with
    p.set_defaults(func=cmd_ask)


def _compile_command(commands, when_named) -> None:
    p = commands.add_parser("compile", help="compile per-user programs offline",
                            description="Ingest each user's history, write their profile (where their program reads "
                                        "one) and align their persona; resumable.")
    p.add_argument("--data", required=True, help="LaMP folder or questions file, or a .jsonl interaction log")
    p.add_argument("--store", required=True, help="output directory for the users' programs")
    p.add_argument("--task", default=None, help="task name (e.g. LaMP-3) when the data does not say; for .jsonl: "
                                                "classification, rating or generation")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--users", type=int, default=None, help="compile the first N users")
    who.add_argument("--user", action="append", default=None, help="compile this user (repeatable)")
    when_named(p, add_lm)
    when_named(p, add_settings, "reflection_lm", "optimizer", "n_recent", "iterations", "acceptance", "validation",
               "max_lm_calls", "gepa_budget")
    add_engine(p)
    when_named(p, add_settings, "max_versions", "register_prompts")
    p.add_argument("--tracking-uri", default=None, help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
    p.set_defaults(func=cmd_compile)


def _forget_command(commands, when_named) -> None:
    p = commands.add_parser("forget", help="delete everything written about a user",
                            description="Delete a user's memory, profile, persona and versions from the store, and "
                                        "their runs, traces and artifacts from MLflow. Copies elsewhere (a remote "
                                        "server's backups) are the operator's to delete.")
    p.add_argument("--store", required=True, help="compile output directory")
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI the compiles used (default {DEFAULT_TRACKING_URI})")
    p.set_defaults(func=cmd_forget)


def _rollback_command(commands, when_named) -> None:
    p = commands.add_parser("rollback", help="make an earlier persona version current again",
                            description="Make a kept persona version of a user current again; it is saved as a new "
                                        "version, so the history only grows.")
    p.add_argument("--store", required=True, help="compile output directory")
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("--version", type=int, required=True, help="the version to restore")
    when_named(p, add_settings, "max_versions")
    p.set_defaults(func=cmd_rollback)


def _serve_command(commands, when_named) -> None:
    p = commands.add_parser("serve", help="serve the users' programs over HTTP",
                            description="Answer, remember and align for every user of a store over an HTTP API "
                                        "(OpenAPI description at /openapi.json); requests carry the bearer token "
                                        "from --token or PERSONAAGENT_TOKEN.")
    p.add_argument("--store", required=True, help="compile output directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None,
                   help="bearer token (default: $PERSONAAGENT_TOKEN, preferred: arguments show in ps)")
    when_named(p, add_lm)
    when_named(p, add_settings, "reflection_lm")
    p.add_argument("--default-task", default="generation",
                   help="task of users with no compiled program: classification, rating, generation or a LaMP task "
                        "name")
    p.add_argument("--max-loaded", type=int, default=256,
                   help="programs kept loaded, least recently used dropped first")
    when_named(p, add_settings, "max_versions")
    p.add_argument("--align-every", type=int, default=None,
                   help="online alignment: align a user in the background after every N new interactions with a "
                        "known outcome")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI the store's compiles used (default {DEFAULT_TRACKING_URI}): "
                        "deleting a user also deletes their runs and registered prompts there")
    when_named(p, add_settings, "register_prompts")
    p.add_argument("--persona-alias", default=None,
                   help="serve each user's persona text from MLflow's prompt registry, the version under this alias "
                        "(e.g. champion; see --register-prompts)")
    p.set_defaults(func=cmd_serve)


def _demo_command(commands, when_named) -> None:
    p = commands.add_parser("demo", help="compile the bundled sample users and answer with one",
                            description="The main job: compile personas for bundled sample users on the embedded "
                                        "model, print them before and after, answer with one.")
    p.add_argument("--store", default=".demo/store", help="where to write the users' programs")
    p.add_argument("--sample", default="LaMP-3-amazon", choices=["LaMP-3-amazon", "LaMP-2N-huffpost"])
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--tracking-uri", default=None, help=f"default {DEFAULT_TRACKING_URI}")
    when_named(p, add_lm)
    p.set_defaults(func=cmd_demo)


def _ui_command(commands, when_named) -> None:
    p = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1",
                            description="Start the MLflow UI over the compile runs, offline.")
    p.add_argument("--tracking-uri", default=None, help=f"default {DEFAULT_TRACKING_URI}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)


def _one_line(exc: Exception) -> str:
    """What went wrong, on one line, naming the file where the error has one."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc):
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    offline_environment()
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, OSError) as exc:  # bad input: one line, no traceback (--debug shows it)
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
