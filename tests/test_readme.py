"""Every Python block of the README and of the guide runs as written."""

import re

import pytest

from tests.conftest import REPO

DOCS = ["README.md", "docs/guide.md"]


def _python_blocks():
    return [(doc, i, block) for doc in DOCS
            for i, block in enumerate(re.findall(r"```python\n(.*?)```", (REPO / doc).read_text(), flags=re.S))]


def test_the_docs_have_python_examples():
    assert {doc for doc, _, _ in _python_blocks()} == set(DOCS)


@pytest.mark.parametrize("doc,index,block", _python_blocks(), ids=lambda v: str(v)[:12] if isinstance(v, str) else v)
def test_python_block_runs(doc, index, block, fashion_mnist_available, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{doc} python block {index}", "exec"), {"__name__": "__docs__"})
