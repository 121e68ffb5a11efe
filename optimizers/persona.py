"""Test-time persona alignment (the paper's method) as a DSPy teleprompter: a per-user adaptation of
the population model, and a persona text kept only where the user's own history shows it pays.

For one user, whose past interactions come oldest first:
1. replay: the program answers the user's latest `n_recent` interactions, each as of its own time
   (memory shows only what came before it);
2. validation window: it answers the `validation` interactions before those, the same way. The
   replays never see these, and every text candidate is scored on them;
3. adaptation (closed-set answers): how much the LM's label distribution and each tool's evidence
   (the user's label habits, their similar past answers, the task's tools) count, and each label's
   own offset, fitted on all of those answered interactions, starting from the population model
   (`optimizers.population`, learned from every other user's history) and shrunk toward it in
   proportion to how much evidence the user has: a 3-item history cannot make a habit outweigh
   the LM. No LM call: the answers already hold the LM's distributions;
4. textual loss and gradient: one reflection call compares the replayed answers with what the user
   really did, given computed facts (the direction and size of each miss, the user's label habits;
   for generated text its length, casing, punctuation and the words kept and added), and rewrites
   the persona's text and the tools its answer call is shown; demonstrations come from the user's
   history before the validation window. A degenerate rewrite, or one that names items from the
   examples or copies a past answer, is rejected without being scored. There is no reflection
   when every replay was answered right (no loss), or when there is no validation window. Where
   a candidate comes from is a `TextSource`: that reflection (`ReflectedText`), or, for a text in
   the user's own style (a headline), the style computed from their history, with no LM call and
   no replays (`ComputedStyle`): its feedback compares the window's answers;
5. update: a text candidate replaces the current state only if the acceptance strategy says so:
   `validated` (default) when a one-sided paired sign test over the window's interactions says it
   is better (`SIGN_TEST_LEVEL`): with a window of 3, only a candidate better on all three and worse
   on none; `always`, the paper's setting, for comparison.

Every state tried is a `PersonaVersion` with its validation score, emitted as it is made. With n=3
and a window of 3, one iteration costs 3 + 3 answers, 1 reflection call and 3 answers to validate the
rewrite: 10 LM calls, where one label-scoring pass counts as one call (a style: the window answered
without and with it, 6). `max_lm_calls` bounds it: the window shrinks first.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Protocol

import dspy
from dspy.teleprompt import Teleprompter
from dspy.utils.exceptions import AdapterParseError

from ..data.tasks import compare_texts, text_style
from ..program.agent import PersonaProgram, combine
from ..program.lm import use_lm
from ..program.memory import Cutoff
from ..program.persona import Persona, PersonaVersion, gist
from .population import DEFAULT_STRENGTH, Answered, Combination, TextEffect, adapt, sign_test

# A text candidate is accepted when a one-sided paired sign test over the validation window gives
# p at most this: 1/8 is the smallest p a window of 3 can give (better on all three, worse on none).
# A fixed margin of items cannot tell a useful change from noise; on held-out LaMP-2N users a
# rewrite that won one item net broke the user's answer.
SIGN_TEST_LEVEL = 0.125


@dataclass(frozen=True)
class Score:
    """A state's validation score: the task's mean score, then the mean log-likelihood of the
    user's real answers (None for free text), and the task's score of each interaction."""

    task: float
    likelihood: float | None = None
    items: tuple[float, ...] = ()

    def beats(self, other: "Score") -> bool:
        """Better than `other` by a one-sided paired sign test over the same interactions."""
        wins = sum(a > b for a, b in zip(self.items, other.items))
        losses = sum(a < b for a, b in zip(self.items, other.items))
        return wins > 0 and sign_test(wins, losses) <= SIGN_TEST_LEVEL


def score_answers(task, answered: list[Answered], combination: Combination) -> Score | None:
    """How a state with this evidence combination scores on interactions already answered: for a
    label task, the LM's distributions are recombined with the tools', so no LM call is needed."""
    if not answered:
        return None
    scores, likelihoods = [], []
    for a in answered:
        if a.lm_scores is None:
            scores.append(task.score(a.answer, a.gold))
            continue
        distribution = combine(a.lm_scores, a.evidence, combination.weights, combination.bias)
        scores.append(task.score(task.decide(distribution), a.gold))
        likelihoods.append(math.log(max(distribution.get(task.normalize(a.gold), 0.0), 1e-12)))
    return Score(sum(scores) / len(scores), sum(likelihoods) / len(likelihoods) if likelihoods else None, tuple(scores))


def _winnable(current: Score | None, window: int) -> bool:
    """Whether a candidate right on every window item the current state misses would pass the
    sign test (it cannot win where the current state is already right)."""
    misses = sum(item < 1.0 for item in current.items) if current else window
    return misses > 0 and sign_test(misses, 0) <= SIGN_TEST_LEVEL


def _combination(persona: Persona) -> Combination:
    return Combination(persona.weights or Combination().weights, persona.bias)


def _scored(score: Score | None) -> dict:
    """A version's validation fields from its score (none when it was not scored)."""
    return {"score": score.task, "likelihood": score.likelihood} if score else {}


def past_interaction(question: str, answer: str, as_of: Cutoff | None) -> dspy.Example:
    """One past interaction as the teleprompter replays it: answered as of `as_of` (memory then
    shows only what came before it), scored against the user's real `answer`."""
    return dspy.Example(question=question, answer=answer, as_of=as_of).with_inputs("question", "as_of")


class Acceptance(Protocol):
    """Whether a candidate state replaces the current one."""

    name: str
    validates: bool  # whether candidates are scored on the validation window first

    def could_accept(self, current: Score | None, window: int) -> bool:
        """Whether any candidate could be accepted (if not, none is written)."""

    def accept(self, candidate: Score | None, current: Score | None) -> bool: ...

    def explain(self, accepted: bool) -> str:
        """The version's note on the decision."""


class Validated:
    """Accepts what a sign test over the validation window says is better; otherwise the simpler,
    current state stays."""

    name, validates = "validated", True

    def could_accept(self, current, window):
        return _winnable(current, window)

    def accept(self, candidate, current):
        return candidate is not None and (current is None or candidate.beats(current))

    def explain(self, accepted):
        return "" if accepted else "not better on the validation window by a sign test"


class Always:
    """The paper's setting: every well-formed rewrite is kept, unscored."""

    name, validates = "always", False

    def could_accept(self, current, window):
        return True

    def accept(self, candidate, current):
        return True

    def explain(self, accepted):
        return ""


@dataclass(frozen=True)
class PopulationBacked:
    """For a text computed from the user's history (their style): accepted where, over the other
    users' validation windows, the same kind of text won by a sign test (`TextEffect.pays`), unless
    this user's own window says it is worse by the window's sign test. Three items of one user
    cannot show a small, steady gain; the population's hundred can."""

    effect: TextEffect
    name, validates = "population", True

    def could_accept(self, current, window):
        return self.effect.pays()

    def accept(self, candidate, current):
        return (self.effect.pays() and candidate is not None
                and not (current is not None and current.beats(candidate)))

    def explain(self, accepted):
        evidence = (f"on other users' validation windows the computed text won {self.effect.wins} and lost "
                    f"{self.effect.losses} items (sign test p={self.effect.p_value:.3g})")
        if accepted:
            return f"kept: {evidence}"
        return f"not kept: {evidence}" + ("; worse on this user's window" if self.effect.pays() else "")


ACCEPTANCE: dict[str, Acceptance] = {a.name: a for a in (Validated(), Always())}


class ReflectOnAnswers(dspy.Signature):
    """You improve the persona of an assistant that answers on behalf of one user. The cases show
    what the assistant answered and what the user really answered, with computed facts about every
    miss. First say what the misses reveal about this user (one short note per missed case), then
    the one change to the persona that would have made the answers match. Then rewrite the persona
    with that change: describe the user's stable preferences and habits, and for a text the user
    writes, their style (length, casing, punctuation, which words they keep or add), never a topic
    list, a specific item, product, article or paper, or a copy of a past answer; and choose which
    tool results the assistant should be shown. Be brief: every sentence must say something new."""

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


@dataclass
class Aligned:
    """What an alignment returns: the versions it ran (unnumbered `PersonaVersion`s, the starting
    state first) and where its time went, in seconds. The align stage saves it."""

    versions: list[PersonaVersion]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def current(self) -> PersonaVersion:
        """The version the alignment ends in: its last accepted one."""
        return next(v for v in reversed(self.versions) if v.accepted)

    @classmethod
    def from_dict(cls, payload: dict) -> "Aligned":
        return cls([PersonaVersion.from_dict(v) for v in payload["versions"]], payload.get("timings", {}))


class VersionedTeleprompter(Teleprompter):
    """A teleprompter that returns the states it ran (`align`), each told to `on_version` (an
    observer, such as a tracker) as it is made; `compile`, DSPy's interface, returns the program in
    the state the alignment ends in."""

    on_version: Callable[[PersonaVersion], None] | None = None

    def align(self, student: PersonaProgram, *, trainset: list[dspy.Example], **kwargs) -> Aligned:
        raise NotImplementedError

    def compile(self, student: PersonaProgram, *, trainset: list[dspy.Example], **kwargs) -> PersonaProgram:
        program = student.deepcopy()
        program.load_version(self.align(student, trainset=trainset, **kwargs).current)
        return program

    def _emit(self, version: PersonaVersion) -> PersonaVersion:
        if self.on_version:
            self.on_version(version)
        return version


class Unaligned(VersionedTeleprompter):
    """No alignment (the paper's ablation): the starting state is the only version."""

    def __init__(self, on_version: Callable[[PersonaVersion], None] | None = None):
        self.on_version = on_version

    def align(self, student: PersonaProgram, **_) -> Aligned:
        return Aligned([self._emit(student.snapshot(note="initial persona"))])


@dataclass
class AlignmentConfig:
    """The persona alignment's settings. `CompileConfig` extends them with the compile's own, and
    its fields are the one source of the settings: the CLI's options, the HTTP align request and the
    service's and `PersonaAlignment`'s defaults are made from them. A field's metadata holds its
    help, and where it has them its choices (from a registry) and its minimum, checked here."""

    n_recent: int = field(default=3, metadata={
        "help": "latest interactions with a known output replayed per user (paper: 3)", "min": 1})
    iterations: int = field(default=1, metadata={
        "help": "rounds of reflection, each trying one rewrite of the persona", "min": 1})
    acceptance: str = field(default="validated", metadata={
        "help": "keep a candidate only if it scores better on the user's earlier interactions (default), "
                "or always take the rewrite (the paper's setting)", "choices": tuple(ACCEPTANCE)})
    validation: int = field(default=3, metadata={"help": "earlier interactions every candidate is scored on", "min": 0})
    max_lm_calls: int = field(default=10, metadata={
        "help": "LM calls per user's alignment (a scoring pass is one)", "min": 1})

    def __post_init__(self):
        for setting in fields(self):
            value, rules = getattr(self, setting.name), setting.metadata
            if "choices" in rules and value not in rules["choices"]:
                raise ValueError(f"unknown {setting.name} {value!r}; choose {', '.join(rules['choices'])}")
            if "min" in rules and value < rules["min"]:
                raise ValueError(f"{setting.name} must be at least {rules['min']}")


class PersonaAlignment(VersionedTeleprompter):
    """Aligns a `PersonaProgram`'s persona with its user from their past interactions.

    `align(student, trainset=..., population=..., strength=..., answered=...)` takes the user's
    interactions, oldest first, as `past_interaction`s; `population` is the combination the user's
    evidence is shrunk toward (default: the plain LM) with `strength`; `answered` is the user's
    history as `answer_history` answered it, when a compile stage already did (else it is answered
    here). It returns every state tried (the one it started from first) as unnumbered
    `PersonaVersion`s with their scores and feedback, and where the time went (`Aligned`); `compile`
    returns the aligned program. `on_version` observes each version as it is made.
    """

    def __init__(self, n_recent: int = AlignmentConfig.n_recent, iterations: int = AlignmentConfig.iterations,
                 acceptance: str = AlignmentConfig.acceptance, reflection_lm: dspy.LM | None = None,
                 validation: int = AlignmentConfig.validation, max_lm_calls: int = AlignmentConfig.max_lm_calls,
                 on_version: Callable[[PersonaVersion], None] | None = None):
        AlignmentConfig(n_recent=n_recent, iterations=iterations, acceptance=acceptance, validation=validation,
                        max_lm_calls=max_lm_calls)  # refuses a bad setting
        self.n_recent, self.iterations, self.validation = n_recent, iterations, validation
        self.acceptance = ACCEPTANCE[acceptance]
        self.max_lm_calls = max_lm_calls
        self.reflection_lm = reflection_lm
        self.on_version = on_version  # an observer (a tracker): told of each version as it is made

    def windows(self, trainset: list) -> tuple[list, list, list]:
        """(older, validation, replays): the latest n to learn from, the window before them to
        validate on, sized to the budget (each iteration validates once), and what is older."""
        replays = trainset[-self.n_recent:]
        earlier = trainset[:-len(replays)] if replays else []
        # Calls: validation + replays, then per iteration one reflection and (validated) a validation
        # (a style: the window twice, within the same bound).
        per_iteration = self.validation if self.acceptance.validates else 0
        room = (self.max_lm_calls - len(replays) - self.iterations) // (1 + (self.iterations if per_iteration else 0))
        size = max(0, min(self.validation, len(earlier), room))
        return earlier[:len(earlier) - size], earlier[len(earlier) - size:], replays

    def answer_history(self, program: PersonaProgram, trainset: list[dspy.Example]) -> list[Answered]:
        """The validation window and the replays, answered by `program` as of their own times: what
        the adaptation learns from, and the population model from every user's (for a text computed
        from the history, the window without and with it: `ComputedStyle.answer_history`)."""
        return text_source(program.task, self.reflection_lm).answer_history(program, *self.windows(trainset))

    def align(self, student: PersonaProgram, *, trainset: list[dspy.Example], population: Combination | None = None,
              strength: float = DEFAULT_STRENGTH, answered: list[Answered] | None = None,
              text_effect: TextEffect | None = None, **_) -> Aligned:
        program = student.deepcopy()
        if not trainset:
            raise ValueError("alignment needs at least one past interaction with a known answer")
        if program.persona is None:
            raise ValueError("the student program has no persona to align (method must be 'persona')")
        task, timings = program.task, Timings()
        older, window, replays = self.windows(trainset)
        if answered is None:
            with timings.phase("history"):
                answered = self.answer_history(program, trainset)
        initial = [a for a in answered if not a.candidate]
        validated, replayed = initial[:len(window)], initial[len(window):]
        candidates = [a for a in answered if a.candidate]  # the window under a text answered with the history
        source = text_source(task, self.reflection_lm)
        acceptance = source.acceptance(self.acceptance, text_effect, candidates)
        current = score_answers(task, validated, _combination(program.persona))
        versions = [self._emit(program.snapshot(note="initial persona", **_scored(current)))]

        if task.labels:  # 3. the population model, adapted to this user's evidence
            with timings.phase("adaptation"):
                combination = adapt(task.labels, answered, population or Combination(), strength,
                                    use_bias=not task.has_candidates)
            program = program.with_persona(replace(program.persona, weights=combination.weights, bias=combination.bias))
            current = score_answers(task, validated, combination)
            note = (f"evidence weights and label offsets: the population model "
                    f"({'fitted on other users' if population else 'none: the plain LM'}), "
                    f"adapted to this user's {len(answered)} answered interactions")
            versions.append(self._emit(program.snapshot(note=note, **_scored(current))))

        for _ in range(self.iterations):  # 4-5. textual loss and gradient, rewrite, validate
            # No loss, no gradient; and a candidate that could not be accepted is not written: with
            # no window, or one on which even a perfect candidate would not pass the sign test.
            replay_score = score_answers(task, replayed, _combination(program.persona))
            if ((replay_score and replay_score.task == 1.0) or not acceptance.could_accept(current, len(window))
                    or not source.can_write(older)):
                break
            with timings.phase("reflection"):
                try:
                    # Without replays answered (a computed text's history), the feedback shows the window's.
                    candidate, feedback = source.rewrite(program, replayed or validated, older)
                except AdapterParseError as exc:
                    note = f"the reflection LM's output did not parse ({gist(str(exc).splitlines()[0], 200)})"
                    versions.append(self._emit(program.snapshot(accepted=False, note=note)))
                    continue
            trial = program.with_persona(candidate)
            problems = candidate.problems([ex.question for ex in replays],
                                          [r.output for r in program.memory.all() if r.output])
            if problems:
                versions.append(self._emit(trial.snapshot(feedback=feedback, accepted=False, note="; ".join(problems))))
                continue
            score = None
            if acceptance.validates and window:
                with timings.phase("validation"):
                    score = score_answers(task, candidates or answer_as_of(trial, window), _combination(candidate))
            accepted = acceptance.accept(score, current)
            versions.append(self._emit(trial.snapshot(
                feedback=feedback, accepted=accepted, note=acceptance.explain(accepted), **_scored(score))))
            if accepted:
                program, current = trial, score or current
            if not source.learns:  # another iteration would write the same text
                break
            if accepted and self.iterations > 1:
                with timings.phase("replay"):
                    replayed = answer_as_of(program, replays)
        return Aligned(versions, timings.seconds)


# ---------------------------------------------------------------- where a text candidate comes from

def answer_as_of(program: PersonaProgram, examples: list[dspy.Example]) -> list[Answered]:
    """Answer each interaction as of its own time, keeping every tool's evidence for refitting."""
    return [Answered(ex.question, str(ex.answer), str(pred.answer), pred.get("lm_scores"), pred.get("evidence") or {})
            for ex in examples for pred in [program(question=ex.question, as_of=ex.get("as_of"))]]


class TextSource(Protocol):
    """Where a persona text candidate comes from, and what that asks of the user's history."""

    reads_profile: bool  # whether writing a candidate reads the user's semantic profile
    learns: bool  # whether another iteration, on new answers, could write a different text

    def answer_history(self, program: PersonaProgram, older: list[dspy.Example], window: list[dspy.Example],
                       replays: list[dspy.Example]) -> list[Answered]:
        """What the alignment learns from, answered by `program` as of each interaction's own time."""

    def acceptance(self, default: Acceptance, text_effect: TextEffect | None,
                   candidates: list[Answered]) -> Acceptance:
        """How a candidate is accepted, given the configured strategy, the population's evidence on
        such texts, and the window answered under a candidate with the history (if it was)."""

    def can_write(self, older: list[dspy.Example]) -> bool:
        """Whether a candidate can be written from the history before the validation window."""

    def rewrite(self, program: PersonaProgram, cases: list[Answered],
                older: list[dspy.Example]) -> tuple[Persona, str]:
        """A candidate persona and its feedback (the textual gradient), from the answered `cases`."""


class ReflectedText:
    """The paper's textual loss and gradient: the reflection LM (default: the configured LM) compares
    the replayed answers with what the user really did, given computed facts, and rewrites the
    persona's text and the tools its answer call is shown."""

    reads_profile, learns = True, True

    def __init__(self, reflection_lm: dspy.LM | None = None):
        self.reflection_lm = reflection_lm

    def answer_history(self, program, older, window, replays):
        return answer_as_of(program, [*window, *replays])

    def acceptance(self, default, text_effect, candidates):
        return default

    def can_write(self, older):
        return True

    def rewrite(self, program, cases, older):
        task = program.task
        facts = f"{task.output_stats([r.output for r in program.memory.all()])}\nProfile: {program.profile.render()}"
        shown = "\n\n".join(f"Case {i}\nquestion: {gist(a.question, 300)}\n"
                             f"{miss(task, a, _combination(program.persona))}" for i, a in enumerate(cases, 1))
        tools = "\n".join(f"{name}: {tool.desc}" for name, tool in program.tools.items())
        with use_lm(self.reflection_lm) if self.reflection_lm else contextlib.nullcontext():
            out = dspy.Predict(ReflectOnAnswers)(task=task.description, persona=program.instructions,
                                                 user_facts=facts, cases=shown, tools=tools)
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


class ComputedStyle:
    """A text in the user's own style (a headline): the style their past texts show (`style_persona`),
    computed, not learned from answers (a 1.5B reflection LM described topics instead, on held-out
    LaMP-4 users), so it reads no profile and another iteration would compute the same text."""

    reads_profile, learns = False, False

    def answer_history(self, program, older, window, replays):
        """The window alone, then again under the text computed from the history before it: this
        user's paired items of the population's evidence on whether such a text pays. Replays would
        only be shown in its feedback (a third of a LaMP-4 compile's generations); the window's
        answers are shown instead."""
        answered = answer_as_of(program, window)
        texts = _past_texts(older)
        if window and texts:
            styled = program.with_persona(style_persona(program.persona, texts))
            answered += [replace(a, candidate=True) for a in answer_as_of(styled, window)]
        return answered

    def acceptance(self, default, text_effect, candidates):
        """Judged with the population's evidence where there is some (`PopulationBacked`), else alone."""
        return PopulationBacked(text_effect) if text_effect and candidates else default

    def can_write(self, older):
        return bool(_past_texts(older))

    def rewrite(self, program, cases, older):
        """The style of the user's texts before the window, and as feedback those texts' facts and
        how the answers in `cases` (the window's) missed them."""
        task, texts = program.task, _past_texts(older)
        shown = "\n\n".join(f"Case {i}\n{miss(task, a, Combination())}" for i, a in enumerate(cases, 1))
        return style_persona(program.persona, texts), f"{task.output_stats(texts)}\n\n{shown}"


def text_source(task, reflection_lm: dspy.LM | None = None) -> TextSource:
    """Where `task`'s persona text candidates come from: for a text in the user's own style, their
    style computed from their past texts; for any other answer, the reflection LM's rewrite."""
    return ComputedStyle() if task.styled else ReflectedText(reflection_lm)


CASING_RULES = {"Title Case": "Capitalize every major word (Title Case).",
                "sentence case": "Capitalize only the first word and names (sentence case).",
                "all caps": "Write in capital letters."}
MARK_WORDS = {"colon": "a colon", "question": "a question", "quotes": "a quotation", "digits": "numbers"}
HABITUAL = 0.3  # a mark in at least this share of a user's texts is a habit worth stating


def style_persona(persona: Persona, texts: list[str]) -> Persona:
    """`persona` stating the writing style of `texts` (the user's, before the validation window) as
    rules: length, casing and the punctuation they use habitually. No LM call, no topic, no copied text."""
    styles = [text_style(t) for t in texts if t]
    if not styles:
        raise ValueError("no past texts to learn a style from")
    length = sorted(st["words"] for st in styles)[len(styles) // 2]
    casing = Counter(st["casing"] for st in styles).most_common(1)[0][0]
    shares = {mark: sum(st[mark] for st in styles) / len(styles) for mark in MARK_WORDS}
    habits = [f"Often use {MARK_WORDS[m]} (in {share:.0%} of their past texts)." for m, share in shares.items()
              if share >= HABITUAL]
    avoided = [MARK_WORDS[m] for m, share in shares.items() if share == 0 and len(styles) >= 5]
    rules = [f"Write about {length} words.", CASING_RULES[casing], *habits]
    if avoided:
        rules.append(f"Never use {' or '.join(avoided)}.")
    return replace(persona, summary=f"Writes in a steady style of their own: about {length} words, {casing}.",
                   preferences=[], rules=rules)


def _past_texts(examples: list[dspy.Example]) -> list[str]:
    """The user's own texts in `examples` (their history before the validation window): what a style
    is computed from."""
    return [str(ex.answer) for ex in examples if str(ex.answer).strip()]


def miss(task, answered: Answered, combination: Combination) -> str:
    """An answered case as computed facts: the answers, and the size and direction of the miss (for
    generated text, how it differs from the real one in length, casing, punctuation and words)."""
    line = f"assistant's answer: {answered.answer}\nuser's real answer: {answered.gold}\n"
    if answered.answer.strip().lower() == answered.gold.strip().lower():
        return line + "result: match"
    if task.kind == "rating":
        try:
            gap = float(answered.gold) - float(answered.answer)
            return line + f"result: the assistant's rating was {abs(gap):g} {'too low' if gap > 0 else 'too high'}"
        except ValueError:
            pass
    if not task.labels:
        return line + f"result: miss (score {task.score(answered.answer, answered.gold):.2f})\n" + compare_texts(
            answered.answer, answered.gold, task.subject(answered.question))
    if answered.lm_scores is not None:
        distribution = combine(answered.lm_scores, answered.evidence, combination.weights, combination.bias)
        gold = distribution.get(task.normalize(answered.gold), 0.0)
        rank = sorted(distribution.values(), reverse=True).index(gold) + 1 if gold else len(distribution)
        return line + f"result: miss; the user's answer had probability {gold:.2f} (rank {rank} of {len(distribution)})"
    return line + f"result: miss (score {task.score(answered.answer, answered.gold):.2f})"
