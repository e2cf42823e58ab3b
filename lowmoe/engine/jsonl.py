"""JSON Lines reading shared by every input that takes prompt/answer records (calibration files,
task splits, EEP fitness data): one place that turns a bad line into a one-line error naming the
file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import CalibrationError


def json_lines(path: str | Path, text: str | None = None) -> Iterator[tuple[str, object]]:
    """Yield ``("file:line", record)`` for every non-blank line of ``path`` (or of ``text`` read from it).

    Field checks are the caller's: each input wants different fields and says so in its own error.
    """
    p = Path(path)
    if text is None:
        text = p.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{p}:{n}: not valid JSON ({e.msg}); expected one JSON object per line") from None
        yield f"{p}:{n}", rec
