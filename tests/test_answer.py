"""Answering from label likelihoods: the scorers, the decision, and order invariance (fake LMs;
the real engine is tested in test_end_to_end)."""

import json

import dspy
from dspy.lm15 import Message, Response, TextPart, TokenLogprob, TopLogprob, Usage

from personaagent.data.tasks import LAMP_TASKS, median_rating, swap_candidates
from personaagent.program.agent import answer_module
from personaagent.program.lm import UsageMeter, use_lm
from personaagent.program.persona import BASE_INSTRUCTION
from personaagent.program.testing import FakeEngine, fake_lm


CITATION = LAMP_TASKS["LaMP-1"]
QUESTION = ('For an author who has written the paper with the title "Parsing with neural nets", which reference is '
            'related? Just answer with [1] or [2] without explanation. [1]: "A survey of cooking" [2]: "Neural parsing"')


def _prefers(text: str):
    """A position-blind LM that prefers the candidate mentioning `text`, wherever it is listed."""
    def answer(prompt: str) -> str:
        question = prompt.split("[[ ## question ## ]]")[-1]
        first = question.split("[1]: ")[-1].split("[2]: ")[0]
        return "[1]" if text in first else "[2]"
    return answer


def test_label_scores_are_a_distribution_from_one_call_per_order():
    lm = fake_lm({"answer": _prefers("Neural parsing")})
    with use_lm(lm), UsageMeter(lm) as usage:
        pred = answer_module(CITATION, BASE_INSTRUCTION)(question=QUESTION, context="(nothing)")
    assert pred.answer == "[2]" and pred.scoring == "likelihood"
    assert abs(sum(pred.label_scores.values()) - 1) < 1e-9 and pred.confidence == pred.label_scores["[2]"] > 0.9
    assert usage.calls == 2  # the question in both orders
    assert any('[1]: "Neural parsing" [2]: "A survey of cooking"' in r for r in lm.engine.requests)


def test_a_label_answer_is_in_dspys_trace_for_optimizers_that_learn_from_it():
    module = answer_module(CITATION, BASE_INSTRUCTION)
    with use_lm(fake_lm({"answer": _prefers("Neural parsing")})), dspy.context(trace=[]):
        pred = module(question=QUESTION, context="(nothing)")
        (predictor, inputs, traced), = dspy.settings.trace
    assert predictor is module and inputs["question"] == QUESTION and traced.answer == pred.answer == "[2]"


def test_swapping_the_candidates_does_not_change_the_choice():
    swapped = QUESTION.replace('[1]: "A survey of cooking" [2]: "Neural parsing"',
                               '[1]: "Neural parsing" [2]: "A survey of cooking"')
    # A position-biased LM: it always prefers whatever is listed first, a little more when it is "parsing".
    def biased(prompt: str) -> str:
        return "[1]"
    module = answer_module(CITATION, BASE_INSTRUCTION)
    with use_lm(fake_lm({"answer": biased})):
        a, b = module(question=QUESTION, context=""), module(question=swapped, context="")
    # Pure position bias cancels out: no candidate is preferred, in either order.
    assert a.label_scores["[1]"] == a.label_scores["[2]"] == b.label_scores["[1]"]
    with use_lm(fake_lm({"answer": _prefers("Neural parsing")})):
        a, b = module(question=QUESTION, context=""), module(question=swapped, context="")
    assert (a.answer, b.answer) == ("[2]", "[1]")  # the same paper both times


def test_swap_candidates_swaps_the_question_and_nothing_else():
    (original, same), (swapped, relabel) = swap_candidates({"question": QUESTION, "context": "tool results"})
    assert original["question"] == QUESTION and same == {}
    assert '[1]: "Neural parsing" [2]: "A survey of cooking"' in swapped["question"]
    assert swapped["context"] == "tool results" and relabel == {"[1]": "[2]", "[2]": "[1]"}
    assert swap_candidates({"question": "no candidates here"}) == [({"question": "no candidates here"}, {})]


def test_a_rating_is_the_distributions_median():
    assert median_rating({"1": 0.45, "2": 0.0, "3": 0.0, "4": 0.1, "5": 0.45}) == "4"
    assert median_rating({"1": 0.1, "2": 0.1, "3": 0.1, "4": 0.2, "5": 0.5}) == "4"
    assert LAMP_TASKS["LaMP-3"].decide({"1": 0.3, "2": 0.0, "3": 0.0, "4": 0.0, "5": 0.7}) == "5"
    assert LAMP_TASKS["LaMP-2N"].decide({"politics": 0.4, "sports": 0.6}) == "sports"


class LogprobEngine(FakeEngine):
    """An LM that cannot score continuations but returns `top_logprobs`, as OpenAI-compatible servers do."""

    score = None
    supported_params = frozenset({"temperature", "max_tokens", "logprobs", "top_logprobs"})

    def complete(self, request):
        self.requests.append(request.config.logprobs)
        text = json.dumps({"answer": "4"}, indent=2)
        opening, rest = text.split('"4"')[0] + '"', '4"\n}'
        top = (TopLogprob("4", -0.2), TopLogprob("5", -1.8), TopLogprob("3", -3.0))
        tokens = (TokenLogprob(opening, 0.0), TokenLogprob("4", -0.2, top=top), TokenLogprob(rest[1:], 0.0))
        return Response(id="x", model="fake", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=10, output_tokens=3), logprobs=tokens)


def test_an_lm_with_top_logprobs_scores_the_labels_it_lists():
    lm = dspy.LM("fake/logprobs", engine=LogprobEngine(), cache=False)
    with use_lm(lm):
        pred = answer_module(LAMP_TASKS["LaMP-3"], BASE_INSTRUCTION)(question="review: fine", context="")
    assert pred.scoring == "logprobs" and lm.engine.requests == [20]
    assert pred.label_scores["4"] > pred.label_scores["5"] > pred.label_scores["3"] > pred.label_scores["1"]


class GeneratingEngine(FakeEngine):
    score = None  # neither scores continuations nor returns log-probabilities


def test_an_lm_without_likelihoods_falls_back_to_generation_and_says_so():
    lm = dspy.LM("fake/plain", engine=GeneratingEngine({"answer": "3"}), cache=False)
    with use_lm(lm):
        pred = answer_module(LAMP_TASKS["LaMP-3"], BASE_INSTRUCTION)(question="review: fine", context="")
    assert pred.scoring == "generation" and pred.answer == "3" and pred.confidence > 0.99


def test_the_candidate_tool_says_the_same_whichever_order_the_question_lists_them(tmp_path, embedder):
    from personaagent.data.tasks import Interaction
    from personaagent.program.store import UserStore

    store = UserStore(tmp_path, embedder)
    store.memory("ann").add([Interaction("title: Neural parsing of trees", "Neural parsing; Tree kernels", 1.0)])
    tool = next(t for t in store.build("ann", CITATION).tools.values() if t.name == "compare_candidates")
    (_, _), (swapped, _) = swap_candidates({"question": QUESTION})
    listed, reversed_ = tool(question=QUESTION), tool(question=swapped["question"])
    assert listed == reversed_ and '"Neural parsing": cited by this author before: yes' in listed
    store.close()


def test_a_new_authors_choice_is_asked_from_the_question_alone_with_the_comparison_as_evidence(tmp_path, embedder):
    # A small model follows a word-overlap comparison it is shown, so a new persona is not shown
    # it: the comparison is evidence, weighed only once alignment has fitted its weight.
    from personaagent.data.tasks import Interaction
    from personaagent.program.store import UserStore

    store = UserStore(tmp_path, embedder)
    store.memory("ann").add([Interaction("title: Neural parsing of trees", "Neural parsing; Tree kernels", 1.0)])
    lm = fake_lm({"answer": _prefers("A survey of cooking")})
    with use_lm(lm):
        pred = store.build("ann", CITATION)(question=QUESTION)
    assert pred.context == "" and not any("share of its words" in r for r in lm.engine.requests)
    assert pred.answer == "[1]"  # the LM's choice: the comparison has no weight yet
    assert pred.evidence["compare_candidates"]["[2]"] > pred.evidence["compare_candidates"]["[1]"]
    store.close()


def test_the_candidate_evidence_prefers_the_reference_on_the_papers_topic_where_history_is_silent(tmp_path, embedder):
    # A cited reference is on its paper's topic and an unrelated paper seldom is: where the author's
    # history has neither candidate's words, the question's own title still tells them apart.
    from personaagent.data.tasks import Interaction
    from personaagent.program.store import UserStore

    store = UserStore(tmp_path, embedder)
    store.memory("ann").add([Interaction("title: Bird songs of the Alps", "Alpine ecology", 1.0)])
    question = ('For an author who has written the paper with the title "Parsing with neural nets", which '
                'reference is related? Just answer with [1] or [2] without explanation. '
                '[1]: "A survey of cooking" [2]: "Neural dependency parsing"')
    with use_lm(fake_lm({"answer": _prefers("A survey of cooking")})):
        pred = store.build("ann", CITATION)(question=question)
    assert pred.evidence["compare_candidates"]["[2]"] > 0.9
    tool = next(t for t in store.build("ann", CITATION).tools.values() if t.name == "compare_candidates")
    assert "\"Neural dependency parsing\": cited by this author before: no; share of its words in the author's " \
           "work: 0.00; in this paper's title: 0.67" in tool(question=question)
    store.close()


def test_a_choice_asked_in_both_orders_falls_back_to_generation_for_both():
    lm = dspy.LM("fake/plain", engine=GeneratingEngine({"answer": _prefers("Neural parsing")}), cache=False)
    with use_lm(lm):
        pred = answer_module(CITATION, BASE_INSTRUCTION)(question=QUESTION, context="")
    assert pred.scoring == "generation" and pred.answer == "[2]"  # the same paper in both orders


def test_the_labels_are_listed_before_the_question_and_not_repeated_after_it():
    # What follows the question is evaluated on every call (no cached prefix reaches past it):
    # the reminder there names the answer field without its labels.
    task = LAMP_TASKS["LaMP-2N"]
    lm = fake_lm({"answer": "politics"})
    with use_lm(lm):
        pred = answer_module(task, BASE_INSTRUCTION)(question="An article about the election.", context="(nothing)")
    before, after = lm.engine.requests[-1].split("An article about the election.")
    assert pred.answer == "politics"
    assert all(label in before for label in task.labels)
    assert "`answer`" in after and not any(f"'{label}'" in after for label in task.labels)
