"""Task specifications: what a task's answer is, how it is scored, and how a user's past item
becomes a replayable interaction (question, what the user really did).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

Kind = Literal["classification", "rating", "generation"]

LAMP_2M_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)
LAMP_2N_CATEGORIES = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
    "science & technology", "travel", "business", "crime", "education", "healthy living",
    "parents", "food & drink",
)


@dataclass(frozen=True)
class Interaction:
    """One thing a user did: the question they faced and what they answered (None if unknown)."""

    input: str
    output: str | None = None
    timestamp: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity of an interaction: the same input, output and time are the same interaction."""
        return hashlib.sha256(json.dumps([self.input, self.output, self.timestamp],
                                         ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- scoring

def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", str(text).lower())


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _f1(overlap: float, n_pred: int, n_gold: int) -> float:
    if overlap == 0 or n_pred == 0 or n_gold == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_gold
    return 2 * p * r / (p + r)


def rouge_1(pred: str, gold: str) -> float:
    p, g = _tokens(pred), _tokens(gold)
    return _f1(sum((Counter(p) & Counter(g)).values()), len(p), len(g))


def rouge_l(pred: str, gold: str) -> float:
    p, g = _tokens(pred), _tokens(gold)
    return _f1(_lcs(p, g), len(p), len(g))


def _as_rating(text: Any) -> float | None:
    match = re.search(r"-?\d+(\.\d+)?", str(text))
    return float(match.group()) if match else None


def macro_f1(preds: list[str], golds: list[str]) -> float:
    labels = set(golds) | set(preds)
    scores = []
    for label in labels:
        tp = sum(p == g == label for p, g in zip(preds, golds))
        scores.append(_f1(tp, sum(p == label for p in preds), sum(g == label for g in golds)))
    return sum(scores) / len(scores) if scores else 0.0


def most_likely(distribution: dict[str, float]) -> str:
    return max(distribution, key=distribution.get)


def median_rating(distribution: dict[str, float]) -> str:
    """The distribution's median: the answer with the least expected absolute error."""
    total = 0.0
    for label in sorted(distribution, key=lambda x: _as_rating(x) or 0.0):
        total += distribution[label]
        if total >= 0.5:
            return label
    return label


def same_order(inputs: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """A question whose options have no order to undo: asked once, labels as they are."""
    return [(inputs, {})]


# What `TaskSpec.metrics` reports per kind of task, the first being the headline.
METRICS = {"classification": ("accuracy", "macro_f1"), "rating": ("mae", "rmse"), "generation": ("rouge_l", "rouge_1")}


# ---------------------------------------------------------------- the spec

@dataclass(frozen=True)
class TaskSpec:
    """A task: its answer type, its metrics, and how profile items become interactions.

    `labels` fixes the answer to a closed set (a `Literal` in the signature); `None` means free text.
    `to_interaction` turns one raw profile item into an `Interaction` whose input is phrased like
    the task's questions, so the persona can be replayed on it; it returns None for items that
    cannot be replayed. Every item also goes to episodic memory as `to_memory(item)`: its content
    fields as the input and its output field as what the user did.
    """

    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...] | None
    to_interaction: Callable[[dict, list[dict]], Interaction | None]
    content_fields: tuple[str, ...]
    output_field: str | None
    # The ways to ask one question whose label scores are averaged (each with its map from the
    # asked labels back to the original ones), so an answer cannot depend on the options' order.
    orderings: Callable[[dict[str, Any]], list[tuple[dict[str, Any], dict[str, str]]]] = same_order
    # Where the item a question is about begins (the article, review or abstract after the task's
    # wording); None: the whole question is its subject.
    subject_marker: str | None = None
    # Whether the answer is a short text in the user's own style (a headline, a title, a tweet),
    # whose persona states that style; a chat reply or a label is not.
    styled: bool = False

    def to_memory(self, item: dict) -> Interaction:
        parts = [f"{name}: {item[name]}" for name in self.content_fields if item.get(name) not in (None, "")]
        output = item.get(self.output_field) if self.output_field else None
        if isinstance(output, list):
            output = "; ".join(_reference_titles(item)[:20]) or None
        return Interaction(" | ".join(parts), None if output in (None, "") else str(output),
                           _time(item), {"id": item.get("id")})

    def from_memory(self, record) -> dict | None:
        """The item `to_memory` made `record` (an `Interaction` or a memory record) from, as far as
        memory keeps it (LaMP-1: up to 20 of a paper's references); None for a record `to_memory`
        did not make (added as it is: a question and what the user answered)."""
        item: dict[str, Any] = {}
        for part in record.input.split(" | "):
            name = next((n for n in self.content_fields if n not in item and part.startswith(f"{n}: ")), None)
            if name:
                item[name] = part[len(name) + 2:]
            elif item:  # a value that holds the separator itself
                item[list(item)[-1]] += f" | {part}"
            else:
                return None
        if self.output_field and record.output is not None:
            # A list of references is kept as its titles (`to_memory`).
            item[self.output_field] = record.output.split("; ") if self.output_field == "references" else record.output
        if record.timestamp is not None:
            item["time"] = record.timestamp
        if record.metadata.get("id") is not None:
            item["id"] = record.metadata["id"]
        return item if self.to_memory(item).key == record.key else None

    def subject(self, question: str) -> str:
        """What memory is searched by: the item the question is about, without the task's wording.
        That wording is the same in every question (LaMP-2N's lists 29 categories), so searched
        for, it ranks past items by the template's words rather than by their content, and fills
        half of the embedder's window. On the first 8 users' last 40 history items each, the
        majority label of the 4 records found was right on 0.58 of LaMP-2N's (0.46 of LaMP-3's)
        searched by the whole question, 0.69 (0.49) by its subject."""
        if self.subject_marker:
            _, found, item = question.partition(self.subject_marker)
            if found and item.strip():
                return item.strip()
        return question

    @property
    def answer_type(self) -> Any:
        return Literal[self.labels] if self.labels else str  # type: ignore[valid-type]

    def with_labels(self, labels: tuple[str, ...]) -> "TaskSpec":
        return replace(self, labels=tuple(labels))

    @property
    def has_candidates(self) -> bool:
        """Whether each question lists candidates to choose between (LaMP-1): the candidate tools
        and the word-overlap baseline apply."""
        return self.orderings is swap_candidates

    def decide(self, distribution: dict[str, float]) -> str:
        """The answer a label distribution gives: its median for ratings (least absolute error),
        else its most likely label (most often right)."""
        return median_rating(distribution) if self.kind == "rating" else most_likely(distribution)

    def normalize(self, answer: Any) -> str:
        return str(answer).strip()

    def score(self, pred: Any, gold: str) -> float:
        """Per-example score in [0, 1]: what the alignment loop and GEPA maximize."""
        pred, gold = self.normalize(pred), self.normalize(gold)
        if self.kind == "classification":
            return float(pred.lower() == gold.lower())
        if self.kind == "rating":
            p, g = _as_rating(pred), _as_rating(gold)
            if p is None or g is None:
                return 0.0
            return max(0.0, 1.0 - abs(p - g) / 4.0)
        return rouge_l(pred, gold)

    def metrics(self, preds: list[Any], golds: list[str]) -> dict[str, float]:
        preds = [self.normalize(p) for p in preds]
        golds = [self.normalize(g) for g in golds]
        n = len(golds)
        if n == 0:  # nothing answered: no score, rather than a misleading 0
            return {**dict.fromkeys(METRICS[self.kind]), "n": 0}
        if self.kind == "classification":
            return {
                "accuracy": sum(p.lower() == g.lower() for p, g in zip(preds, golds)) / n,
                "macro_f1": macro_f1([p.lower() for p in preds], [g.lower() for g in golds]),
                "n": n,
            }
        if self.kind == "rating":
            errors = []
            for p, g in zip(preds, golds):
                pv, gv = _as_rating(p), _as_rating(g)
                # An unparseable rating counts as the worst error on a 1-5 scale.
                errors.append(4.0 if pv is None or gv is None else abs(pv - gv))
            return {"mae": sum(errors) / n, "rmse": math.sqrt(sum(e * e for e in errors) / n), "n": n}
        return {
            "rouge_1": sum(rouge_1(p, g) for p, g in zip(preds, golds)) / n,
            "rouge_l": sum(rouge_l(p, g) for p, g in zip(preds, golds)) / n,
            "n": n,
        }

    def output_stats(self, outputs: list[str]) -> str:
        """Facts about a user's past answers, computed without an LLM (label habits, mean rating)."""
        outputs = [self.normalize(o) for o in outputs if o is not None]
        if not outputs:
            return "No past answers recorded."
        if self.kind == "rating":
            values = [v for v in map(_as_rating, outputs) if v is not None]
            counts = Counter(int(v) for v in values)
            dist = ", ".join(f"{k}: {counts[k]}" for k in sorted(counts, reverse=True))
            return (f"{len(values)} past ratings, mean {sum(values) / len(values):.2f}; "
                    f"count per rating: {dist}.")
        if self.kind == "classification":
            # Habits are over the task's labels: a history whose outputs are not labels (a LaMP-1
            # paper's reference list) has none to report.
            labelled = [o for o in outputs if not self.labels or o in self.labels]
            if not labelled:
                return f"{len(outputs)} past items, none answered with one of this task's labels."
            dist = ", ".join(f"{label}: {c}" for label, c in Counter(labelled).most_common(8))
            return f"{len(labelled)} past answers; most frequent: {dist}."
        styles = [text_style(o) for o in outputs]
        lengths = sorted(st["words"] for st in styles)
        share = lambda key: f"{sum(bool(st[key]) for st in styles) / len(styles):.0%}"  # noqa: E731
        casings = Counter(st["casing"] for st in styles).most_common()
        return (f"{len(outputs)} past texts: median {lengths[len(lengths) // 2]} words (from {lengths[0]} to "
                f"{lengths[-1]}); casing: " + ", ".join(f"{c} {n / len(styles):.0%}" for c, n in casings)
                + f"; with a colon {share('colon')}, a question mark {share('question')}, quotes {share('quotes')}, "
                f"digits {share('digits')}.")


# ---------------------------------------------------------------- style of generated text

QUOTES = "'\"\u2018\u2019\u201c\u201d"
MARKS = {"colon": "colon", "question": "question mark", "quotes": "quotes", "digits": "digits"}


def text_style(text: str) -> dict:
    """What a headline's form shows: its length in words, casing and punctuation."""
    words = [w for w in str(text).split() if w[:1].isalpha()]
    capitalized = sum(w[:1].isupper() for w in words) / len(words) if words else 0.0
    casing = ("all caps" if words and all(w.isupper() for w in words) else "Title Case" if capitalized >= 0.6
              else "sentence case")
    return {"words": len(str(text).split()), "casing": casing, "colon": ":" in text, "question": "?" in text,
            "quotes": any(q in text for q in QUOTES), "digits": any(c.isdigit() for c in text)}


def compare_texts(generated: str, real: str, source: str) -> str:
    """How a generated text differs from the user's real one, as computed facts: length, casing,
    punctuation, and the words the user kept from the source and added to it."""
    mine, theirs = text_style(generated), text_style(real)
    marks = [name for name in MARKS if mine[name] != theirs[name]]
    source_words = set(_tokens(source))
    real_words = list(dict.fromkeys(_tokens(real)))
    kept = [w for w in real_words if w in source_words]
    added = [w for w in real_words if w not in source_words]
    return "\n".join([
        f"length: the assistant wrote {mine['words']} words, the user {theirs['words']}",
        f"casing: the assistant {mine['casing']}, the user {theirs['casing']}",
        "punctuation: " + ("; ".join(f"the user's {'has' if theirs[m] else 'has no'} {MARKS[m]}" for m in marks)
                           or "the same"),
        f"words the user kept from the source: {', '.join(kept[:8]) or 'none'}",
        f"words the user added: {', '.join(added[:8]) or 'none'}",
    ])


# ---------------------------------------------------------------- LaMP tasks

def _content_words(text: str) -> set[str]:
    """Words of four letters or more: what says what a title is about ("parsing", not "for")."""
    return {w for w in _tokens(text) if len(w) > 3}


def _stable_choice(key: str, options: list[str]) -> str:
    return options[zlib.crc32(key.encode()) % len(options)]


def _citation_interaction(item: dict, profile: list[dict]) -> Interaction | None:
    """A past paper becomes a two-choice citation question: one of its own references against a
    title the author had not cited by then (they cite it only in this paper's time or later), the
    one of those that shares the fewest words with the paper's title.

    Replayed as of the paper's time, the question then looks like the real task's, whose other
    candidate is a paper the author has not cited: a title already cited in earlier work would be
    the one the author's history points to, and would teach the user's program to distrust it. And
    the real task's other candidate is an unrelated paper (in the shared LaMP-1 data it is never
    among the author's references, while the cited one is in 130 of 414 questions): a later
    reference on the paper's own topic would be a harder question than any the user is asked, on
    which the LM's judgment of topic is worth nothing (on 12 users the LM was right on 53% of such
    replays and on 71% of the real questions), so the evidence weights learned from the replays
    would not hold for the questions. Both titles come from the same user's history, so no other
    user's data enters the question."""
    cited = _reference_titles(item)
    if not cited:
        return None
    own, when = set(cited), _time(item)
    # A paper without a time is not known to be earlier.
    earlier = {t for p in profile if when is not None and (_time(p) if _time(p) is not None else when) < when
               for t in _reference_titles(p)}
    elsewhere = sorted({t for p in profile for t in _reference_titles(p)} - own - earlier)
    if not elsewhere:
        return None
    key = str(item.get("id", item.get("title")))
    words = _content_words(item["title"])
    shared = {title: len(words & _content_words(title)) for title in elsewhere}
    fewest = min(shared.values())
    positive = _stable_choice(key, cited)
    negative = _stable_choice(key + "/neg", [t for t in elsewhere if shared[t] == fewest])
    first_is_positive = zlib.crc32(key.encode()) % 2 == 0
    a, b = (positive, negative) if first_is_positive else (negative, positive)
    question = (f'For an author who has written the paper with the title "{item["title"]}", which '
                f'reference is related? Just answer with [1] or [2] without explanation. '
                f'[1]: "{a}" [2]: "{b}"')
    return Interaction(question, "[1]" if first_is_positive else "[2]", _time(item), {"id": item.get("id")})


CANDIDATES = re.compile(r'\[(\d+)\]: "([^"]*)"')
PAPER_TITLE = re.compile(r'the paper with the title "(.*)", which reference')  # a citation question's own paper


def swap_candidates(inputs: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """A two-choice question asked in both orders: the swapped one lists the second candidate
    first under the first number. The label map turns the swapped answer back into the original's.
    Other inputs stay as they are: what they say of the candidates must not depend on the order
    (tools name candidates by title)."""
    question = str(inputs["question"])
    found = CANDIDATES.findall(question)
    if len(found) != 2:
        return same_order(inputs)
    (a_no, a_text), (b_no, b_text) = found
    swapped = CANDIDATES.sub(lambda m: f'[{m.group(1)}]: "{b_text if m.group(1) == a_no else a_text}"', question)
    return [(inputs, {}), ({**inputs, "question": swapped}, {f"[{a_no}]": f"[{b_no}]", f"[{b_no}]": f"[{a_no}]"})]


def _reference_titles(item: dict) -> list[str]:
    """References as LaMP-format files list them: plain titles, or records with a title."""
    refs = item.get("references") or []
    return [t for t in (r if isinstance(r, str) else r.get("title") for r in refs) if t]


def _time(item: dict) -> float | None:
    for key in ("time", "date", "year"):
        if key in item and item[key] is not None:
            value = item[key]
            if isinstance(value, (int, float)):
                return float(value)
            digits = re.sub(r"\D", "", str(value))[:8]
            return float(digits) if digits else None
    return None


def _categories_prompt(categories: tuple[str, ...], text: str) -> str:
    return ("Which category does this article relate to among the following categories? Just answer "
            "with the category name without further explanation. categories: ["
            + ", ".join(categories) + f"] article: {text}")


def _news_text(item: dict) -> str:
    return ". ".join(x for x in (item.get("title"), item.get("text")) if x)


def _news_interaction(categories: tuple[str, ...]) -> Callable[[dict, list[dict]], Interaction | None]:
    def convert(item: dict, _profile: list[dict]) -> Interaction | None:
        if not item.get("category"):
            return None
        return Interaction(_categories_prompt(categories, _news_text(item)), item["category"],
                           _time(item), {"id": item.get("id")})
    return convert


def _movie_interaction(item: dict, _profile: list[dict]) -> Interaction | None:
    if not item.get("tag"):
        return None
    question = ("Which tag does this movie relate to among the following tags? Just answer with the tag "
                "name without further explanation. tags: [" + ", ".join(LAMP_2M_TAGS)
                + f"] description: {item.get('description', '')}")
    return Interaction(question, item["tag"], _time(item), {"id": item.get("id")})


def _review_interaction(item: dict, _profile: list[dict]) -> Interaction | None:
    if item.get("score") in (None, ""):
        return None
    question = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                f"3, 4, or 5 without further explanation. review: {item.get('text', '')}")
    return Interaction(question, str(item["score"]).strip(), _time(item), {"id": item.get("id")})


def _generation_interaction(prompt: str, source: str, target: str) -> Callable[[dict, list[dict]], Interaction | None]:
    def convert(item: dict, _profile: list[dict]) -> Interaction | None:
        if not item.get(source) or not item.get(target):
            return None
        return Interaction(f"{prompt} {item[source]}", item[target], _time(item), {"id": item.get("id")})
    return convert


def _no_interaction(_item: dict, _profile: list[dict]) -> None:
    return None


LAMP_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("LaMP-1", "classification", "choose which of two papers the author would cite",
                 ("[1]", "[2]"), _citation_interaction, ("title", "abstract"), "references", swap_candidates),
        TaskSpec("LaMP-2N", "classification", "pick the category the journalist files an article under",
                 LAMP_2N_CATEGORIES, _news_interaction(LAMP_2N_CATEGORIES), ("title", "text"), "category",
                 subject_marker="article: "),
        TaskSpec("LaMP-2M", "classification", "pick the tag the user gives a movie",
                 LAMP_2M_TAGS, _movie_interaction, ("description",), "tag", subject_marker="description: "),
        TaskSpec("LaMP-3", "rating", "predict the star rating (1-5) the user gives with a review",
                 ("1", "2", "3", "4", "5"), _review_interaction, ("summary", "text"), "score",
                 subject_marker="review: "),
        TaskSpec("LaMP-4", "generation", "write the headline the journalist gives an article",
                 None, _generation_interaction("Generate a headline for the following article:", "text", "title"),
                 ("text",), "title", subject_marker="article:", styled=True),
        TaskSpec("LaMP-5", "generation", "write the title the author gives a paper abstract",
                 None, _generation_interaction("Generate a title for the following abstract of a paper:", "abstract",
                                               "title"),
                 ("abstract",), "title", subject_marker="paper:", styled=True),
        TaskSpec("LaMP-7", "generation", "paraphrase a tweet in the user's own style",
                 None, _no_interaction, ("text",), None, styled=True),
    )
}


def generic_task(kind: Kind, labels: tuple[str, ...] | None = None, name: str = "generic") -> TaskSpec:
    """A task for the user's own interaction logs: their input/output pairs replay as they are."""
    def convert(item: dict, _profile: list[dict]) -> Interaction | None:
        if item.get("output") in (None, ""):
            return None
        return Interaction(item["input"], str(item["output"]), item.get("timestamp"), item.get("metadata") or {})
    return TaskSpec(name, kind, "answer the way this user would", labels, convert, ("input",), "output")


def resolve_task(name: str) -> TaskSpec:
    """Map a task name as files spell it ('LaMP_2', 'LaMP-2N-huffpost', 'lamp3') to its spec."""
    match = re.fullmatch(r"lamp[-_ ]?(\d)([mn])?(?:[-_].*)?", name.strip().lower())
    if not match:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(LAMP_TASKS)}")
    key = f"LaMP-{match.group(1)}" + (match.group(2) or "").upper()
    if key == "LaMP-2":
        key = "LaMP-2N"
    if key not in LAMP_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(LAMP_TASKS)}")
    return LAMP_TASKS[key]


def task_to_dict(task: TaskSpec) -> dict:
    return {"name": task.name, "kind": task.kind, "labels": list(task.labels) if task.labels else None}


def task_from_dict(payload: dict) -> TaskSpec:
    labels = tuple(payload["labels"]) if payload.get("labels") else None
    if payload["name"] in LAMP_TASKS:
        spec = LAMP_TASKS[payload["name"]]
        return spec.with_labels(labels) if labels else spec
    return generic_task(payload["kind"], labels, payload["name"])
