"""Every pipeline example runs to completion and shows its dead letter."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from tests.util import REPO, python_child

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "pipeline_*.py")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_runs(path: str) -> None:
    module = "examples." + os.path.basename(path).removesuffix(".py")
    code = f"import runpy; runpy.run_module({module!r}, run_name='__main__')"
    p = python_child(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode()
    assert b"dead letter:" in out
