"""The method registry: every module in fxprune/passes/ is a method module, and one that fails to import is a loud error
naming it, never a method that silently disappears from fxprune.passes.names()."""

import sys

import pytest

import fxprune
from fxprune import passes


@pytest.fixture
def extra_folder(tmp_path, monkeypatch):
    """A second folder on fxprune.passes' search path, for method modules written by the test."""
    monkeypatch.setattr(passes, "__path__", [*passes.__path__, str(tmp_path)])
    yield tmp_path
    for name in ("broken", "mine"):
        sys.modules.pop(f"fxprune.passes.{name}", None)
        passes.REGISTRY.pop(name, None)


def test_the_shipped_methods_are_registered():
    assert {"l1", "l2", "id"} <= set(passes.names())
    assert "magnitude" in passes.method_modules() and "_id_math" not in passes.method_modules()


def test_a_new_module_registers_itself(extra_folder):
    (extra_folder / "mine.py").write_text(
        "from fxprune.passes import register\n"
        "@register('mine')\n"
        "def decide(ctx, **options):\n"
        "    return {}\n")
    assert "mine" in passes.names() and passes.get("mine").__module__ == "fxprune.passes.mine"


def test_a_module_that_fails_to_import_is_a_clear_error(extra_folder):
    (extra_folder / "broken.py").write_text("import no_such_dependency_of_a_method\n")
    with pytest.raises(fxprune.FxPruneError) as err:
        passes.names()
    msg = str(err.value)
    assert "fxprune.passes.broken" in msg and "no_such_dependency_of_a_method" in msg and "\n" not in msg
    with pytest.raises(fxprune.FxPruneError, match="passes.broken"):  # every time, not only the first
        passes.get("l1")
