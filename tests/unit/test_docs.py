"""The configuration reference cannot drift from the code."""

from pathlib import Path

from relayq.config import SCHEMA

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_key_is_documented() -> None:
    text = DOC.read_text()
    missing = [key for key in SCHEMA if f"| `{key}` |" not in text]
    assert missing == []
