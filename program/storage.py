"""Atomic file writes and safe per-user paths: a crash mid-write leaves the previous file intact."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

# Letters (any script), digits and a few separators seen in real ids ("Tsujii, Jun'ichi").
USER_ID_PATTERN = re.compile(r"\w[\w .@',:-]{0,127}")


def validate_user_id(user_id: str) -> str:
    """User ids become directory names: refuse anything that could escape or collide."""
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id) or ".." in user_id:
        raise ValueError(
            f"invalid user id {user_id!r}: use 1-128 letters, digits, spaces or _ . @ ' , : -, "
            "starting with a letter or digit, with no '..'"
        )
    return user_id


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json_atomic(target: Path, payload: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
