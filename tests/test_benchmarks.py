"""The GPU benchmark runs end to end at toy sizes on the CPU (its real figures come from a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_throughput_smoke() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--tiny", "--compile-backend", "aot_eager"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for row in ("fp32 (deterministic)", "bf16 + channels_last + compile", "hand-written loop", "FLOP counting"):
        assert row in out, row
    assert "persistent workers" in out and "what the bf16 model consumes" in out
