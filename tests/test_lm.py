from personaagent.program.lm import _has_free_text, _valid_json

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
