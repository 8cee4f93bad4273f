"""The serving check (`python -m nanoseek.serve.check`, the speedrun's serve stage): a failure is
one line and exit status 1, and leaves no --json behind (the speedrun would take it for a pass)."""

import pytest

from nanoseek.serve import check


@pytest.fixture
def served(monkeypatch):
    """A check whose server and client load succeed without a model or a network."""
    monkeypatch.setattr(check, "start_server", lambda *args, **kwargs: object())
    monkeypatch.setattr(check, "stop_server", lambda server: None)
    load = {"requests": 1, "requests_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0,
            "generated_tokens_per_s": 1.0}
    monkeypatch.setattr(check, "client_load", lambda *args: dict(load))


def test_a_chat_page_that_shows_an_error_fails_the_check(served, monkeypatch, tmp_path, capsys):
    """The page catches a failed request and shows it where the answer would be: browser_check
    returns it in `error`; the check printed "chat page: 2 streamed updates" and passed."""
    shown = {"reasoning": "", "summary": "", "answer": "", "stats": "", "updates": 2, "reasoning_shown_apart": False,
             "screenshot": "chat.png", "error": "Error: max_tokens is too large: 5000."}
    monkeypatch.setattr(check, "browser_check", lambda *args, **kwargs: shown)
    out = tmp_path / "serve.json"
    code = check.main(["--model", "m", "--json", str(out), "--screenshot", str(tmp_path / "chat.png")])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert "serve check: failed: the chat page showed an error: Error: max_tokens is too large" in err
    assert "Traceback" not in err

    shown["error"] = ""  # the same page with its answer: a pass
    assert check.main(["--model", "m", "--json", str(out), "--screenshot", str(tmp_path / "chat.png")]) == 0
    assert out.is_file()


def test_a_server_that_does_not_start_is_one_line(tmp_path, capfd):
    out = tmp_path / "serve.json"
    assert check.main(["--model", str(tmp_path / "nowhere"), "--json", str(out)]) == 1
    err = capfd.readouterr().err
    assert "no such directory" in err  # nanoseek serve's own error, then the check's line
    assert "serve check: failed: nanoseek serve exited with status 2" in err
    assert "Traceback" not in err and not out.exists()
