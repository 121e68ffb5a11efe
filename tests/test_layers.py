"""Imports run one way (data -> program -> optimizers -> app and experiments), and the command
line's help and the data package load no model, index or tensor library."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"data": 0, "program": 1, "optimizers": 2, "app": 3, "experiments": 3}
HEAVY = ("llama_cpp", "faiss", "torch")


def _imported_packages(path: Path) -> set[str]:
    """The top-level packages of ours a module imports, anywhere in it (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2 and node.module:  # from ..program.x import y
                found.add(node.module.split(".")[0])
            elif node.level == 0 and node.module and node.module.startswith("personaagent."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("personaagent."))
    return found & set(LAYERS)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_module_imports_a_layer_above_its_own(package):
    upward = {str(path.relative_to(ROOT)): sorted(p for p in _imported_packages(path) if LAYERS[p] > LAYERS[package])
              for path in (ROOT / package).glob("*.py")}
    assert {module: above for module, above in upward.items() if above} == {}


@pytest.mark.parametrize("code", ["from personaagent.app.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
                                  "import personaagent.data"])
def test_help_and_the_data_package_load_no_model_index_or_tensor_library(code):
    probe = f"import sys\n{code}\nprint('loaded:', [m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "loaded: []"


def test_mlflow_is_reached_only_through_the_tracking_observer():
    # The compile and the service tell an observer what happened; only `optimizers/tracking.py` calls MLflow.
    reaching = sorted(str(path.relative_to(ROOT)) for package in ("data", "program", "optimizers", "app")
                      for path in (ROOT / package).glob("*.py")
                      if path.name != "tracking.py" and ("import mlflow" in path.read_text() or "from mlflow" in path.read_text()
                                                         or "tracker.call(" in path.read_text()))
    assert reaching == []


def test_no_module_below_the_compile_imports_it():
    # The compile sits on top of the optimizers, engines and tracking: they never reach back to it.
    below = [path for package in ("data", "program", "optimizers") for path in (ROOT / package).glob("*.py")
             if path.name != "compile.py"]
    assert [str(p.relative_to(ROOT)) for p in below if re.search(r"from \.+(optimizers\.)?compile import|\.compile import",
                                                                 p.read_text())] == []
