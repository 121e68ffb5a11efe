"""Per-user data: LaMP files, generic interaction logs and LoCoMo, into per-user examples."""

from pathlib import Path

from .loaders import DataError, TaskData, UserData, load, load_jsonl, load_lamp
from .tasks import LAMP_TASKS, Interaction, TaskSpec, generic_task, resolve_task

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"

__all__ = ["DataError", "Interaction", "LAMP_TASKS", "SAMPLE_DIR", "TaskData", "TaskSpec", "UserData",
           "generic_task", "load", "load_jsonl", "load_lamp", "resolve_task"]
