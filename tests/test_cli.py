"""The `nanoseek` command itself: a missing optional package is one line naming the extra to
install, not a traceback."""

import sys

from nanoseek.cli import main


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path, capsys):
    # None in sys.modules makes an import of that name raise ModuleNotFoundError, as if not installed
    monkeypatch.delitem(sys.modules, "nanoseek.serve.api", raising=False)  # so the command's import runs again
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--model", str(tmp_path)]) == 2  # fails importing the command's module
    assert capsys.readouterr().err == ("nanoseek serve: error: needs fastapi, which is not installed: "
                                       "pip install -e '.[serve]'\n")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", str(tmp_path)]) == 2  # fails in run(), which imports uvicorn
    assert "serve: error: needs uvicorn, which is not installed: pip install -e '.[serve]'" in capsys.readouterr().err
    for name in ("reasoning_gym", "reasoning_gym.factory"):  # a submodule already imported is found without its parent
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["eval", "--model", str(tmp_path), "--task", "default"]) == 2
    assert "needs the reasoning-gym package, which is not installed: pip install -e '.[rl]'" in capsys.readouterr().err
