from types import SimpleNamespace

import dspy

from personaagent.program.lm import _PrefixStates, _RecentStates, _has_free_text, _valid_json, stream_reply

ANSWER = {"type": "object", "properties": {"answer": {"enum": ["1", "2"]}}, "required": ["answer"]}
PLAN = {"type": "object", "properties": {"tools": {"type": "array", "items": {"enum": ["a", "b"]}},
                                         "query": {"type": "string"}}, "required": ["tools", "query"]}


def test_only_schemas_with_free_text_are_first_tried_without_a_grammar():
    assert not _has_free_text(ANSWER)
    assert _has_free_text(PLAN)


def test_output_is_valid_only_when_the_adapter_will_parse_it_into_the_schema():
    assert _valid_json('{"answer": "2"}', ANSWER)
    assert _valid_json('```json\n{"tools": ["a"], "query": "strings"}\n```', PLAN)
    assert not _valid_json('{"answer": "3"}', ANSWER)  # not one of the labels
    assert not _valid_json('{"tools": ["c"], "query": "x"}', PLAN)
    assert not _valid_json("I think the answer is 2", ANSWER)


def test_kept_prefixes_stay_within_their_bytes_and_the_least_recently_used_go_first():
    def state(size):
        return SimpleNamespace(llama_state_size=size)

    states = _PrefixStates(capacity=10)
    kept = state(4)
    states.add((1, 2), kept)
    states.add((3, 4), state(4))
    assert states.longest([1, 2, 9], ends=[1, 2]) == (2, kept)  # (1, 2) is now the most recent
    states.add((5,), state(4))
    assert (1, 2) in states and (5,) in states and (3, 4) not in states and states.size == 8
    states.add((6,), state(11))  # over the capacity alone: not kept
    assert (6,) not in states and states.longest([3, 4], ends=[2]) is None


def test_a_conversations_new_state_replaces_its_last_so_each_conversation_keeps_one():
    """Four conversations taking turns in a cache of four states' bytes: each finds its previous turn's
    state, which the next turn's prompt extends up to its reply (0 is the turn marker; the reply,
    tokenized again from the client's text, parts from the generated tokens: 200 + user, not 100 + user)."""
    states = _RecentStates(4, is_control=lambda token: token == 0)
    conversations = {user: [user] for user in range(1, 5)}
    for turn in range(3):
        for user, tokens in conversations.items():
            if turn:  # what llama.cpp looks up for the next prompt (which also makes it the most recent)
                assert states[tokens + [0, 7]].tokens[:len(tokens) - 1] == tuple(tokens[:-1])
                tokens[-1] = 200 + user  # the reply as the client sent it back
            prompt = tokens + [0, turn + 10, 0]  # the new message, then the reply's turn marker
            states[prompt + [100 + user]] = SimpleNamespace(llama_state_size=1, tokens=tuple(prompt + [100 + user]))
            tokens[:] = prompt + [100 + user]
    assert len(states.cache_state) == 4 and {key[0] for key in states.cache_state} == set(conversations)
    states[[9, 0, 9]] = SimpleNamespace(llama_state_size=1, tokens=(9, 0, 9))  # another prompt: the least recent goes
    assert len(states.cache_state) == 4 and 1 not in {key[0] for key in states.cache_state}


class _RecordingEngine:
    """Keeps the request it is asked to stream."""

    def complete(self, request):
        raise AssertionError("a stream is not a completion")

    def stream(self, request):
        self.request = request
        yield from ()


def test_a_stream_is_asked_with_the_lms_generation_settings():
    """Reasoning models take `max_completion_tokens` (DSPy turns `max_tokens` into it for them)."""
    engine = _RecordingEngine()
    lm = dspy.LM("openai/served", engine=engine, cache=False, temperature=0.3, max_completion_tokens=7, seed=1)
    assert list(stream_reply(lm, [{"role": "user", "content": "hi"}])) == []
    config = engine.request.config
    assert (config.temperature, config.max_tokens, config.seed) == (0.3, 7, 1)


def test_demonstrations_are_formatted_as_dspys_json_adapter_formats_them():
    """The adapter's shortcut for text outputs changes no prompt (a changed prompt changes answers)."""
    from typing import Literal

    from dspy.adapters.json_adapter import JSONAdapter

    from personaagent.program.lm import CompactJSONAdapter

    class Rate(dspy.Signature):
        """Rate the review."""

        review: str = dspy.InputField()
        answer: Literal["1", "2"] = dspy.OutputField()
        why: str = dspy.OutputField()

    class DSPysFormatting(CompactJSONAdapter):
        format_field_with_value = JSONAdapter.format_field_with_value

    demos = [dspy.Example(review='Says "great" — ünïcode', answer="1", why="line\nbreak"),
             dspy.Example(review="Plain.", answer="2", why="")]
    inputs = {"review": "A new one."}
    assert CompactJSONAdapter().format(Rate, demos, inputs) == DSPysFormatting().format(Rate, demos, inputs)
