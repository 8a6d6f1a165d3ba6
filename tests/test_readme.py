"""Every ```python block of README.md runs as pasted.

Each block runs on its own in a fresh interpreter, from the repository root,
with VSML_DATA_DIR from the environment (as a user who exported it and pasted
the block would). A failure shows the block and what it printed.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks():
    """[(first line number, code)] of the README's ```python blocks."""
    with open(README) as f:
        text = f.read()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md lost its Python examples"


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(data_dir, line, code):
    env = dict(os.environ, VSML_DATA_DIR=data_dir)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"README.md block at line {line} failed (exit {proc.returncode}):\n"
                    f"{code}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n"
                    f"{proc.stderr}", pytrace=False)
