"""Personalized actions: tools bound to one user's memory, declared as `dspy.Tool`s.

Every tool reads only the memory of the user it was built for. None calls an LM. For a task with
a closed set of answers, a tool may also give its evidence as a label distribution
(`build_evidence`), which the user's program weighs against the LM's (`program.agent.combine`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import dspy

from ..data.tasks import CANDIDATES, PAPER_TITLE, TaskSpec
from .answer import normalized
from .memory import EpisodicMemory, MemoryRecord, Profile

Evidence = Callable[[str], dict[str, float] | None]
# Evidence that is the same for every question: a prior over the user's labels, not about the question.
PRIORS = frozenset({"answer_habits"})
SMOOTHING = 0.5  # pseudo-count of every label in a tool's distribution: no label is ever impossible
STOPWORDS = frozenset("""a an and are as at based by for from in into is of on or the to towards using via
with without""".split())


def similar_records(task: TaskSpec, memory: EpisodicMemory, query: str, k: int) -> list[MemoryRecord]:
    """The user's k past interactions most like what `query` is about (`TaskSpec.subject`): how
    every method and tool searches memory."""
    return memory.search(task.subject(query), k)


def render_records(records: list[MemoryRecord], empty: str = "No past interactions.") -> str:
    """Past interactions as the LM is shown them, one a line (`empty` when there are none)."""
    return "\n".join(f"- {r.render()}" for r in records) or empty


def build_tools(task: TaskSpec, memory: EpisodicMemory, profile: Profile, k: int = 4) -> list[dspy.Tool]:
    """The tools of one user: memory search, profile look-up, answer habits, and task tools."""

    def search_memory(query: str) -> str:
        """Find the user's past interactions most similar to the query, with the user's own answers."""
        return render_records(similar_records(task, memory, query, k))

    def read_profile() -> str:
        """Read the summary of this user's profile and stable preferences."""
        return profile.render()

    def answer_habits() -> str:
        """Statistics of the answers this user gave in the past (label counts, mean rating)."""
        return task.output_stats([r.output for r in memory.all()])

    tools = [dspy.Tool(search_memory), dspy.Tool(read_profile), dspy.Tool(answer_habits)]
    if task.has_candidates:
        tools.append(dspy.Tool(_citation_evidence(memory)))
    return tools


def _citation_evidence(memory: EpisodicMemory):
    def compare_candidates(question: str) -> str:
        """For each candidate paper in the question: has this author cited it before, and how many
        of its words the author's own past papers and citations use."""
        candidates = CANDIDATES.findall(question)
        if not candidates:
            return "No candidates found in the question."
        history, paper = author_history(memory.all()), paper_words(question)
        lines = []
        # Named by title, in alphabetical order: the result is the same whichever order the question
        # lists the candidates in, so it cannot carry that order into the answer.
        for title in sorted(title for _, title in candidates):
            overlap, again = word_overlap(title, history)
            lines.append(f'"{title}": cited by this author before: {"yes" if again else "no"}; '
                         f"share of its words in the author's work: {overlap:.2f}; "
                         f"in this paper's title: {share_used(title, paper):.2f}")
        return "\n".join(lines)

    return compare_candidates


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def author_history(records) -> tuple[Counter, set[str]]:
    """An author's vocabulary (words of their past titles and of the titles they cited) and the
    titles they cited, from their records (anything with `input` and `output`)."""
    words: Counter = Counter()
    cited = set()
    for record in records:
        titles = [t.strip() for t in (record.output or "").split(";") if t.strip()]
        cited.update(t.lower() for t in titles)
        for text in [record.input, *titles]:
            words.update(content_words(text))
    return words, cited


def share_used(title: str, vocabulary) -> float:
    """The share of a title's content words that `vocabulary` (a set or counter of words) has."""
    own = content_words(title)
    return sum(w in vocabulary for w in own) / len(own) if own else 0.0


def word_overlap(title: str, history: tuple[Counter, set[str]]) -> tuple[float, bool]:
    """The share of a candidate title's words the author has used, and whether they cited it before."""
    words, cited = history
    return share_used(title, words), title.strip().lower() in cited


def paper_words(question: str) -> set[str]:
    """The content words of the title of the paper a citation question is about (none if unnamed)."""
    match = PAPER_TITLE.search(question)
    return content_words(match.group(1)) if match else set()


def candidate_scores(question: str, history: tuple[Counter, set[str]],
                     paper: set[str] = frozenset()) -> dict[str, float] | None:
    """Each candidate's overlap with the author's history (1 more if they cited it before), plus
    its share of words in the question's own paper title (`paper_words`; none unless given), by label."""
    candidates = CANDIDATES.findall(question)
    if len(candidates) < 2:
        return None
    return {f"[{number}]": sum(map(float, word_overlap(title, history))) + share_used(title, paper)
            for number, title in candidates}


def build_evidence(task: TaskSpec, memory: EpisodicMemory, k: int = 4) -> dict[str, Evidence]:
    """Each tool's evidence as a distribution over the task's labels (None where it has none for
    a question), computed from the records memory shows at the time, without an LM."""
    labels = task.labels or ()

    def smoothed(counts: dict[str, float]) -> dict[str, float] | None:
        total = sum(counts.get(label, 0.0) for label in labels)
        if not labels or total == 0:
            return None
        return {label: (counts.get(label, 0.0) + SMOOTHING) / (total + SMOOTHING * len(labels)) for label in labels}

    def answer_habits(question: str) -> dict[str, float] | None:
        return smoothed(Counter(task.normalize(r.output) for r in memory.all() if r.output))

    def search_memory(question: str) -> dict[str, float] | None:
        return smoothed(Counter(task.normalize(r.output)
                                for r in similar_records(task, memory, question, k) if r.output))

    evidence: dict[str, Evidence] = {"answer_habits": answer_habits, "search_memory": search_memory}
    if task.has_candidates:
        def compare_candidates(question: str) -> dict[str, float] | None:
            # The author's history says what they cite; the question's own paper says what this paper is
            # about, and a reference is on its topic while an unrelated paper seldom is. Without an LM,
            # over all 414 questions of LaMP-1's 207 users (a tie counted as half), the history alone
            # chose right on 0.731, the paper's title alone on 0.708, both added on 0.789.
            scores = candidate_scores(question, author_history(memory.all()), paper_words(question))
            # Overlaps differ by tenths: a scale of 4 makes a full overlap about 50 times as likely as none.
            return None if scores is None else normalized({label: 4.0 * v for label, v in scores.items()})
        evidence["compare_candidates"] = compare_candidates
    return evidence
