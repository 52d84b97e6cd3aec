"""Every Python block of the README and of the guide runs as written."""

import ast
import re

import pytest
import torch

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
def test_python_block_runs(doc, index, block, fashion_mnist_available, tmp_path, monkeypatch, capsys):
    # recipes for optional frameworks run where they are installed
    for module in re.findall(r"^(?:import|from) (pytorch_lightning|accelerate)\b", block, flags=re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(block, f"{doc} python block {index}", "exec"), namespace)
    if (doc, index) == ("README.md", 0):
        _check_the_quick_start_prints_what_the_readme_says(capsys.readouterr().out)
        # it trains in the layout the command line does: channels-last weights (tests/test_layout.py: same losses)
        weight = namespace["model"].layer1[0].conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _check_the_quick_start_prints_what_the_readme_says(out):
    """Test accuracies of a model that has learned (chance is 10%), for the float model and the 1-bit one."""
    printed = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith(("float: ", "1-bit: ")))
    assert set(printed) == {"float", "1-bit"}, out
    for model, metrics in printed.items():
        assert ast.literal_eval(metrics)["top1"] > 40, f"{model}: {metrics}"
    assert "about 72% for the float model and 60-65% for\nthe 1-bit one" in (REPO / "README.md").read_text()
