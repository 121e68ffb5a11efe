"""Per-user persona optimizers (test-time alignment, GEPA for comparison) and the offline compile.

Names are imported on first use (`optimizers.tracking` stays light for the CLI)."""

from importlib import import_module

_HOMES = {"CompileConfig": "pipeline", "compile_users": "compile", "PersonaAlignment": "persona"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
