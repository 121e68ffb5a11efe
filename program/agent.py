"""Answering: the PersonaAgent and the baselines, as one DSPy module over the same parts.

Methods (`STRATEGIES`: what differs is where the context comes from and which instruction is used):
- `none`: non-personalized, no context.
- `icl`: the user's k most recent interactions in context.
- `rag`: the user's k interactions most similar to the question.
- `membank`: the semantic profile plus retrieval, no tools.
- `react`: an LM call chooses tools, under a generic instruction (no persona), then one answers.
- `persona`: PersonaAgent: the user's persona is the instruction, and the choices compiled into it
  (tools shown, demonstrations, evidence weights) need no planning call: an answer is one LM call.

Every method answers a closed-set question from label likelihoods (`LabelPredict`), so all are
decoded the same way; the persona then weighs the LM's distribution against its tools' evidence
(`combine`) and decides: the most likely label, or a rating distribution's median.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

import dspy

from ..data.tasks import TaskSpec
from .answer import LabelPredict, normalized
from .memory import Cutoff, EpisodicMemory, Profile
from .persona import BASE_INSTRUCTION, Persona, PersonaVersion, gist
from .tools import build_evidence, build_tools, render_records, similar_records

LM_WEIGHT = "lm"
FEATURE_FLOOR = -20.0  # log-probabilities below this say "impossible" equally loudly
MAX_QUESTION_CHARS = 1200


def answer_signature(task: TaskSpec, instructions: str) -> type[dspy.Signature]:
    return dspy.Signature(
        {
            "question": (str, dspy.InputField()),
            "context": (str, dspy.InputField(desc="what is known about this user, from memory and tools")),
            "answer": (task.answer_type, dspy.OutputField()),
        },
        instructions,
    )


def answer_module(task: TaskSpec, instructions: str) -> dspy.Predict:
    """Label likelihoods for a closed set of answers (asked in every order the task lists),
    generation for free text."""
    signature = answer_signature(task, instructions)
    return (LabelPredict(signature, orderings=task.orderings, decide=task.decide) if task.labels
            else dspy.Predict(signature))


def plan_signature(tool_names: list[str], instructions: str) -> type[dspy.Signature]:
    return dspy.Signature(
        {
            "question": (str, dspy.InputField()),
            "available_tools": (str, dspy.InputField(desc="name: what it returns")),
            "tools": (list[Literal[tuple(tool_names)]],
                      dspy.OutputField(desc="the tools whose results help answer, most useful first")),
            "memory_query": (str, dspy.OutputField(desc="a few keywords to look up in the user's past interactions")),
        },
        instructions + "\nFirst choose which tools to call for this question.",
    )


def combine(lm_scores: dict[str, float], evidence: dict[str, dict[str, float] | None],
            weights: dict[str, float], bias: dict[str, float] | None = None) -> dict[str, float]:
    """The label distribution ∝ exp(b_label) × p_LM^w_lm × Π p_tool^w_tool (a product of experts; a
    tool without evidence for this question, or with no weight, does not count). Log-probabilities
    are floored at `FEATURE_FLOOR`, as the population model is fitted."""
    bias = bias or {}
    log_scores = {label: weights.get(LM_WEIGHT, 1.0) * floored_log(p) + bias.get(label, 0.0)
                  for label, p in lm_scores.items()}
    for name, distribution in evidence.items():
        weight = weights.get(name, 0.0)
        if distribution and weight:
            for label in log_scores:
                log_scores[label] += weight * floored_log(distribution.get(label, 0.0))
    return normalized(log_scores)


def floored_log(p: float) -> float:
    return max(math.log(max(p, 1e-12)), FEATURE_FLOOR)


class PersonaProgram(dspy.Module):
    """One user's program. Its persona (instruction and compiled choices) is what alignment optimizes."""

    def __init__(self, task: TaskSpec, memory: EpisodicMemory, profile: Profile,
                 persona: Persona | None = None, method: str = "persona", k: int = 4):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        self.strategy = STRATEGIES[method]
        if self.strategy.follows_persona and persona is None:
            persona = Persona.initial(default_sources(task))
        self.task, self.memory, self.profile = task, memory, profile
        self._use_k(k)
        self.answer = answer_module(task, BASE_INSTRUCTION)
        self.plan = dspy.Predict(plan_signature(list(self.tools), BASE_INSTRUCTION)) if self.strategy.plans else None
        self.persona = None
        if persona is not None:
            self.set_persona(persona)

    def set_persona(self, persona: Persona) -> None:
        """The persona's text becomes the answer's instruction; its demos the answer's demos."""
        self.persona = persona
        self.answer.signature = self.answer.signature.with_instructions(persona.render())
        self.answer.demos = [dspy.Example(**demo) for demo in persona.demos]
        self._use_k(persona.k)

    def with_persona(self, persona: Persona) -> "PersonaProgram":
        """A copy of this program that follows `persona` (a candidate to try)."""
        trial = self.deepcopy()
        trial.set_persona(persona)
        return trial

    def snapshot(self, **fields) -> PersonaVersion:
        """This program's state as a version, not yet numbered (`fields`: its score, note...)."""
        return PersonaVersion(0, copy.deepcopy(self.persona), self.instructions_by_predictor(), **fields)

    def _use_k(self, k: int) -> None:
        """The tools (bound to this user's memory) return k past interactions."""
        self.k = k
        self.tools = {t.name: t for t in build_tools(self.task, self.memory, self.profile, k)}

    @property
    def instructions(self) -> str:
        return self.answer.signature.instructions

    def instructions_by_predictor(self) -> dict[str, str]:
        return {name: p.signature.instructions for name, p in self.named_predictors()}

    def load_version(self, version: PersonaVersion) -> None:
        """Restore a state `snapshot` made (as DSPy's `load_state`): its persona, and for a strategy
        that follows the persona the instructions compiled for it (an optimizer such as GEPA may
        have written each one)."""
        self.set_persona(version.persona)
        if self.strategy.follows_persona:
            for name, predictor in self.named_predictors():
                if name in version.instructions:
                    predictor.signature = predictor.signature.with_instructions(version.instructions[name])

    def forward(self, question: str, as_of: Cutoff | None = None) -> dspy.Prediction:
        """Answer `question`; `as_of` (replays only) shows memory as it was before that interaction."""
        trajectory: list[dict] = []
        with self.memory.as_of(as_of):
            context = self.strategy.context(self, question, trajectory)
        evidence = self.evidence(question, as_of)
        # A very long input (a 6,000-character review) costs minutes on a small CPU model and adds
        # little: the answer sees its head and most of its tail.
        out = self.answer(question=gist(question, MAX_QUESTION_CHARS), context=context or "(nothing)")
        if not self.task.labels:
            return dspy.Prediction(answer=out.answer, context=context, trajectory=trajectory)
        distribution = (combine(out.label_scores, evidence, self.persona.weights, self.persona.bias) if self.persona
                        else out.label_scores)
        answer = self.task.decide(distribution)
        return dspy.Prediction(answer=answer, label_scores=distribution, confidence=distribution[answer],
                               lm_scores=out.label_scores, evidence=evidence, scoring=out.scoring,
                               context=context, trajectory=trajectory)

    def evidence(self, question: str, as_of: Cutoff | None = None) -> dict[str, dict[str, float] | None]:
        """Every tool's label distribution, from memory as of `as_of`, without an LM call (persona
        only: baselines trust the LM alone). Those the persona gives no weight do not change the
        answer, but alignment refits the weights from them."""
        if self.persona is None or not self.task.labels:
            return {}
        with self.memory.as_of(as_of):
            return {name: tool(question) for name, tool in build_evidence(self.task, self.memory, self.k).items()}

    def call_tools(self, names, question: str, trajectory: list[dict], query: str | None = None) -> str:
        """The named tools' results, each under its name, each call recorded in `trajectory`
        (`query`: what memory search looks up instead of the question)."""
        parts = []
        for name in dict.fromkeys(names):  # each tool once, in the order given
            if name not in self.tools:
                continue
            tool = self.tools[name]
            args = {arg: (query or question) if arg == "query" else question for arg in tool.args}
            result = tool(**args)
            trajectory.append({"tool": name, "args": args, "result": result})
            parts.append(f"[{name}]\n{result}")
        return "\n\n".join(parts)


# ---------------------------------------------------------------- the methods

@dataclass(frozen=True)
class Strategy:
    """A method: what it shows the LM beside the question (`context(program, question, trajectory)`,
    which records each tool it calls in `trajectory`), whether an LM call first plans which tools to
    call (`plans`), whether that context can show the semantic profile (`reads_profile`), and
    whether it follows a persona: the persona's text is the instruction, its sources the context and
    its weights combine the tools' evidence with the LM's label distribution (`follows_persona`)."""

    name: str
    context: Callable[[PersonaProgram, str, list[dict]], str]
    plans: bool = False
    reads_profile: bool = False
    follows_persona: bool = False


def _nothing(program: PersonaProgram, question: str, trajectory: list[dict]) -> str:
    return ""


def _recent(program: PersonaProgram, question: str, trajectory: list[dict]) -> str:
    return render_records(program.memory.recent(program.k), empty="")


def _similar(program: PersonaProgram, question: str, trajectory: list[dict]) -> str:
    return render_records(similar_records(program.task, program.memory, question, program.k), empty="")


def _profile_and_similar(program: PersonaProgram, question: str, trajectory: list[dict]) -> str:
    return f"Profile: {program.profile.render()}\nSimilar past interactions:\n{_similar(program, question, trajectory)}"


def _planned_tools(program: PersonaProgram, question: str, trajectory: list[dict]) -> str:
    described = "\n".join(f"{name}: {tool.desc}" for name, tool in program.tools.items())
    # The plan needs the gist of the question, not all of it: a shorter prompt is a faster call.
    plan = program.plan(question=gist(question, 400), available_tools=described)
    return program.call_tools(plan.tools, question, trajectory, plan.memory_query)


def _persona_sources(program: PersonaProgram, question: str, trajectory: list[dict]) -> str:
    return program.call_tools(program.persona.sources, question, trajectory)


STRATEGIES: dict[str, Strategy] = {strategy.name: strategy for strategy in (
    Strategy("none", _nothing),
    Strategy("icl", _recent),
    Strategy("rag", _similar),
    Strategy("membank", _profile_and_similar, reads_profile=True),
    Strategy("react", _planned_tools, plans=True, reads_profile=True),
    Strategy("persona", _persona_sources, follows_persona=True),
)}
METHODS = tuple(STRATEGIES)


def default_sources(task: TaskSpec) -> list[str]:
    """What a new user's answer call is shown before alignment chooses. A classification or free
    text: their most similar past interactions, as RAG would; a rating or a two-candidate choice:
    the question alone. A small model copies what it is shown: past reviews' scores, the majority
    label, the mean rating, or which candidate shares more words with the author's work (on 16
    LaMP-1 users, showing that comparison took accuracy from 0.81 to 0.56; showing rating habits
    took the first LaMP-3 users' MAE from 0.25 to 0.75). Such signals enter as evidence instead,
    whose weight alignment fits on the user's own history (`combine`). Free text: also their
    profile (semantic memory), which has no label to be biased towards, except for a text in the
    user's own style (a headline), whose persona text states that style: there the profile, a
    summary of topics, is copied into the text (on the first LaMP-4 users, ROUGE-L 0.091 with it
    against 0.121 for the same similar past interactions without it, 32 questions; 0.110 against
    0.121 on 16)."""
    if not task.labels:
        return ["search_memory"] if task.styled else ["read_profile", "search_memory"]
    return [] if task.kind == "rating" or task.has_candidates else ["search_memory"]


# Ablations of the paper, applied to a loaded persona program (each returns it changed).
def without_persona(program: PersonaProgram) -> PersonaProgram:
    """The compiled choices, under the generic instruction instead of the persona's text."""
    program.answer.signature = program.answer.signature.with_instructions(BASE_INSTRUCTION)
    return program


def without_memory(program: PersonaProgram) -> PersonaProgram:
    """No episodic or semantic memory: every tool reads memory, so no tool, demo or evidence;
    the persona's text alone."""
    program.set_persona(replace(program.persona, sources=[], demos=[], weights={}, bias={}))
    return program


def without_actions(program: PersonaProgram) -> PersonaProgram:
    """No tool is called: no tool results in the prompt and no tool evidence; text and demos stay."""
    program.set_persona(replace(program.persona, sources=[], weights={}))
    return program


ABLATIONS: dict[str, Callable[[PersonaProgram], PersonaProgram]] = {
    "nopersona": without_persona, "nomemory": without_memory, "noaction": without_actions}
