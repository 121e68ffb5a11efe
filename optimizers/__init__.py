"""Per-user persona optimizers (test-time alignment, GEPA for comparison) and the offline compile."""

from .compile import CompileConfig, compile_users
from .persona import PersonaAlignment

__all__ = ["CompileConfig", "PersonaAlignment", "compile_users"]
