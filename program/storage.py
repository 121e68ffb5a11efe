"""Atomic file writes and safe per-user paths: a crash mid-write leaves the previous file intact."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator

# Letters (any script), digits and a few separators seen in real ids ("Tsujii, Jun'ichi"). One
# canonical spelling: no space at either end or twice in a row, so "a" and "a " are not two users.
# A final "." stays allowed: author ids end with an initial ("Manning, Christopher D.").
USER_ID_PATTERN = re.compile(r"\w(?:[\w .@',:-]*[\w.])?")
MAX_VERSIONS = 50  # persona versions kept per user by default: the initial, the best, the current, the latest
MAX_USER_ID_BYTES = 128  # in UTF-8; a directory name holds at most 255 bytes on common file systems


def validate_user_id(user_id: str) -> str:
    """User ids become directory names: refuse anything that could escape, collide or not fit."""
    if (not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id) or ".." in user_id
            or "  " in user_id):
        raise ValueError(
            f"invalid user id {user_id!r}: use letters, digits, single spaces or _ . @ ' , : -, "
            "starting with a letter or digit, ending with one or '.', with no '..'"
        )
    if len(user_id.encode("utf-8")) > MAX_USER_ID_BYTES:
        raise ValueError(f"invalid user id: {len(user_id.encode('utf-8'))} bytes in UTF-8, at most {MAX_USER_ID_BYTES}")
    if unicodedata.normalize("NFC", user_id) != user_id:
        # The same visible id spelled with combining marks would be a second directory.
        raise ValueError(f"invalid user id {user_id!r}: not in Unicode NFC form (compose its accents)")
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
