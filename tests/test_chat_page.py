"""The chat page as a person uses it: a real headless Chromium types a question into `/`, the
answer streams in, and the reasoning is shown apart from it. Skipped (with the reason) where
Playwright or Chromium is not installed (`.ci/run` installs both when it can)."""

import pytest

import nanoseek
from nanoseek.serve.api import create_app
from nanoseek.serve.check import BrowserUnavailable, browser_check
from server_thread import ServerThread
from test_serve import ANSWER, THOUGHT, USER, _make_thinker, TEXTS  # the scripted reasoning model
from nanoseek.tokenizer import train_tokenizer


def test_chat_page_streams_reasoning_apart_from_the_answer(tmp_path):
    pytest.importorskip("playwright", reason="Playwright is not installed (pip install playwright)")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    nanoseek.save_model(_make_thinker(tok), tmp_path / "thinker", tokenizer=tok)
    engine = nanoseek.LLM(tmp_path / "thinker", max_num_seqs=1)
    with ServerThread(create_app(engine, model_name="thinker")) as server:
        try:
            shown = browser_check(server.url + "/", USER[0]["content"], tmp_path / "chat.png", temperature=0)
        except BrowserUnavailable as e:
            pytest.skip(f"no browser check: {e}")
    assert not shown["error"], shown["error"]
    assert shown["reasoning_shown_apart"] and shown["reasoning"] == THOUGHT and shown["summary"] == "Thought"
    assert shown["answer"] == ANSWER
    assert shown["updates"] > 2  # the text arrived in pieces: it streamed
    assert "tokens in" in shown["stats"]
    png = (tmp_path / "chat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
