"""Answering: the PersonaAgent (persona-instructed tool choice, then answer) and the baselines,
as one DSPy module over the same parts.

Methods (what differs is where the context comes from and which instruction is used):
- `none`: non-personalized, no context.
- `icl`: the user's k most recent interactions in context.
- `rag`: the user's k interactions most similar to the question.
- `membank`: the semantic profile plus retrieval, no tools.
- `react`: the agent chooses tools, under a generic instruction (no persona).
- `persona`: the agent chooses tools under the user's persona: PersonaAgent.

The agent spends two LM calls per answer: one to choose tools (and the memory query), one to
answer from their results. The tools themselves call no LM.
"""

from __future__ import annotations

from typing import Literal

import dspy

from ..data.tasks import TaskSpec
from .memory import EpisodicMemory, Profile
from .persona import Persona, gist

METHODS = ("none", "icl", "rag", "membank", "react", "persona")
GENERIC_INSTRUCTION = "Answer the question. Use the tool results as evidence when they help."


def answer_signature(task: TaskSpec, instructions: str) -> type[dspy.Signature]:
    return dspy.Signature(
        {
            "question": (str, dspy.InputField()),
            "context": (str, dspy.InputField(desc="what is known about this user, from memory and tools")),
            "answer": (task.answer_type, dspy.OutputField()),
        },
        instructions,
    )


def plan_signature(tool_names: list[str], instructions: str) -> type[dspy.Signature]:
    return dspy.Signature(
        {
            "question": (str, dspy.InputField()),
            "available_tools": (str, dspy.InputField(desc="name: what it returns")),
            "tools": (list[Literal[tuple(tool_names)]], dspy.OutputField(desc="the tools whose results help answer, most useful first")),
            "memory_query": (str, dspy.OutputField(desc="a few keywords to look up in the user's past interactions")),
        },
        instructions + "\nFirst choose which tools to call for this question.",
    )


class PersonaProgram(dspy.Module):
    """One user's program. Its instruction, the rendered persona, is what alignment optimizes."""

    def __init__(self, task: TaskSpec, memory: EpisodicMemory, profile: Profile, tools: list[dspy.Tool],
                 persona: Persona | None = None, method: str = "persona", k: int = 4):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if method == "persona" and persona is None:
            persona = Persona.from_profile(profile, task)
        self.task, self.memory, self.profile, self.method, self.k = task, memory, profile, method, k
        self.tools = {t.name: t for t in tools}
        self.answer = dspy.Predict(answer_signature(task, GENERIC_INSTRUCTION))
        self.plan = dspy.Predict(plan_signature(list(self.tools), GENERIC_INSTRUCTION)) if method in ("react", "persona") else None
        self.persona = None
        if persona is not None:
            self.set_persona(persona)

    def set_persona(self, persona: Persona) -> None:
        """The rendered persona becomes the instruction of every predictor of the program."""
        self.persona = persona
        text = persona.render(self.task)
        self.answer.signature = self.answer.signature.with_instructions(text)
        if self.plan is not None:
            self.plan.signature = plan_signature(list(self.tools), text)

    @property
    def instructions(self) -> str:
        return self.answer.signature.instructions

    def instructions_by_predictor(self) -> dict[str, str]:
        return {name: p.signature.instructions for name, p in self.named_predictors()}

    def load_instructions(self, instructions: dict[str, str]) -> None:
        """Restore saved instructions (an optimizer such as GEPA may have written each one)."""
        for name, predictor in self.named_predictors():
            if name in instructions:
                predictor.signature = predictor.signature.with_instructions(instructions[name])

    def forward(self, question: str, as_of: int | None = None) -> dspy.Prediction:
        """Answer `question`; `as_of` (replays only) hides the user's records from that one on."""
        trajectory: list[dict] = []
        with self.memory.as_of(as_of):
            context = self._context(question, trajectory)
        out = self.answer(question=question, context=context or "(nothing)")
        return dspy.Prediction(answer=out.answer, context=context, trajectory=trajectory)

    def _context(self, question: str, trajectory: list[dict]) -> str:
        if self.method == "none":
            return ""
        if self.method == "icl":
            return "\n".join(f"- {r.render()}" for r in self.memory.recent(self.k))
        if self.method in ("rag", "membank"):
            found = "\n".join(f"- {r.render()}" for r in self.memory.search(question, self.k))
            return f"Profile: {self.profile.render()}\nSimilar past interactions:\n{found}" if self.method == "membank" else found
        described = "\n".join(f"{name}: {tool.desc}" for name, tool in self.tools.items())
        # The plan needs the gist of the question, not all of it: a shorter prompt is a faster call.
        plan = self.plan(question=gist(question, 400), available_tools=described)
        parts = []
        for name in dict.fromkeys(plan.tools):  # each chosen tool once, in the order chosen
            tool = self.tools[name]
            args = {arg: (plan.memory_query or question) if arg == "query" else question for arg in tool.args}
            result = tool(**args)
            trajectory.append({"tool": name, "args": args, "result": result})
            parts.append(f"[{name}]\n{result}")
        return "\n\n".join(parts)
