"""The README's examples work: the Python example runs as written, and the table of
bad command-line inputs lists exactly the cases tested in ``test_cli.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_python_example_runs(tmp_path):
    blocks = _python_blocks(_section("Python example"))
    assert blocks, "no ```python block in the README's Python example"
    script = tmp_path / "example.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "accuracy vs ground truth" in proc.stdout
    assert (tmp_path / "example-posterior.png").is_file()
    assert (tmp_path / "example-posterior.zarr").is_dir()
    assert sorted(p.name for p in (tmp_path / "example-plots").glob("*.png")) == [
        "class_map.png",
        "confidence.png",
        "loglik.png",
        "probabilities.png",
    ]
    assert seconds < 20 * 2, f"the README example took {seconds:.0f} s (budget 20 s)"


def test_bad_input_table_lists_the_tested_cases():
    from test_cli import BAD_INPUTS

    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", _section("Command line"), flags=re.M)
    assert rows == [case[0] for case in BAD_INPUTS]


def test_setup_command_runs_the_demo():
    text = README.read_text(encoding="utf-8")
    assert 'pip install ".[test]" && daskem demo --out demo-out' in text
