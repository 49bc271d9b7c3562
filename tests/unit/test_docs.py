"""The configuration reference cannot drift from the code."""

from pathlib import Path

from relayq.core.config import SCHEMA

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_key_is_documented() -> None:
    text = DOC.read_text()
    missing = [key for key in SCHEMA if f"| `{key}` |" not in text]
    assert missing == []


def test_the_reliability_matrix_is_documented() -> None:
    """docs/reliability.md lists every row of the hostile-smarthost matrix with its outcome."""
    from tests.system import test_hostile_matrix as matrix

    text = matrix.DOC.read_text()
    assert matrix.BEGIN in text and matrix.END in text
    assert text == matrix.documented(text), "run: python -m tests.system.test_hostile_matrix"
    assert all(f"| `{row.id}` |" in text for row in matrix.ROWS)
