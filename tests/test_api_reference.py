"""The API reference: every public module, class and function has a docstring with an example that runs, and
docs/api.md is current."""

import doctest
import importlib
import inspect
import sys

import pytest
import torch

import metaquant
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import api_reference  # noqa: E402


def _members(module_name):
    return list(api_reference.public_members(importlib.import_module(module_name)))


def test_every_public_member_has_a_docstring():
    missing = []
    for name in api_reference.MODULES:
        module = importlib.import_module(name)
        if not (module.__doc__ or "").strip():
            missing.append(name)
        missing += [f"{name}.{member}" for member, obj in _members(name) if not (obj.__doc__ or "").strip()]
    assert missing == []


def test_the_public_api_has_examples():
    """Every class and function of ``metaquant.__all__`` and of ``metaquant.export`` shows how it is used."""
    missing = [
        f"{name}.{member}"
        for name in api_reference.EXAMPLES
        for member, obj in _members(name)
        if ">>>" not in (obj.__doc__ or "")
    ]
    assert missing == []


@pytest.mark.parametrize("module_name", sorted(set(api_reference.MODULES) | set(api_reference.EXAMPLES)))
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    """Run the examples of the module's public members as doctests, in a scratch working directory.

    Examples may use ``torch`` and ``mq`` (``import metaquant as mq``) without importing them, as the API page
    says; every example starts from ``torch.manual_seed(0)``.
    """
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = []
    for member, obj in _members(module_name):
        # A member re-exported from a submodule is found under its own module's name.
        tests += finder.find(
            obj, f"{module_name}.{member}", module=inspect.getmodule(obj), globs={"torch": torch, "mq": metaquant}
        )
    tests = [test for test in tests if test.examples]
    if module_name in api_reference.EXAMPLES:
        assert tests, f"{module_name} has no examples"
    for test in tests:
        torch.manual_seed(0)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module_name} (see above)"


def test_api_page_is_up_to_date():
    assert (REPO / "docs" / "api.md").read_text() == api_reference.render(), (
        "docs/api.md is out of date: run python scripts/api_reference.py"
    )


def test_api_page_shows_annotations_as_written_and_no_control_characters():
    text = api_reference.render()
    assert "\x00" not in text and "ForwardRef(" not in text
    assert (
        "### `def get_quantizer(name: str, bits: int = 1, *, group_size: int | None = None) -> ForwardQuantizer`"
        in text
    )
    assert "### `class Encoded(codes: Tensor, scale: Tensor)`" in text  # a NamedTuple, without "-> None"
