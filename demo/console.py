"""The demo's one way to print: whole lines, flushed at once (its output is often piped)."""

from __future__ import annotations


def say(text: str = "") -> None:
    print(text, flush=True)
