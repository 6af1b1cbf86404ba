"""Plain-text formatting shared by the CLI and the TUI (no Textual import: the CLI uses it too)."""

from __future__ import annotations

from datetime import UTC, datetime


def size(n: int | None) -> str:
    """Bytes for people: 639.0 KB, 8.9 MB; None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def ago(iso: str) -> str:
    """'2026-11-23T09:03:10.123+00:00' -> '5m ago' (a date once it is over a week old)."""
    then = datetime.fromisoformat(iso)
    secs = (datetime.now(UTC) - then).total_seconds()
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h"), (7 * 86400, 86400, "d")):
        if secs < limit:
            return f"{max(0, int(secs // div))}{unit} ago"
    return then.date().isoformat()
