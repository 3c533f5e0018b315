"""Hub failures are told apart on every huggingface_hub the project declares (pyproject's floor, 0.25,
has no RemoteEntryNotFoundError; 1.x raises it), never ending in an AttributeError."""

import re
import sys
import types
from pathlib import Path

import pytest

from g2l_cache.hub import hub_failure

# huggingface_hub.errors as 0.25 has it (checked in a scratch venv with huggingface_hub==0.25.0)
NAMES_AT_THE_FLOOR = ("GatedRepoError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError",
                      "RevisionNotFoundError", "EntryNotFoundError")


def test_the_declared_floor_is_the_one_the_errors_were_checked_at():
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert re.search(r'"huggingface_hub>=0\.25"', pyproject)


@pytest.mark.parametrize("remote_entry", [False, True], ids=["0.25", "1.x"])
def test_hub_failures_are_told_apart_with_the_errors_of_each_version(monkeypatch, remote_entry):
    errors = types.ModuleType("huggingface_hub.errors")
    for name in NAMES_AT_THE_FLOOR + (("RemoteEntryNotFoundError",) if remote_entry else ()):
        setattr(errors, name, type(name, (Exception,), {}))
    hub = types.ModuleType("huggingface_hub")
    hub.errors = errors
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", errors)
    assert hub_failure(errors.GatedRepoError("gated")) == "gated"
    assert hub_failure(errors.RepositoryNotFoundError("no repo")) == "missing"
    assert hub_failure(errors.EntryNotFoundError("no file")) == "no-file"
    assert hub_failure(errors.OfflineModeIsEnabled("offline")) == "offline"
    if remote_entry:
        assert hub_failure(errors.RemoteEntryNotFoundError("no file")) == "no-file"
    try:
        raise RuntimeError("wrapped") from errors.GatedRepoError("gated")
    except RuntimeError as exc:
        assert hub_failure(exc) == "gated"
    assert hub_failure(ValueError("something else")) == "other"
