"""The `personaagent` commands that live here, above the app. pyproject.toml declares each as a
`personaagent.commands` entry point, which the CLI calls with its subcommands and `when_named` (it
adds options only to the command being run): so the app never imports experiments/. This module
stays light, as the CLI's `--help` loads it."""


def eval_command(commands, when_named) -> None:
    parser = commands.add_parser("eval", help="compare methods on the same users",
                                 description="Run every method on the same users' held-out questions; "
                                             "writes results.json, results.md and plots.")
    when_named(parser, _eval_options)  # they list every method, which loads the evaluation and the models


def _eval_options(parser) -> None:
    from .eval import add_arguments, run

    add_arguments(parser)
    parser.set_defaults(func=run)
