"""MLflow set-up that works offline, and the tracking URI every command uses by default."""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def offline_environment() -> None:
    """Settings every process that imports dspy/litellm next to mlflow needs offline: without the
    local cost map, litellm retries a download at import and `mlflow server` deadlocks at start."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup_mlflow(tracking_uri: str | None, experiment: str, autolog: bool = True):
    offline_environment()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    mlflow.set_experiment(experiment)
    if autolog:
        # Imported first so the teleprompter class exists when autolog patches Teleprompter subclasses.
        from . import persona  # noqa: F401

        mlflow.dspy.autolog(log_compiles=True, log_evals=True, log_traces=True, silent=True)
    return mlflow
