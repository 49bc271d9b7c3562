"""Every atheris target under fuzz/ runs a few thousand inputs without a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TARGETS = ["address", "headers", "envelope", "aliases", "reply", "flags"]

pytest.importorskip("atheris")


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(target: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(FUZZ / f"{target}.py"), "-runs=3000",
                        "-max_len=1024", f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    assert b"Done 3000 runs" in r.stderr
