"""The README's usage example runs as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"<!-- test: run -->\n```python\n(.*?)```", text, flags=re.S)


def test_readme_has_runnable_examples():
    assert len(_blocks()) >= 1


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks()[i]
    exec(compile(code, f"README.md example {i}", "exec"), {"__name__": "__readme__"})
