"""Every Python block of the README and of the guide runs as written."""

import re

import pytest

from tests.conftest import REPO

DOCS = ["README.md", "docs/guide.md"]


CONTINUED = "# continues the setup above"


def _python_blocks():
    """Each block of each doc; a block that starts with ``CONTINUED`` runs after the blocks it continues."""
    blocks = []
    for doc in DOCS:
        chain = ""
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", (REPO / doc).read_text(), flags=re.S)):
            chain = chain + block if block.startswith(CONTINUED) else block
            blocks.append((doc, i, chain))
    return blocks


def test_the_docs_have_python_examples():
    assert {doc for doc, _, _ in _python_blocks()} == set(DOCS)


@pytest.mark.parametrize("doc,index,block", _python_blocks(), ids=lambda v: str(v)[:12] if isinstance(v, str) else v)
def test_python_block_runs(doc, index, block, fashion_mnist_available, tmp_path, monkeypatch):
    # recipes for optional frameworks run where they are installed
    for module in re.findall(r"^(?:import|from) (pytorch_lightning|accelerate)\b", block, flags=re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{doc} python block {index}", "exec"), {"__name__": "__docs__"})
