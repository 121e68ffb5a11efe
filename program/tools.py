"""Personalized actions: tools bound to one user's memory, declared as `dspy.Tool`s.

Every tool reads only the memory of the user it was built for. None calls an LM.
"""

from __future__ import annotations

import re

import dspy

from ..data.tasks import TaskSpec
from .memory import EpisodicMemory, Profile

CANDIDATE = re.compile(r'\[(\d+)\]:\s*"([^"]+)"')


def build_tools(task: TaskSpec, memory: EpisodicMemory, profile: Profile, k: int = 4) -> list[dspy.Tool]:
    """The tools of one user: memory search, profile look-up, answer habits, and task tools."""

    def search_memory(query: str) -> str:
        """Find the user's past interactions most similar to the query, with the user's own answers."""
        records = memory.search(query, k)
        return "\n".join(f"- {r.render()}" for r in records) or "No past interactions."

    def read_profile() -> str:
        """Read the summary of this user's profile and stable preferences."""
        return profile.render()

    def answer_habits() -> str:
        """Statistics of the answers this user gave in the past (label counts, mean rating)."""
        return task.output_stats([r.output for r in memory.all()])

    tools = [dspy.Tool(search_memory), dspy.Tool(read_profile), dspy.Tool(answer_habits)]
    if task.name == "LaMP-1":
        tools.append(dspy.Tool(_citation_evidence(memory)))
    return tools


def _citation_evidence(memory: EpisodicMemory):
    def compare_candidates(question: str) -> str:
        """For each candidate paper in the question: has this author cited it before, and how close
        is it to the author's own past papers and citations."""
        candidates = CANDIDATE.findall(question)
        if not candidates:
            return "No candidates found in the question."
        cited = {t.strip().lower() for r in memory.all() if r.output for t in r.output.split(";")}
        lines = []
        for number, title in candidates:
            nearest = memory.search(title, 1)
            closeness = f"{nearest[0].score:.2f}" if nearest else "n/a"
            again = "yes" if title.strip().lower() in cited else "no"
            lines.append(f"[{number}] cited by this author before: {again}; similarity to the author's work: {closeness}")
        return "\n".join(lines)

    return compare_candidates
