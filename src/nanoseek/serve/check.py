"""The serving check: `nanoseek serve` as a user meets it, through the official `openai` client
and through the chat page in a real headless browser.

    python -m nanoseek.serve.check --model runs/rl_r1zero_reasoning/latest --json serve.json \
        --screenshot chat.png

It starts `nanoseek serve` on a free loopback port as its own process, then

1. sends `--requests` streaming chat requests from `--concurrency` threads with `openai.OpenAI`,
   each generating up to `--max-tokens` tokens, and measures on the client requests/s, time to
   first token (the first chunk that carries text, reasoning or answer) and generated tokens/s;
2. with `--screenshot`, opens the chat page at `/` in Chromium (Playwright, the system's
   `chromium`), types a question, watches the answer stream in (how many times the reasoning and
   answer text changed) and whether the reasoning is shown apart (the page's <details> block), and
   saves the screenshot.

The browser part is optional: without Playwright or Chromium it is skipped with the reason in the
JSON (`browser.skipped`). The last line printed is the JSON summary.

A failure (the server does not start, a request fails, the chat page shows an error) is one line
on stderr and exit status 1, and writes no `--json`: the speedrun takes that file for a pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
PAGE_TIMEOUT_MS = 60_000  # browser_check's wait for each step: page load, model name, finished answer


class CheckFailed(RuntimeError):
    """What the check found wrong with the served model: printed as one line, exit status 1."""


class BrowserUnavailable(RuntimeError):
    """No Playwright or no Chromium on this machine: the browser check is skipped, with this reason."""


def find_chromium() -> str:
    found = os.environ.get("NANOSEEK_CHROMIUM") or next((p for p in CHROMIUM_PATHS if os.path.exists(p)), None)
    found = found or shutil.which("chromium")
    if not found:
        raise BrowserUnavailable("no Chromium (apt-get install chromium, or set NANOSEEK_CHROMIUM)")
    return found


def browser_check(url: str, question: str, screenshot: str | Path | None = None, temperature: float = 0.0,
                  max_tokens: int = 64) -> dict:
    """Ask `question` on the chat page at `url` as a person would (type, press Enter), wait for the
    answer to finish streaming, and report what the page showed:
    {"reasoning", "summary", "answer", "stats", "error", "updates", "reasoning_shown_apart", "screenshot"}.
    `updates` counts changes of the assistant's text seen while it streamed (more than one: it
    streamed). Raises BrowserUnavailable without Playwright or Chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserUnavailable("Playwright is not installed (pip install playwright)") from None
    chromium = find_chromium()
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        except Exception as e:  # a broken or sandboxed Chromium: skip rather than fail
            raise BrowserUnavailable(f"Chromium did not start: {str(e).splitlines()[0]}") from None
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(url, timeout=PAGE_TIMEOUT_MS)
            page.wait_for_function("document.getElementById('model').textContent !== 'model: ?'",
                                   timeout=PAGE_TIMEOUT_MS)
            page.fill("#temperature", str(temperature))
            page.fill("#max-tokens", str(max_tokens))
            # count every change of the assistant message's text while it streams
            page.evaluate("""() => {
                window.__updates = 0;
                new MutationObserver(() => { window.__updates += 1; })
                    .observe(document.getElementById('log'), {subtree: true, characterData: true, childList: true});
            }""")
            page.click("#input")
            page.keyboard.type(question)
            page.keyboard.press("Enter")
            page.wait_for_selector(".msg.assistant .stats:not(:empty), .msg.assistant .error",
                                   timeout=PAGE_TIMEOUT_MS)
            shown = page.evaluate("""() => {
                const box = [...document.querySelectorAll('.msg.assistant')].pop();
                const details = box.querySelector('details');
                const error = box.querySelector('.error');
                return {
                    reasoning: details ? details.querySelector('div').textContent : '',
                    summary: details ? details.querySelector('summary').textContent : '',
                    answer: box.children[details ? 1 : 0].textContent,
                    stats: (box.querySelector('.stats') || {}).textContent || '',
                    error: error ? error.textContent : '',
                    updates: window.__updates,
                };
            }""")
            if shown.get("reasoning"):
                page.evaluate("() => { const d = document.querySelector('.msg.assistant details'); if (d) d.open = true; }")
            if screenshot:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {**shown, "reasoning_shown_apart": bool(shown["reasoning"]),
            "screenshot": str(screenshot) if screenshot else None}


# ---------------------------------------------------------------- the server and the client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, threads: int | None = None, extra_args: tuple[str, ...] = (),
                 timeout: float = 120) -> subprocess.Popen:
    """`nanoseek serve` in its own process (on `threads` CPU threads, with `extra_args`); returns
    once /health answers."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    server = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model), "--host",
                               "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra_args], env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CheckFailed(f"nanoseek serve exited with status {server.returncode} (its error is above)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.3)
    server.terminate()
    raise CheckFailed(f"nanoseek serve did not answer within {timeout:.0f}s")


def stop_server(server: subprocess.Popen) -> None:
    """Ask the server to stop (SIGTERM), and kill it if it has not within 20 s."""
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def client_load(base_url: str, question: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """`requests` streaming chat completions through the official client, `concurrency` at a time."""
    from openai import APIError, OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    def one(i: int) -> dict:
        t0 = time.perf_counter()
        ttft, reasoning, content, tokens = None, "", "", 0
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], stream=True, max_tokens=max_tokens,
            temperature=1.0, seed=i, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                r, c = getattr(choice.delta, "reasoning_content", None) or "", choice.delta.content or ""
                if (r or c) and ttft is None:
                    ttft = time.perf_counter() - t0
                reasoning, content = reasoning + r, content + c
        return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "e2e": time.perf_counter() - t0,
                "tokens": tokens, "reasoning": reasoning, "content": content}

    try:
        one(-1)  # warm up: the first forward pass and the allocator
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests)))
    except APIError as e:  # the server answered with an error (or not at all)
        raise CheckFailed(f"a streaming chat request failed: {e}") from None
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    return {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "wall_s": round(wall, 3),
            "requests_per_s": round(requests / wall, 3),
            "generated_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
            "ttft_p99_ms": round(1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1),
            "with_reasoning": sum(bool(r["reasoning"]) for r in results),
            "example": {"reasoning": results[0]["reasoning"], "content": results[0]["content"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanoseek.serve.check", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory to serve")
    ap.add_argument("--question", default="3815920471", help="what the clients and the browser ask")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--screenshot", help="PNG of the chat page after the answer (omit: no browser check)")
    ap.add_argument("--json", help="also write the summary to this file")
    args = ap.parse_args(argv)
    try:
        summary = run_check(args)
    except CheckFailed as e:
        print(f"serve check: failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


def run_check(args) -> dict:
    """Serve `args.model`, load it through the client, then (with --screenshot) the chat page."""
    port = free_port()
    server = start_server(args.model, port, args.threads)
    base = f"http://127.0.0.1:{port}"
    try:
        summary = {"model": args.model, **client_load(base, args.question, args.requests, args.concurrency,
                                                       args.max_tokens)}
        print(f"openai client: {args.requests} streaming requests, {args.concurrency} at a time: "
              f"{summary['requests_per_s']} requests/s, TTFT p50 {summary['ttft_p50_ms']} ms, "
              f"p99 {summary['ttft_p99_ms']} ms, {summary['generated_tokens_per_s']} tokens/s", flush=True)
        if args.screenshot:
            try:
                summary["browser"] = browser_check(base + "/", args.question, args.screenshot,
                                                   max_tokens=args.max_tokens)
                b = summary["browser"]
                if b["error"]:  # the page caught a failed request and showed it in place of an answer
                    raise CheckFailed(f"the chat page showed an error: {b['error']}")
                print(f"chat page: {b['updates']} streamed updates, reasoning shown apart: "
                      f"{b['reasoning_shown_apart']}, answer {b['answer']!r} -> {args.screenshot}", flush=True)
            except BrowserUnavailable as e:
                summary["browser"] = {"skipped": str(e)}
                print(f"chat page: skipped ({e})", flush=True)
    finally:
        stop_server(server)
    return summary


if __name__ == "__main__":
    sys.exit(main())
