"""Test-time persona alignment (the paper's method) as a DSPy teleprompter, with every change
validated on the user's own history.

For one user, whose past interactions come oldest first:
1. replay: the program answers the user's latest `n_recent` interactions, each as of its own time
   (memory shows only what came before it);
2. validation window: it answers the `validation` interactions before those, the same way. The
   replays never see these, and every candidate state is scored on them;
3. calibration: how much each tool's evidence (the user's label habits, their similar past answers,
   the task's tools) should shift the LM's label distribution. The tools' weights relative to each
   other are fitted on the user's history outside the window (each interaction as of its own time:
   tools need no LM call), then the LM's weight and the tools' overall scale on the replays;
4. textual loss and gradient: one reflection call compares the replayed answers with what the user
   really did, given computed facts (the direction and size of each miss, the user's label habits),
   and rewrites the persona's text and the tools its answer call is shown; demonstrations come from
   the user's history before the validation window. A degenerate rewrite, or one that names items
   from the examples, is rejected without being scored;
   There is no reflection when every replay was answered right (no loss), or when there is no
   validation window to score a candidate on (it could not be accepted);
5. update: a candidate replaces the current state only if the acceptance strategy says so:
   `validated` (default) when it scores better on the validation window (the task's score; for new
   evidence weights that leave the LM at least as heavy as the user's label habits, then the
   likelihood of the user's real answers; on a tie the simpler state stays); `always`, the
   paper's setting, for comparison.

Every state tried is a `PersonaVersion` with its validation score, emitted as it is made. With n=3 and a window of 3, one
iteration costs 3 + 3 answers, 1 reflection call and 3 answers to validate the rewrite: 10 LM calls,
where one label-scoring pass counts as one call. `max_lm_calls` bounds it: the window shrinks first.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import dspy
from dspy.teleprompt import Teleprompter
from dspy.utils.exceptions import AdapterParseError

from ..program.agent import LM_WEIGHT, PersonaProgram, combine
from ..program.lm import use_lm
from ..program.memory import Cutoff
from ..program.persona import Persona, PersonaVersion, gist
from ..program.tools import PRIORS

# Candidate weights of each tool's evidence, and of the LM (lower: trust the LM less).
TOOL_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
LM_WEIGHTS = (1.0, 0.5, 0.25)
MAX_HISTORY = 60  # past interactions the tools' relative weights are fitted on (each costs a memory search)
MIN_GAIN = 0.01  # mean log-likelihood gain (nats) that counts as better when the answers are as good
# A candidate must be better on at least this many more validation interactions than it is worse on
# (on all of a smaller window): in a window of three, a rewrite that changes answers at random wins
# one net item about a third of the time, and on held-out LaMP-2N users such a one-item win broke
# the user's answer.
MIN_NET_WINS = 2


@dataclass
class Answered:
    """One past interaction answered by one state: what the LM and the tools said."""

    question: str
    gold: str
    answer: str
    lm_scores: dict[str, float] | None
    evidence: dict[str, dict[str, float] | None]


@dataclass(frozen=True)
class Score:
    """A state's validation score: the task's mean score, then the mean log-likelihood of the
    user's real answers (None for free text), and the task's score of each interaction."""

    task: float
    likelihood: float | None = None
    items: tuple[float, ...] = ()

    def beats(self, other: "Score", likelihood_breaks_ties: bool = True) -> bool:
        """Better on `MIN_NET_WINS` more interactions than worse (on all of a smaller window); or,
        answering each as well, more likely to give the user's real answers (if asked)."""
        net_wins = sum(a > b for a, b in zip(self.items, other.items)) - sum(a < b for a, b in zip(self.items, other.items))
        if net_wins or not likelihood_breaks_ties:
            return net_wins >= min(MIN_NET_WINS, len(self.items))
        return self.likelihood is not None and other.likelihood is not None and self.likelihood > other.likelihood + MIN_GAIN


def score_answers(task, answered: list[Answered], weights: dict[str, float]) -> Score | None:
    """How a state with these evidence `weights` scores on interactions already answered: for a
    label task, the LM's distributions are recombined with the tools', so no LM call is needed."""
    if not answered:
        return None
    scores, likelihoods = [], []
    for a in answered:
        if a.lm_scores is None:
            scores.append(task.score(a.answer, a.gold))
            continue
        distribution = combine(a.lm_scores, a.evidence, weights)
        scores.append(task.score(task.decide(distribution), a.gold))
        likelihoods.append(math.log(max(distribution.get(task.normalize(a.gold), 0.0), 1e-12)))
    return Score(sum(scores) / len(scores), sum(likelihoods) / len(likelihoods) if likelihoods else None, tuple(scores))


def _scored(score: Score | None) -> dict:
    """A version's validation fields from its score (none when it was not scored)."""
    return {"score": score.task, "likelihood": score.likelihood} if score else {}


def fit_weights(task, answered: list[Answered], history: list[Answered] = ()) -> dict[str, float]:
    """The evidence weights that best explain the user's real answers (likelihood, then task score),
    the simplest (least total weight) on a tie. Tools without evidence on these questions keep 0.

    In two stages, so the few LM-answered interactions fit few numbers: the weights relative to
    each other of the tools with evidence in `history` (past interactions whose evidence was
    computed without an LM) come from the whole history; then the LM's weight, those tools'
    overall scale, and the weight of any tool the history has no evidence for, from `answered`."""
    def with_evidence(items):
        return sorted({name for a in items for name, d in a.evidence.items() if d})

    in_history = with_evidence(history)
    rest = [name for name in with_evidence(answered) if name not in in_history]
    _, relative = _best(task, history, [(1.0, dict(zip(in_history, w)))
                                        for w in itertools.product(TOOL_WEIGHTS, repeat=len(in_history))])
    grid = [(lm, {**{t: scale * w for t, w in relative.items()}, **dict(zip(rest, w))})
            for lm in LM_WEIGHTS for scale in (TOOL_WEIGHTS if relative else (1.0,))
            for w in itertools.product(TOOL_WEIGHTS, repeat=len(rest))]
    lm_weight, weights = _best(task, answered, grid)
    return {LM_WEIGHT: lm_weight, **{name: w for name, w in weights.items() if w}}


def _best(task, answered: list[Answered], grid: list[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """The (LM weight, tool weights) of `grid` under which `answered` scores best; the simplest on a tie."""
    best, best_key = grid[0], None
    for lm_weight, tool_weights in grid if answered else ():
        score = score_answers(task, answered, {LM_WEIGHT: lm_weight, **tool_weights})
        key = (round(score.likelihood or 0.0, 6), score.task, -sum(tool_weights.values()), lm_weight)
        if best_key is None or key > best_key:
            best, best_key = (lm_weight, tool_weights), key
    return best


def past_interaction(question: str, answer: str, as_of: Cutoff | None) -> dspy.Example:
    """One past interaction as the teleprompter replays it: answered as of `as_of` (memory then
    shows only what came before it), scored against the user's real `answer`."""
    return dspy.Example(question=question, answer=answer, as_of=as_of).with_inputs("question", "as_of")


class Acceptance(Protocol):
    """Whether a candidate state replaces the current one."""

    name: str
    validates: bool  # whether candidates are scored on the validation window first

    def accept(self, candidate: Score | None, current: Score | None, likelihood_breaks_ties: bool) -> bool: ...


class Validated:
    """Accepts what scores better on the validation window; on a tie the simpler state stays,
    unless the likelihood of the user's real answers may break it (`likelihood_may_break_a_tie`)."""

    name, validates = "validated", True

    def accept(self, candidate, current, likelihood_breaks_ties):
        return candidate is not None and (current is None or candidate.beats(current, likelihood_breaks_ties))


class Always:
    """The paper's setting: every well-formed rewrite is kept, unscored."""

    name, validates = "always", False

    def accept(self, candidate, current, likelihood_breaks_ties):
        return True


ACCEPTANCE: dict[str, Acceptance] = {a.name: a for a in (Validated(), Always())}


def likelihood_may_break_a_tie(weights: dict[str, float], changes_prompt: bool) -> bool:
    """Whether a change that answers the validation window as well as the current state may still
    win by making the user's real answers more likely there. Only a change of evidence weights
    that leaves the LM at least as heavy as any prior (evidence that is the same for every
    question, such as the user's label habits) may:
    - a change of what the LM reads (text, tools shown, demos) must answer better: on held-out
      LaMP-2N users, a rewrite that won on likelihood alone broke the answer;
    - when no answer changes, a likelihood gain only sharpens answers already given, and a window
      of a user's habitual answers always rewards leaning on the habit: it cannot show that a
      prior should overrule the question. On held-out LaMP-3 users, habits at 4 times the LM's
      weight, accepted so, turned a 1-star review into a 5. Such a weight must answer better."""
    lm_weight = weights.get(LM_WEIGHT, 1.0)
    return not changes_prompt and all(weights.get(prior, 0.0) <= lm_weight for prior in PRIORS)


class ReflectOnAnswers(dspy.Signature):
    """You improve the persona of an assistant that answers on behalf of one user. The cases show
    what the assistant answered and what the user really answered, with the computed size and
    direction of every miss. First say what the misses reveal about this user (one short note per
    missed case), then the one change to the persona that would have made the answers match.
    Then rewrite the persona with that change: describe the user's stable preferences and habits
    (never a specific item, product, article or paper from the cases), and choose which tool results
    the assistant should be shown. Be brief: every sentence must say something new."""

    task: str = dspy.InputField()
    persona: str = dspy.InputField(desc="the persona the assistant followed")
    user_facts: str = dspy.InputField(desc="computed from the user's whole history")
    cases: str = dspy.InputField(desc="question, assistant's answer, user's real answer, and the miss")
    tools: str = dspy.InputField(desc="tools whose results the assistant can be shown: name: what it returns")
    notes: list[str] = dspy.OutputField(desc="one short note per missed case")
    gradient: str = dspy.OutputField(desc="the single most useful change to the persona, in one or two sentences")
    summary: str = dspy.OutputField(desc="2-4 sentences about this user")
    preferences: list[str] = dspy.OutputField(desc="3-6 short, general preferences or habits")
    rules: list[str] = dspy.OutputField(desc="1-4 rules for answering as this user would")
    show_tools: list[str] = dspy.OutputField(desc="names of the tools whose results help, from the list")


@dataclass
class Timings:
    """Where an alignment's time went, in seconds, for the tracker."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


class VersionedTeleprompter(Teleprompter):
    """A teleprompter whose compiled program lists the states it ran (`alignment`, unnumbered
    `PersonaVersion`s, the starting state first), each told to `on_version` (an observer, such as
    a tracker) as it is made."""

    on_version: Callable[[PersonaVersion], None] | None = None

    def _emit(self, version: PersonaVersion) -> PersonaVersion:
        if self.on_version:
            self.on_version(version)
        return version


class Unaligned(VersionedTeleprompter):
    """No alignment (the paper's ablation): the starting state is the only version."""

    def __init__(self, on_version: Callable[[PersonaVersion], None] | None = None):
        self.on_version = on_version

    def compile(self, student: PersonaProgram, **_) -> PersonaProgram:
        program = student.deepcopy()
        program.alignment, program.timings = [self._emit(program.snapshot(note="initial persona"))], {}
        return program


class PersonaAlignment(VersionedTeleprompter):
    """Aligns a `PersonaProgram`'s persona with its user from their past interactions.

    `compile(student, trainset=...)` takes the user's interactions, oldest first, as
    `past_interaction`s, and returns an aligned copy whose `alignment` lists every state tried
    (the one it started from first) as unnumbered `PersonaVersion`s with their scores and
    feedback, and whose `timings` say where the time went. `on_version` observes each version as
    it is made.
    """

    def __init__(self, n_recent: int = 3, iterations: int = 1, acceptance: str = "validated",
                 reflection_lm: dspy.LM | None = None, validation: int = 3, max_lm_calls: int = 10,
                 calibrate: bool = True, on_version: Callable[[PersonaVersion], None] | None = None):
        if n_recent < 1 or iterations < 1 or validation < 0 or max_lm_calls < 1:
            raise ValueError("n_recent, iterations and max_lm_calls must be at least 1, validation at least 0")
        if acceptance not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE)}, not {acceptance!r}")
        self.n_recent, self.iterations, self.validation = n_recent, iterations, validation
        self.acceptance = ACCEPTANCE[acceptance]
        self.max_lm_calls, self.calibrate = max_lm_calls, calibrate
        self.reflection_lm = reflection_lm
        self.on_version = on_version  # an observer (a tracker): told of each version as it is made
        self.reflect = dspy.Predict(ReflectOnAnswers)

    def windows(self, trainset: list) -> tuple[list, list, list]:
        """(older, validation, replays): the latest n to learn from, the window before them to
        validate on, sized to the budget (each iteration validates once), and what is older."""
        replays = trainset[-self.n_recent:]
        earlier = trainset[:-len(replays)] if replays else []
        # Calls: validation + replays, then per iteration one reflection and (validated) a validation.
        per_iteration = self.validation if self.acceptance.validates else 0
        room = (self.max_lm_calls - len(replays) - self.iterations) // (1 + (self.iterations if per_iteration else 0))
        size = max(0, min(self.validation, len(earlier), room))
        return earlier[:len(earlier) - size], earlier[len(earlier) - size:], replays

    def compile(self, student: PersonaProgram, *, trainset: list[dspy.Example], **_) -> PersonaProgram:
        program = student.deepcopy()
        if not trainset:
            raise ValueError("alignment needs at least one past interaction with a known answer")
        if program.persona is None:
            raise ValueError("the student program has no persona to align (method must be 'persona')")
        task, timings = program.task, Timings()
        older, window, replays = self.windows(trainset)
        facts = f"{task.output_stats([r.output for r in program.memory.all()])}\nProfile: {program.profile.render()}"
        with timings.phase("validation"):
            validated = self._answer(program, window)
        with timings.phase("replay"):
            replayed = self._answer(program, replays)
        current = score_answers(task, validated, program.persona.weights)
        versions = [self._emit(program.snapshot(note="initial persona", **_scored(current)))]

        if task.labels and self.calibrate:  # 3. calibration, from history and replays; scored on the window
            with timings.phase("calibration"):
                weights = fit_weights(task, replayed, self._tools_on(program, [*older, *replays][-MAX_HISTORY:]))
            trial = program.with_persona(replace(program.persona, weights=weights))
            score = score_answers(task, validated, weights)
            accepted = weights != program.persona.weights and self.acceptance.accept(
                score, current, likelihood_may_break_a_tie(weights, changes_prompt=False))
            versions.append(self._emit(trial.snapshot(accepted=accepted, note="evidence weights fitted on the replays",
                                                      **_scored(score))))
            if accepted:
                program, current = trial, score

        for _ in range(self.iterations):  # 4-5. textual loss and gradient, rewrite, validate
            # No loss, no gradient; and a candidate that cannot be validated cannot be accepted.
            if score_answers(task, replayed, program.persona.weights).task == 1.0 or (self.acceptance.validates and not window):
                break
            with timings.phase("reflection"):
                try:
                    candidate, feedback = self._rewrite(program, facts, replayed, older)
                except AdapterParseError as exc:
                    note = f"the reflection LM's output did not parse ({gist(str(exc).splitlines()[0], 200)})"
                    versions.append(self._emit(program.snapshot(accepted=False, note=note)))
                    continue
            trial = program.with_persona(candidate)
            problems = candidate.problems([ex.question for ex in replays])
            if problems:
                versions.append(self._emit(trial.snapshot(feedback=feedback, accepted=False, note="; ".join(problems))))
                continue
            score = None
            if self.acceptance.validates and window:
                with timings.phase("validation"):
                    score = score_answers(task, self._answer(trial, window), candidate.weights)
            accepted = self.acceptance.accept(score, current, likelihood_may_break_a_tie(candidate.weights, changes_prompt=True))
            versions.append(self._emit(trial.snapshot(
                feedback=feedback, accepted=accepted,
                note="" if accepted else "did not score better on the validation window", **_scored(score))))
            if accepted:
                program, current = trial, score or current
                if self.iterations > 1:
                    with timings.phase("replay"):
                        replayed = self._answer(program, replays)
        program.alignment = versions
        program.timings = timings.seconds
        return program

    # ------------------------------------------------------------------ steps

    @staticmethod
    def _tools_on(program: PersonaProgram, examples: list[dspy.Example]) -> list[Answered]:
        """The tools' evidence on each interaction as of its own time, under a uniform LM (no LM call)."""
        uniform = {label: 1.0 / len(program.task.labels) for label in program.task.labels}
        return [Answered(ex.question, str(ex.answer), "", uniform, program.evidence(ex.question, ex.get("as_of")))
                for ex in examples]

    @staticmethod
    def _answer(program: PersonaProgram, examples: list[dspy.Example]) -> list[Answered]:
        """Answer each interaction as of its own time, keeping every tool's evidence for refitting."""
        return [Answered(ex.question, str(ex.answer), str(pred.answer), pred.get("lm_scores"), pred.get("evidence") or {})
                for ex in examples for pred in [program(question=ex.question, as_of=ex.get("as_of"))]]

    def _reflect(self):
        return use_lm(self.reflection_lm) if self.reflection_lm else contextlib.nullcontext()

    def _rewrite(self, program: PersonaProgram, facts: str, replayed: list[Answered],
                 older: list[dspy.Example]) -> tuple[Persona, str]:
        task = program.task
        cases = "\n\n".join(f"Case {i}\nquestion: {gist(a.question, 300)}\n{miss(task, a, program.persona.weights)}"
                            for i, a in enumerate(replayed, 1))
        tools = "\n".join(f"{name}: {tool.desc}" for name, tool in program.tools.items())
        with self._reflect():
            out = self.reflect(task=task.description, persona=program.instructions, user_facts=facts, cases=cases, tools=tools)
        notes = "".join(f"\n- {n}" for n in out.notes if n.strip())
        feedback = f"{out.gradient.strip()}\nNotes on the replayed cases:{notes}"
        persona = program.persona
        candidate = replace(
            persona,
            summary=out.summary.strip(),
            preferences=[p.strip() for p in out.preferences if p.strip()][:6],
            rules=[r.strip() for r in out.rules if r.strip()][:4] or persona.rules,
            sources=[t for t in dict.fromkeys(out.show_tools) if t in program.tools] or persona.sources,
            demos=[{"question": ex.question, "answer": ex.answer} for ex in older[-2:]],
        )
        return candidate, feedback


def miss(task, answered: Answered, weights: dict[str, float]) -> str:
    """A replayed case as computed facts: the answers, and the size and direction of the miss."""
    line = f"assistant's answer: {answered.answer}\nuser's real answer: {answered.gold}\n"
    if answered.answer.strip().lower() == answered.gold.strip().lower():
        return line + "result: match"
    if task.kind == "rating":
        try:
            gap = float(answered.gold) - float(answered.answer)
            return line + f"result: the assistant's rating was {abs(gap):g} {'too low' if gap > 0 else 'too high'}"
        except ValueError:
            pass
    if answered.lm_scores is not None:
        distribution = combine(answered.lm_scores, answered.evidence, weights)
        gold = distribution.get(task.normalize(answered.gold), 0.0)
        rank = sorted(distribution.values(), reverse=True).index(gold) + 1 if gold else len(distribution)
        return line + f"result: miss; the user's answer had probability {gold:.2f} (rank {rank} of {len(distribution)})"
    return line + f"result: miss (score {task.score(answered.answer, answered.gold):.2f})"
