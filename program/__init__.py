"""What runs per query: memory, tools, the persona and the answering program, the LM, the store."""

from .agent import METHODS, PersonaProgram
from .lm import DEFAULT_LM, make_lm, use_lm
from .memory import EpisodicMemory, Profile, SemanticMemory
from .persona import Persona
from .store import ProgramState, UserStore

__all__ = ["DEFAULT_LM", "EpisodicMemory", "METHODS", "Persona", "PersonaProgram", "Profile", "ProgramState",
           "SemanticMemory", "UserStore", "make_lm", "use_lm"]
