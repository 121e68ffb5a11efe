"""`CompileConfig` is the one source of the alignment and compile settings: the CLI's options, the
HTTP align request and the service's and the teleprompter's defaults are made from its fields, and
each compile stage's key holds only the settings that stage reads."""

import argparse
import inspect
from dataclasses import fields

import pytest

from personaagent.app.cli import build_parser
from personaagent.app.http import AlignRequest
from personaagent.app.service import PersonaService
from personaagent.data import SAMPLE_DIR, load
from personaagent.optimizers.pipeline import OPTIMIZERS, STAGE_SETTINGS, CompileConfig, stage_keys
from personaagent.optimizers.persona import ACCEPTANCE, PersonaAlignment

SETTINGS = {setting.name: setting for setting in fields(CompileConfig)}
# Each command's options that are not settings: what to compile or evaluate, where, how to run it.
OWN_OPTIONS = {
    "compile": {"help", "data", "store", "task", "users", "user", "workers", "engine", "address", "tracking_uri"},
    "eval": {"help", "data", "task", "methods", "users", "questions_per_user", "out", "tracking_uri", "name",
             "workers", "engine", "address"},
}


def _options(command: str) -> dict[str, argparse.Action]:
    parser = build_parser([command])
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices[command]._actions}


def test_every_setting_has_help_and_its_choices_come_from_the_registries():
    assert all(setting.metadata.get("help") for setting in SETTINGS.values())
    assert SETTINGS["optimizer"].metadata["choices"] == tuple(OPTIMIZERS)
    assert SETTINGS["acceptance"].metadata["choices"] == tuple(ACCEPTANCE)


@pytest.mark.parametrize("command", ["ask", "compile", "rollback", "serve", "demo", "eval"])
def test_every_settings_option_of_the_cli_is_made_from_compile_config(command):
    options = _options(command)
    for name, action in options.items():
        if name in SETTINGS:
            setting = SETTINGS[name]
            # `ask` answers with the LM the program was compiled with, unless told otherwise.
            default = None if (command, name) == ("ask", "lm") else setting.default
            flag = "--" + name.replace("_", "-")
            # A switch is --x/--no-x (argparse's type=bool would read "False" as true).
            assert action.option_strings == ([flag, "--no-" + flag[2:]] if isinstance(setting.default, bool) else [flag])
            assert (action.default, action.help, action.choices) == (
                default, setting.metadata["help"], setting.metadata.get("choices")), (command, name)
    if command in OWN_OPTIONS:  # a setting written into the command by hand is not one of its own
        assert set(options) - set(SETTINGS) == OWN_OPTIONS[command]


def test_the_http_align_request_is_made_from_compile_config():
    schema = AlignRequest.model_json_schema()["properties"]
    assert set(schema) <= set(SETTINGS)
    for name, prop in schema.items():
        setting = SETTINGS[name]
        assert prop["default"] == setting.default and prop["description"] == setting.metadata["help"]
        assert prop.get("enum") == (list(setting.metadata["choices"]) if "choices" in setting.metadata else None)
        assert prop.get("minimum") == setting.metadata.get("min")


def test_the_service_and_the_teleprompter_default_to_compile_config():
    align = inspect.signature(PersonaService.align).parameters
    assert {name for name in align if name in SETTINGS} == set(AlignRequest.model_fields)
    for function in (PersonaService.__init__, PersonaService.align, PersonaAlignment.__init__):
        for name, parameter in inspect.signature(function).parameters.items():
            if name in SETTINGS:
                assert parameter.default == SETTINGS[name].default, (function.__qualname__, name)


def test_every_setting_is_in_the_key_of_one_stage_or_changes_no_stage_output():
    staged = [name for names in STAGE_SETTINGS.values() for name in names]
    assert len(staged) == len(set(staged))
    # A persona carries its own k; max_versions only trims the history kept at the next save;
    # register_prompts only tells the tracker what to record; api_base, where the same model is served.
    assert set(SETTINGS) - set(staged) == {"k", "max_versions", "register_prompts", "api_base"}


def test_a_setting_changes_the_key_of_the_stage_that_reads_it_and_of_those_after():
    data = load(SAMPLE_DIR / "LaMP-3-amazon").select(1)
    user = next(iter(data.users.values()))
    before = stage_keys(CompileConfig(), data.task, user)

    def changed_stages(**setting) -> list[str]:
        after = stage_keys(CompileConfig(**setting), data.task, user)
        return [stage for stage in before if after[stage] != before[stage]]

    assert changed_stages(max_versions=5) == [] and changed_stages(k=2) == []
    assert changed_stages(lm="openai/other") == ["profile", "history", "align", "save"]
    assert changed_stages(n_recent=2) == changed_stages(acceptance="always") == ["history", "align", "save"]
    assert changed_stages(reflection_lm="openai/other") == changed_stages(gepa_budget=3) == ["align", "save"]
