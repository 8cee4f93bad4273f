"""Load test of `nanoseek serve`: many concurrent streaming chat clients against one server.

    python benchmarks/serve_load.py                      # random tiny checkpoint, 64 clients
    python benchmarks/serve_load.py --preset small --clients 64 --max-tokens 64
    python benchmarks/serve_load.py --model runs/small   # a trained checkpoint

The server runs as a separate `nanoseek serve` process on a free loopback port (client and server
in one process would fight over the GIL and distort the numbers). `--offline` adds the same requests
through `LLM.generate` in-process, to see what the HTTP layer costs. Each client sends
`--requests-per-client` streaming chat requests one after the other, each generating exactly
`--max-tokens` tokens (`ignore_eos`), so the work is fixed whatever the model writes. All prompts
share a system prompt, as real traffic does, so the prefix cache gets used.

Measured on the client, as vLLM's `bench serve` does: time to first token (first chunk that carries
text), end-to-end latency, request and generated-token throughput over the wall time of the run, and
errors (HTTP errors, in-band stream errors, wrong token counts, timeouts). The last line is a JSON
summary. Everything is bounded: a fixed number of requests and an overall `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from optional import require

require("httpx", "fastapi", "uvicorn", extra="serve,bench")  # the client; the server it loads

import httpx  # noqa: E402

from nanoseek.serve.check import free_port, start_server, stop_server  # noqa: E402

SYSTEM = ("You are nanoseek, a small reasoning model. Think step by step inside <think> tags, check your "
          "arithmetic twice, then give a short final answer. If a question is ambiguous, say which reading "
          "you chose. Prefer plain words; avoid jargon; never invent facts. Keep answers under fifty words.")
QUESTIONS = ["What is {a} + {b}?", "Name a color that starts with the letter {c}.", "Count from {a} to {b}.",
             "Why is the sky blue? Give {a} reasons."]


def make_checkpoint(preset_name: str, out: Path) -> Path:
    """A random checkpoint of `preset_name` with a small BPE trained on the default corpus."""
    import torch

    import nanoseek
    from nanoseek.config import preset
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    texts = [q.format(a=i, b=i * 7 % 100, c=chr(65 + i % 26)) for i in range(200) for q in QUESTIONS]
    vocab = {"tiny": 512, "small": 4096}.get(preset_name, 4096)
    tok = train_tokenizer(texts * 3, vocab_size=vocab)
    torch.manual_seed(0)
    model = Transformer(preset(preset_name, vocab_size=tok.vocab_size))
    nanoseek.save_model(model, out, tokenizer=tok)
    return out


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat request; returns its timings, or an "error" entry."""
    body = {"model": "bench", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 1.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, done = None, None, False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                delta = c["delta"]
                if ttft is None and (delta.get("content") or delta.get("reasoning_content")):
                    ttft = time.perf_counter() - t0
    if not done or usage is None:
        return {"error": "stream ended without usage and [DONE]"}
    if usage["completion_tokens"] != max_tokens:
        return {"error": f"expected {max_tokens} tokens, got {usage['completion_tokens']}"}
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "e2e": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"], "cached": usage["prompt_cache_hit_tokens"],
            "prompt": usage["prompt_tokens"]}


async def run_load(base_url: str, clients: int, requests_per_client: int, max_tokens: int, timeout: float) -> dict:
    url = base_url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results: list[dict] = []

    async def client_loop(i: int, client: httpx.AsyncClient):
        for j in range(requests_per_client):
            q = QUESTIONS[(i + j) % len(QUESTIONS)].format(a=i, b=j + 3, c=chr(65 + (i + j) % 26))
            try:
                results.append(await one_request(client, url, q, max_tokens))
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                results.append({"error": f"{type(e).__name__}: {e}"})

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(i, client)) for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:  # past the overall budget: count what did not finish as errors
            task.cancel()
        wall = time.perf_counter() - t0
    expected = clients * requests_per_client
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r] + ["timeout"] * (expected - len(results))
    ttft = sorted(r["ttft"] for r in ok)
    e2e = sorted(r["e2e"] for r in ok)
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")  # noqa: E731
    return {
        "clients": clients, "requests": expected, "completed": len(ok), "errors": len(errors),
        "error_examples": sorted(set(errors))[:3], "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 2),
        "generated_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_p50_ms": round(1000 * pct(ttft, 50), 1), "ttft_p99_ms": round(1000 * pct(ttft, 99), 1),
        "e2e_p50_ms": round(1000 * statistics.median(e2e), 1) if e2e else None,
        "prompt_cache_hit_rate": round(sum(r["cached"] for r in ok) / max(1, sum(r["prompt"] for r in ok)), 3),
    }


def offline_tokens_per_s(model: Path, clients: int, requests_per_client: int, max_tokens: int,
                         max_num_seqs: int) -> float:
    """The same requests through `LLM.generate` in this process: the engine alone, no HTTP.

    The ratio to the served throughput is the cost of the HTTP layer (tokenization, SSE encoding,
    the engine thread handing outputs to the event loop) under this load.
    """
    import nanoseek

    llm = nanoseek.LLM(model, max_num_seqs=max_num_seqs)
    prompts = [llm.tokenizer.apply_chat_template([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTIONS[(i + j) % len(QUESTIONS)].format(a=i, b=j + 3, c=chr(65 + (i + j) % 26))}])
        for i in range(clients) for j in range(requests_per_client)]
    params = nanoseek.SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts, nanoseek.SamplingParams(max_tokens=4, ignore_eos=True))  # warm up at the full batch shape
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a random --preset one)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates")
    p.add_argument("--max-num-seqs", type=int, default=64, help="the engine's batch size")
    p.add_argument("--timeout", type=float, default=300, help="overall limit for the load phase, seconds")
    p.add_argument("--offline", action="store_true",
                   help="also time the same requests through LLM.generate in-process (the engine without HTTP)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(args.preset, Path(tmp) / args.preset)
        port = free_port()
        server = start_server(model, port, extra_args=("--max-num-seqs", str(args.max_num_seqs),
                                                       "--served-model-name", "bench"))
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(run_load(base, 4, 1, 4, 60))  # warm up (first forward, allocator)
            run = asyncio.run(run_load(base, args.clients, args.requests_per_client, args.max_tokens, args.timeout))
            summary = {"model": str(args.model or f"random {args.preset}"), "max_tokens": args.max_tokens, **run}
        finally:
            stop_server(server)
        if args.offline:
            offline = offline_tokens_per_s(model, args.clients, args.requests_per_client, args.max_tokens,
                                           args.max_num_seqs)
            summary["offline_generated_tokens_per_s"] = round(offline, 1)
            summary["served_vs_offline"] = round(summary["generated_tokens_per_s"] / offline, 2)
        summary["loadavg_1min"] = round(os.getloadavg()[0], 2)
    print(f"{summary['completed']}/{summary['requests']} requests from {summary['clients']} concurrent streaming "
          f"clients, {summary['max_tokens']} tokens each, in {summary['wall_s']} s ({summary['model']})")
    print(f"  throughput   {summary['requests_per_s']} requests/s, {summary['generated_tokens_per_s']} generated tokens/s")
    print(f"  TTFT         p50 {summary['ttft_p50_ms']} ms, p99 {summary['ttft_p99_ms']} ms   "
          f"(end-to-end p50 {summary['e2e_p50_ms']} ms)")
    if "offline_generated_tokens_per_s" in summary:
        print(f"  engine alone {summary['offline_generated_tokens_per_s']} generated tokens/s offline "
              f"(LLM.generate, same requests): served = {summary['served_vs_offline']}x offline")
    print(f"  prefix cache {summary['prompt_cache_hit_rate']:.1%} of prompt tokens hit")
    print(f"  errors       {summary['errors']} {summary['error_examples'] or ''}")
    print(f"  machine      {os.cpu_count()} CPUs, load average {summary['loadavg_1min']} at the end "
          "(other processes on the machine skew every figure above)")
    print(json.dumps(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
