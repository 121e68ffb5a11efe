"""The llama.cpp build for the CPU at hand.

llama-cpp-python compiles from source here, and by default with `-march=native` (`GGML_NATIVE`).
That is wrong in two ways: on a CPU that reports AMX it turns on llama.cpp's AMX kernels, whose
first matrix product dies (an illegal instruction here; a segmentation fault upstream, in
`ggml_backend_amx_mul_mat`), and pip caches the built wheel by its source archive, so a wheel built
for one CPU is reused on another with fewer instructions and dies there.

So the instruction sets are chosen at install time from the CPU's flags, named explicitly, AMX
never among them, and the built wheel is kept under a name made of those instruction sets: a
machine with another CPU builds its own. (ggml's runtime variants, `GGML_BACKEND_DL` with
`GGML_CPU_ALL_VARIANTS`, would build about ten CPU backends, several times the 3-6 minutes one
takes on 2 cores, and llama-cpp-python does not load backend libraries itself.)

Stdlib only: it runs with the new environment's Python before anything else is installed there.
Run it as `python program/native_build.py install` (the Makefile does), or `... show`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"

# ggml's x86 options in the order they build on each other, each with the /proc/cpuinfo flags it
# needs (GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw). AMX is absent on purpose: it is always
# off (see the module docstring).
X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SSE42", ("sse4_2",)),
    ("AVX", ("avx",)),
    ("F16C", ("f16c",)),
    ("FMA", ("fma",)),
    ("BMI2", ("bmi2",)),
    ("AVX2", ("avx2",)),
    ("AVX_VNNI", ("avx_vnni",)),
    ("AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("AVX512_VBMI", ("avx512vbmi",)),
    ("AVX512_VNNI", ("avx512_vnni",)),
    ("AVX512_BF16", ("avx512_bf16",)),
)
ALWAYS_OFF = ("AMX_TILE", "AMX_INT8", "AMX_BF16")
# The flags worth naming when something fails: what the build may use, and what it never uses.
BUILD_RECORD = "personaagent-llama-build.json"  # in an environment's prefix: which build it has installed
RELEVANT_FLAGS = tuple(sorted({f for _, needs in X86_OPTIONS for f in needs} | {"amx_tile", "amx_int8", "amx_bf16"}))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def enabled_options(flags: frozenset[str]) -> list[str]:
    """The ggml instruction-set options this CPU supports (x86 only; elsewhere ggml's defaults)."""
    return [name for name, needs in X86_OPTIONS if all(f in flags for f in needs)]


def cmake_args(options: list[str]) -> str:
    on = [f"-DGGML_{name}=ON" for name in options]
    off = [f"-DGGML_{name}=OFF" for name, _ in X86_OPTIONS if name not in options]
    off += [f"-DGGML_{name}=OFF" for name in ALWAYS_OFF]
    # LLAVA_BUILD=OFF: the multimodal tool is not used, and skipping it halves the build.
    return " ".join(["-DLLAVA_BUILD=OFF", "-DGGML_NATIVE=OFF", *on, *off])


def build_tag(options: list[str]) -> str:
    """The wheel's name for this CPU: the machine and every instruction set compiled in."""
    return "-".join([platform.machine().lower(), *(o.lower() for o in options)]) or "generic"


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686")


def wheel_dir(tag: str) -> Path:
    root = os.environ.get("PERSONAAGENT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "personaagent")
    return Path(root) / "wheels" / f"{PACKAGE}-{VERSION}-{tag}"


def marker(python: str) -> Path:
    """Where an environment records which build it has installed."""
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return Path(prefix) / BUILD_RECORD


def install(python: str = sys.executable) -> str:
    """Build (once per CPU kind) and install the wheel for this CPU into `python`'s environment."""
    options = enabled_options(cpu_flags()) if is_x86() else []
    tag = build_tag(options) if is_x86() else "native-" + platform.machine().lower()
    record = marker(python)
    if record.is_file() and json.loads(record.read_text()).get("tag") == tag:
        return tag
    wheels = wheel_dir(tag)
    found = sorted(wheels.glob("*.whl"))
    if not found:
        env = dict(os.environ)
        if is_x86():
            env["CMAKE_ARGS"] = cmake_args(options)
        else:  # not x86: no AMX to avoid, and ggml's native build is right for this CPU
            env["CMAKE_ARGS"] = "-DLLAVA_BUILD=OFF"
        print(f"building {PACKAGE} {VERSION} for this CPU ({tag}); 3-6 minutes on 2 cores, once", flush=True)
        tmp = wheels.with_name(wheels.name + ".part")
        subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
                        f"{PACKAGE}=={VERSION}", "-w", str(tmp)], env=env, check=True)
        tmp.replace(wheels)  # the wheel appears under its CPU's name only when complete
        found = sorted(wheels.glob("*.whl"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(found[-1])],
                   check=True)
    record.write_text(json.dumps({"tag": tag, "cmake_args": cmake_args(options) if is_x86() else ""}))
    return tag


def installed_build(prefix: str = sys.prefix) -> dict:
    """What `install` recorded for this environment ({} when llama.cpp was installed otherwise)."""
    record = Path(prefix) / BUILD_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "show"
    if command == "install":
        print(f"{PACKAGE} {VERSION}: {install()}")
    elif command == "show":
        chosen = enabled_options(cpu_flags())
        print(f"{build_tag(chosen)}\nCMAKE_ARGS={cmake_args(chosen)}")
    else:
        sys.exit(f"usage: {sys.argv[0]} install|show")
