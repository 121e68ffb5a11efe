"""What runs per query: memory, tools, the persona and the answering program, the LM, the store.

Names are imported on first use, so `import personaagent.program.storage` (or the CLI's --help)
does not load llama.cpp, FAISS or torch."""

from importlib import import_module

_HOMES = {"METHODS": "agent", "PersonaProgram": "agent", "DEFAULT_LM": "lm", "make_lm": "lm", "use_lm": "lm",
          "EpisodicMemory": "memory", "Profile": "memory", "SemanticMemory": "memory", "Persona": "persona",
          "ProgramState": "store", "UserStore": "store"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
