"""The `nanoseek` command itself: usage errors name the subcommand, --version, and a missing
optional package is one line naming the extra to install, not a traceback."""

import sys

import pytest

import nanoseek
from nanoseek.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"nanoseek {nanoseek.__version__}\n"


def test_unrecognized_argument_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "m", "--prompt", "p", "--nosuchflag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: nanoseek generate [-h]")  # not the top level's "usage: nanoseek [-h] <command>"
    assert err.endswith("nanoseek generate: error: unrecognized arguments: --nosuchflag\n")


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
