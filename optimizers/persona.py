"""Test-time persona alignment (the paper's method) as a DSPy teleprompter.

One iteration, for one user:
1. replay: run the program on the user's latest n interactions with the current persona;
2. textual loss: one critique call compares every answer with what the user really did and writes
   a note per case about the user's preferences;
3. textual gradient: the same call aggregates the notes into the change the persona needs;
4. update: one rewrite call fills the persona's fields from that feedback and from facts computed
   from the user's history (grounding a small reflection LM); a degenerate rewrite, or one the
   reflection LM could not write in the expected fields, is rejected and the persona kept.

With n=3 an iteration costs 2n calls to replay plus 2 to critique and rewrite; the `guarded`
acceptance policy replays the candidate too (2n more) and keeps it only if the score does not drop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Literal

import dspy
from dspy.teleprompt import Teleprompter
from dspy.utils.exceptions import AdapterParseError

from ..program.agent import PersonaProgram
from ..program.lm import use_lm
from ..program.persona import Persona, gist

Acceptance = Literal["always", "guarded"]


class CritiqueAnswers(dspy.Signature):
    """You review an assistant that answers on behalf of one user. For each case, compare the
    assistant's answer with the user's real answer and say what the real answer reveals about this
    user's preferences or habits. Then state the one change to the persona that would have made
    the answers match the user. Be specific to this user; do not restate the questions."""

    task: str = dspy.InputField()
    persona: str = dspy.InputField(desc="the persona the assistant followed")
    user_facts: str = dspy.InputField(desc="computed from the user's whole history")
    cases: str = dspy.InputField(desc="question, assistant's answer, user's real answer")
    notes: list[str] = dspy.OutputField(desc="one short note per case")
    gradient: str = dspy.OutputField(desc="the single most useful change to the persona, in one or two sentences")


class RewritePersona(dspy.Signature):
    """Rewrite the persona of an assistant that answers on behalf of one user, applying the
    feedback. Keep what is right, fix what the feedback says is wrong, and stay general: describe
    the user (not the assistant, not the cases) and how to answer for them, never specific
    questions or answers. Be brief: every sentence must say something new."""

    task: str = dspy.InputField()
    persona: str = dspy.InputField(desc="the current persona")
    user_facts: str = dspy.InputField(desc="computed from the user's whole history")
    feedback: str = dspy.InputField(desc="what the replayed answers got wrong about this user")
    summary: str = dspy.OutputField(desc="2-4 sentences about this user")
    preferences: list[str] = dspy.OutputField(desc="3-6 short, concrete preferences or habits")
    rules: list[str] = dspy.OutputField(desc="1-4 rules for answering as this user would")


@dataclass
class AlignmentStep:
    """One persona version produced by alignment, with the evidence that produced it."""

    iteration: int
    persona: Persona
    score: float | None  # mean replay score of this persona on the n interactions (None: not replayed)
    feedback: str = ""
    accepted: bool = True
    note: str = ""


@dataclass
class Replay:
    question: str
    answer: str
    gold: str
    score: float


class PersonaAlignment(Teleprompter):
    """Aligns a `PersonaProgram`'s persona with its user from their latest interactions.

    `compile(student, trainset=...)` takes the user's interactions as `dspy.Example(question,
    answer[, as_of])`, uses the latest `n_recent`, and returns an aligned copy whose `alignment`
    attribute lists every persona version with its score and feedback.
    """

    def __init__(self, n_recent: int = 3, iterations: int = 1, acceptance: Acceptance = "always",
                 reflection_lm: dspy.LM | None = None, on_step: Callable[[AlignmentStep], None] | None = None):
        if n_recent < 1 or iterations < 1:
            raise ValueError("n_recent and iterations must be at least 1")
        if acceptance not in ("always", "guarded"):
            raise ValueError(f"acceptance must be 'always' or 'guarded', not {acceptance!r}")
        self.n_recent, self.iterations, self.acceptance = n_recent, iterations, acceptance
        self.reflection_lm = reflection_lm
        self.on_step = on_step
        self.critique = dspy.Predict(CritiqueAnswers)
        self.rewrite = dspy.Predict(RewritePersona)

    def compile(self, student: PersonaProgram, *, trainset: list[dspy.Example], **_) -> PersonaProgram:
        program = student.deepcopy()
        examples = trainset[-self.n_recent:]
        if not examples:
            raise ValueError("alignment needs at least one past interaction with a known answer")
        if program.persona is None:
            raise ValueError("the student program has no persona to align (method must be 'persona')")
        task = program.task
        facts = f"{task.output_stats([r.output for r in program.memory.all()])}\nProfile: {program.profile.render()}"
        replays = self._replay(program, examples)
        steps = [self._record(AlignmentStep(0, program.persona, _mean(replays), note="initial persona"))]
        for iteration in range(1, self.iterations + 1):
            try:
                feedback = self._feedback(program, facts, replays)
                candidate, problems = self._rewrite(program, facts, feedback, examples)
            except AdapterParseError as exc:
                # A small reflection LM can ramble past its token limit: a rejected step, not a
                # failed user (an unreachable LM still fails the compile, to be run again later).
                note = f"the reflection LM's output did not parse ({gist(str(exc).splitlines()[0], 200)})"
                steps.append(self._record(AlignmentStep(iteration, program.persona, None, "", False, note)))
                continue
            if problems:
                steps.append(self._record(AlignmentStep(iteration, candidate, None, feedback, False, "; ".join(problems))))
                continue
            if self.acceptance == "always":
                program.set_persona(candidate)
                # The next iteration replays the new persona; the last one is scored by whoever evaluates.
                replays = self._replay(program, examples) if iteration < self.iterations else []
                steps.append(self._record(AlignmentStep(iteration, candidate, _mean(replays) if replays else None, feedback)))
                continue
            trial = program.deepcopy()
            trial.set_persona(candidate)
            trial_replays = self._replay(trial, examples)
            accepted = _mean(trial_replays) >= _mean(replays)
            if accepted:
                program, replays = trial, trial_replays
            steps.append(self._record(AlignmentStep(iteration, candidate, _mean(trial_replays), feedback, accepted,
                                                    "" if accepted else "replayed score dropped")))
        program.alignment = steps
        return program

    # ------------------------------------------------------------------ steps

    def _record(self, step: AlignmentStep) -> AlignmentStep:
        if self.on_step:
            self.on_step(step)
        return step

    @staticmethod
    def _replay(program: PersonaProgram, examples: list[dspy.Example]) -> list[Replay]:
        replays = []
        for ex in examples:
            pred = program(question=ex.question, as_of=ex.get("as_of"))
            replays.append(Replay(ex.question, str(pred.answer), str(ex.answer), program.task.score(pred.answer, ex.answer)))
        return replays

    def _reflect(self):
        return use_lm(self.reflection_lm) if self.reflection_lm else contextlib.nullcontext()

    def _feedback(self, program: PersonaProgram, facts: str, replays: list[Replay]) -> str:
        cases = "\n\n".join(
            f"Case {i}\nquestion: {gist(r.question, 500)}\nassistant's answer: {r.answer}\n"
            f"user's real answer: {r.gold} ({'match' if r.score >= 1 else 'mismatch'})"
            for i, r in enumerate(replays, 1)
        )
        with self._reflect():
            out = self.critique(task=program.task.description, persona=program.instructions, user_facts=facts, cases=cases)
        notes = "".join(f"\n- {n}" for n in out.notes if n.strip())
        return f"{out.gradient.strip()}\nNotes on the replayed cases:{notes}"

    def _rewrite(self, program: PersonaProgram, facts: str, feedback: str,
                 examples: list[dspy.Example]) -> tuple[Persona, list[str]]:
        with self._reflect():
            out = self.rewrite(task=program.task.description, persona=program.instructions, user_facts=facts, feedback=feedback)
        candidate = Persona(
            out.summary.strip(),
            [p.strip() for p in out.preferences if p.strip()][:6],
            [r.strip() for r in out.rules if r.strip()][:4] or program.persona.rules,
        )
        return candidate, candidate.problems(program.task, [ex.question for ex in examples])


def _mean(replays: list[Replay]) -> float:
    return sum(r.score for r in replays) / len(replays) if replays else 0.0
