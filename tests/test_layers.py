"""Imports run one way (data -> program -> optimizers -> app -> experiments), and the command
line's help and the data package load no model, index or tensor library."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"data": 0, "program": 1, "optimizers": 2, "app": 3, "experiments": 4}
HEAVY = ("llama_cpp", "faiss", "torch")


def _imported_packages(source: str) -> set[str]:
    """The top-level packages of ours a module imports, anywhere in it: an import inside a function
    counts, and so does `import_module` of a literal name."""
    names = []  # each import as an absolute dotted name
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level != 1:  # `from .x` stays in the module's own package
            module = ".".join(filter(None, ["personaagent" if node.level else "", node.module]))
            names += [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            names.append("personaagent." + name.lstrip(".") if name.startswith("..") else name)
    return {name.split(".")[1] for name in names if name.startswith("personaagent.")} & set(LAYERS)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_module_imports_a_layer_above_its_own(package):
    upward = {str(path.relative_to(ROOT)): sorted(p for p in _imported_packages(path.read_text())
                                                  if LAYERS[p] > LAYERS[package])
              for path in (ROOT / package).glob("*.py")}
    assert {module: above for module, above in upward.items() if above} == {}


@pytest.mark.parametrize("form", ["from ..experiments.eval import run", "from .. import experiments",
                                  "import personaagent.experiments.eval", "from personaagent.experiments import eval",
                                  "importlib.import_module('personaagent.experiments.eval')"])
def test_an_import_is_found_in_any_form_even_inside_a_function(form):
    # So the app's CLI importing experiments/ to run `eval`, as it once did, fails the test above.
    assert _imported_packages(f"def cmd_eval(args):\n    {form}\n") == {"experiments"}


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
