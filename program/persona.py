"""The persona: the state of one user's compiled program, and its versions.

Its text is kept as fields an LM fills (summary, preferences, rules) and rendered into the
instruction of the user's program; keeping fields rather than free prose lets a small reflection
LM rewrite one part at a time, and lets `problems()` reject degenerate rewrites (empty, bloated,
copied from the examples, or naming their items). Beside the text, the choices the answer call
follows, made per user at compile time: which tools' results it is shown (`sources`, `k`), a few
demonstrations from the user's history (`demos`), how much each tool's evidence shifts the LM's
label distribution (`weights`, by tool name; "lm" weighs the LM itself), and each label's own
offset (`bias`): the population model adapted to the user (`optimizers.population`).
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import asdict, dataclass, field


MAX_CHARS = 1600
MAX_SUMMARY_CHARS = 400
MAX_COPIED_WORDS = 12  # a persona quoting this many consecutive words of an example has copied it
COPIED_ANSWER_WORDS = 5  # or this many of a past answer (a headline is about ten words)


def clean_text(text: str, limit: int = MAX_SUMMARY_CHARS) -> str:
    """Drop repeated sentences (small models loop) and cut at a sentence boundary within `limit`."""
    seen, kept = set(), []
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        key = re.sub(r"\W+", " ", sentence.lower()).strip()
        if key and key not in seen:
            seen.add(key)
            kept.append(sentence)
    out = ""
    for sentence in kept:
        if len(out) + len(sentence) + 1 > limit:
            break
        out = f"{out} {sentence}".strip()
    return out or text[:limit]


def clean_items(items: list[str], limit: int, width: int = 160) -> list[str]:
    """Non-empty, distinct, short items, at most `limit` of them."""
    out: list[str] = []
    for item in items:
        item = clean_text(item, width)
        if item and item.lower() not in (o.lower() for o in out):
            out.append(item)
    return out[:limit]


def gist(text: str, width: int) -> str:
    """A long text cut to `width` characters keeping its head and most of its tail: task prompts
    state their fixed instruction first and put what this case is about (the article, the review)
    last, so cutting the tail would leave every case looking the same."""
    if len(text) <= width:
        return text
    head = width // 4
    return f"{text[:head]} ... {text[-(width - head):]}"


def _pairs(text: str) -> set[str]:
    """Adjacent pairs of words of four letters or more: how an item's name ("nylon picks") looks."""
    words = re.findall(r"[a-z]+", text.lower())
    return {f"{a} {b}" for a, b in zip(words, words[1:]) if len(a) > 3 and len(b) > 3}


def named_items(text: str, examples: list[str]) -> list[str]:
    """Word pairs of `text` that one of the examples uses but not all of them (what all share is
    the task's own wording, such as "following review")."""
    if not examples:
        return []
    per_example = [_pairs(e) for e in examples]
    template = set.intersection(*per_example) if len(per_example) > 1 else set()
    specific = set().union(*per_example) - template
    return sorted(_pairs(text) & specific)


def copied_answer(text: str, answers: list[str], words: int = COPIED_ANSWER_WORDS) -> str | None:
    """A past answer of which `text` repeats `words` consecutive words (all of it, if it is
    shorter but has at least 4), or None."""
    written = " " + " ".join(re.findall(r"\w+", text.lower())) + " "
    for answer in answers:
        tokens = re.findall(r"\w+", str(answer).lower())
        span = min(words, len(tokens))
        if span < 4:
            continue
        if any(f" {' '.join(tokens[i:i + span])} " in written for i in range(len(tokens) - span + 1)):
            return answer
    return None


# Every program's instruction starts with this; a persona adds only what was learned about its user.
BASE_INSTRUCTION = "Answer the question. Use the tool results as evidence when they help."


@dataclass
class Persona:
    summary: str = ""
    preferences: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    k: int = 4  # as many past interactions as RAG shows
    demos: list[dict] = field(default_factory=list)  # {"question": ..., "answer": ...} from the user's history
    weights: dict[str, float] = field(default_factory=dict)
    bias: dict[str, float] = field(default_factory=dict)  # label -> offset added to its log-score

    def __post_init__(self):
        self.summary = clean_text(self.summary)
        self.preferences = clean_items(self.preferences, 6)
        self.rules = clean_items(self.rules, 4)

    @classmethod
    def initial(cls, sources: list[str] = ()) -> "Persona":
        """A new user's persona: no text yet (the program runs with the base instruction), only the
        tools it is shown. Neither the semantic profile nor a generic "act as this user" text is
        written in: a small model follows a stated preference ("prefers entertainment"), and even a
        role sentence, whatever the question. Text reaches the persona only through a rewrite (the
        reflection is shown the profile) that scores better on the user's own history."""
        return cls(sources=list(sources))

    @property
    def text(self) -> str:
        """What the LM wrote: the fields a rewrite changes."""
        return "\n".join([self.summary, *self.preferences, *self.rules])

    def render(self) -> str:
        """The instruction: the base instruction, then what was learned about the user, if anything."""
        lines = [BASE_INSTRUCTION]
        if self.summary:
            lines.append(f"About this user: {self.summary}")
        if self.preferences:
            lines.append("This user's preferences and habits:" + "".join(f"\n- {p}" for p in self.preferences))
        if self.rules:
            lines.append("How to answer for this user:" + "".join(f"\n- {r}" for r in self.rules))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    def problems(self, examples: list[str] = (), answers: list[str] = ()) -> list[str]:
        """Why this persona should not be used (empty list: it is fine). `examples`: the questions
        it was written from; `answers`: the user's past answers, which it must not copy (a past
        headline stated as the user's style would be copied into every answer)."""
        found = []
        named = named_items(self.text, examples)
        if named:
            found.append(f"persona names items from the examples instead of preferences ({', '.join(named[:3])})")
        if len(self.summary.split()) < 3:
            found.append("summary is empty or too short")
        text = self.render()
        if len(text) > MAX_CHARS:
            found.append(f"persona is {len(text)} characters, over {MAX_CHARS}")
        words = re.findall(r"\w+", text.lower())
        grams = {" ".join(words[i:i + MAX_COPIED_WORDS]) for i in range(len(words) - MAX_COPIED_WORDS + 1)}
        for example in examples:
            ex = re.findall(r"\w+", example.lower())
            if any(" ".join(ex[i:i + MAX_COPIED_WORDS]) in grams for i in range(len(ex) - MAX_COPIED_WORDS + 1)):
                found.append("persona copies example text verbatim")
                break
        copied = copied_answer(text, answers)
        if copied:
            found.append(f"persona copies a past answer ({gist(copied, 80)!r})")
        return found


@dataclass
class PersonaVersion:
    """One state of a user's program, as an optimizer ran it and the history keeps it: all that
    restores the program (`PersonaProgram.load_version`). Optimizers emit it unnumbered (0);
    `ProgramState.record` numbers it."""

    version: int
    persona: Persona
    instructions: dict[str, str]  # per predictor: what the program actually runs with (GEPA may rewrite each)
    score: float | None = None  # the task's mean score on the user's validation window
    feedback: str = ""
    accepted: bool = True
    note: str = ""
    created_at: float = field(default_factory=time.time)
    likelihood: float | None = None  # mean log-likelihood of the user's real answers on that window
    trigger: str = ""  # what made it: "compile", "align request", "online: ...", "rollback"

    @classmethod
    def from_dict(cls, payload: dict) -> "PersonaVersion":
        """A version as `asdict` wrote it (in `program.json`, in the stage log)."""
        return cls(**{**payload, "persona": Persona(**payload["persona"])})

    def diff(self, previous: "PersonaVersion") -> str:
        """What changed since `previous`: the instruction as a unified diff, then the compiled
        choices (tools shown, k, evidence weights, demonstrations) that differ."""
        lines = list(difflib.unified_diff(previous.instructions.get("answer", "").splitlines(),
                                          self.instructions.get("answer", "").splitlines(),
                                          f"v{previous.version}", f"v{self.version}", lineterm=""))
        for choice in ("sources", "k", "weights", "bias", "demos"):
            before, after = getattr(previous.persona, choice), getattr(self.persona, choice)
            if before != after:
                shown = (lambda v: f"{len(v or [])} demonstrations") if choice == "demos" else repr
                lines.append(f"{choice}: {shown(before)} -> {shown(after)}")
        return "\n".join(lines) or "no change"
