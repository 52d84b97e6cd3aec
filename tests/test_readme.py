"""Every Python block of the README runs as written (on the real Fashion-MNIST files)."""

import re

import pytest

from tests.conftest import REPO


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(_python_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, fashion_mnist_available, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), {})
    assert "top1" in capsys.readouterr().out
