"""The README's demo blocks are what `make demo` produces now (see tests/readme_demo.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from readme_demo import README, differences, readme_blocks, render_blocks

REPO = Path(__file__).parent.parent


def test_readme_demo_blocks_are_what_make_demo_produces(tmp_path):
    demo = tmp_path / "demo_out"
    res = subprocess.run(["make", "demo", f"DEMO={demo}"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    produced, written = render_blocks(demo), readme_blocks(README.read_text())
    assert set(written) == set(produced), "README demo blocks: " + ", ".join(sorted(set(written) ^ set(produced)))
    stale = {name: d for name in produced if (d := differences(written[name], produced[name]))}
    assert not stale, f"README demo blocks are stale: {stale}; refresh: python tests/readme_demo.py demo_out --write"
