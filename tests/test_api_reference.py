"""The API reference: every public module, class and function has a docstring, and docs/api.md is current."""

import importlib
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import api_reference  # noqa: E402


def test_every_public_member_has_a_docstring():
    missing = []
    for name in api_reference.MODULES:
        module = importlib.import_module(name)
        if not (module.__doc__ or "").strip():
            missing.append(name)
        missing += [f"{name}.{member}" for member, obj in api_reference.public_members(module)
                    if not (obj.__doc__ or "").strip()]
    assert missing == []


def test_api_page_is_up_to_date():
    assert (REPO / "docs" / "api.md").read_text() == api_reference.render(), (
        "docs/api.md is out of date: run python scripts/api_reference.py"
    )
