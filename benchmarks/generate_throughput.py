"""Decode throughput of nanoseek's engine vs transformers' `generate`, same checkpoint, same machine.

    python benchmarks/generate_throughput.py            # a random `small`-preset model in a temp dir
    python benchmarks/generate_throughput.py --model DIR
    python benchmarks/generate_throughput.py --device cuda --preset gpu --batches 1 64 --prompt-lens 128

On a GPU both run in bf16 (--dtype) and the report adds each engine's own peak GPU memory: its
weights (and nanoseek's latent cache) plus the peak working memory of its runs, not the other
models that stay resident beside it (transformers' and the speculative engine's).

Both run greedy, ignore eos, same prompts and max_new_tokens, at batch 1 and 32 and three prompt
lengths, on 2 CPU threads (--threads). Decode tokens/s excludes prefill: each configuration is
also run with one new token, and decode rate = batch * (new_tokens - 1) / (time(new_tokens) -
time(1 token)). Timings are the best of --repeats runs; on a shared machine, expect noise.
The ratio grows with the context: at short prompts both engines spend a decode step on the same
matmuls (the model's weights times 32 tokens), while every new token of context costs transformers
more (a multi-head K/V cache, 4x the latent's bytes at the `small` preset, grown by concatenation).
Also printed: latent-cache bytes per token against the multi-head K/V cache transformers keeps for
the same model, and MTP speculation's acceptance rate and speed-up at each batch size, with the
engine's default speculative_max_batch (above it speculation is off: "off", and about 1.0x).
Plain and speculative decoding are timed in turn within each repeat and compared by their median
times. A random model's MTP head rarely agrees with its main model (acceptance near 0, so
speculation costs time); a trained checkpoint (--model) shows the real figure, best with a prompt
like its training data (--prompt: every row of the batch runs it, in place of random tokens).
`--temperature 1` measures speculative sampling instead of greedy decoding. For speculation
alone: --clock cpu --threads 1 --no-transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from optional import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")


CLOCK = time.perf_counter  # --clock cpu: time.thread_time


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def decode_rate(generate, batch: int, new_tokens: int, repeats: int) -> float:
    """Decode tokens/s of generate(n): the time of n new tokens minus that of 1 (the prefill)."""
    full = best_time(lambda: generate(new_tokens), repeats)
    prefill = best_time(lambda: generate(1), repeats)
    return batch * (new_tokens - 1) / (full - prefill)


def interleaved_decode_rates(generates: list, batch: int, new_tokens: int, repeats: int) -> list[tuple[float, float]]:
    """Decode tokens/s of each generate, timed in turn within every repeat (so that a load change
    on a shared machine hits all of them alike): (from the best decode time, from the median)."""
    times = [[] for _ in generates]
    for _ in range(repeats):
        for t, generate in zip(times, generates):
            start = CLOCK()
            generate(new_tokens)
            middle = CLOCK()
            generate(1)
            t.append((middle - start) - (CLOCK() - middle))
    return [(batch * (new_tokens - 1) / min(t), batch * (new_tokens - 1) / statistics.median(t)) for t in times]


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model's weights and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def engine_bytes(llm) -> int:
    """What a nanoseek engine holds between requests: its model and its preallocated latent cache."""
    return held_bytes(llm.model) + llm.runner.cache.pool.numel() * llm.runner.cache.pool.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a random small-preset model)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled, seeded")
    ap.add_argument("--mtp", type=int, default=2, help="draft tokens for the speculation column (0: skip)")
    ap.add_argument("--speculative-max-batch", type=int, default=None,
                    help="largest batch that speculates (default: the engine's, by device)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for both engines")
    ap.add_argument("--preset", default="small", help="preset of the random model made without --model")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--prompt", default=None, help="a text prompt for every row (default: random tokens)")
    ap.add_argument("--no-transformers", action="store_true",
                    help="skip the transformers column (and loading transformers: it need not be installed)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall-clock time, or CPU time of this thread (with --threads 1: what contention barely moves)")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1 or args.device != "cpu":
            ap.error("--clock cpu counts only this thread's CPU time: use it with --threads 1 on the CPU")
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if not args.no_transformers:
        require("transformers")

    from nanoseek import LLM, SamplingParams
    from nanoseek.checkpoint import save_model
    from nanoseek.config import preset
    from nanoseek.device import resolve_device, resolve_dtype
    from nanoseek.info import model_stats
    from nanoseek.model.transformer import Transformer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory()
        torch.manual_seed(0)
        args.model = os.path.join(tmp.name, args.preset)
        save_model(Transformer(preset(args.preset)), args.model)
    hf = None
    if not args.no_transformers:
        from transformers import DeepseekV3ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        # ignores the MTP layer's keys
        hf = DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    engines = {k: LLM(args.model, max_num_seqs=max(args.batches), enable_prefix_caching=False, speculative_mtp=k,
                      speculative_max_batch=args.speculative_max_batch, device=device, dtype=dtype)
               for k in ([0, args.mtp] if args.mtp else [0])}
    cfg = engines[0].model.config
    where = torch.cuda.get_device_name(device) if cuda else f"{args.threads} threads"
    print(f"model: {args.model} ({model_stats(cfg).total_params / 1e6:.1f}M parameters), "
          f"{args.new_tokens} new tokens, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, ignore eos, {device} ({where}), {str(dtype).removeprefix('torch.')}, "
          f"best of {args.repeats}" + (", MTP speed-up from median times" if args.mtp else ""))

    def ours(llm, prompts):
        def run(n):
            llm.generate(prompts, SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True, seed=0))
            sync()
        return run

    def theirs(prompts):
        ids = torch.tensor(prompts, device=device)

        def run(n):
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=args.temperature > 0, temperature=args.temperature or None, top_k=None,
                            top_p=None, pad_token_id=0)
            sync()
        return run

    g = torch.Generator().manual_seed(0)
    warm = torch.randint(2, cfg.vocab_size, (2, 8), generator=g).tolist()
    for llm in engines.values():
        ours(llm, warm)(4)
    if hf is not None:
        theirs(warm)(4)

    results = []
    header = f"{'batch':>5} {'prompt':>6} | {'nanoseek tok/s':>14}"
    if hf is not None:
        header += f" | {'transformers tok/s':>18} | {'ratio':>6}"
    if args.mtp:
        header += f" | {'MTP k=' + str(args.mtp) + ' accept':>15} | {'MTP speed-up':>12}"
    print("\n" + header + "\n" + "-" * len(header))
    if args.prompt is not None:
        args.prompt_lens = [len(engines[0].prompt_ids(args.prompt))]
    context = engines[0].max_model_len
    too_long = [n for n in args.prompt_lens if n + args.new_tokens > context]
    if too_long:  # a small model's context (the reasoning base: 256) cannot hold the default lengths
        print(f"skipping prompt lengths {too_long}: with {args.new_tokens} new tokens they exceed the "
              f"model's context of {context} tokens", file=sys.stderr)
    for prompt_len in [n for n in args.prompt_lens if n + args.new_tokens <= context]:
        for batch in args.batches:
            if args.prompt is not None:
                prompts = [engines[0].prompt_ids(args.prompt)] * batch
            else:
                prompts = torch.randint(2, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
            if cuda:  # capture this shape's CUDA graphs (and warm transformers alike) before any timing
                for llm in engines.values():
                    ours(llm, prompts)(4)
                if hf is not None:
                    theirs(prompts)(4)
            memory = {}
            if cuda:  # each engine's peak above what all three hold resident, plus what it holds itself
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            if args.mtp:  # plain and speculative in turn, for a fair speed-up on a shared machine
                spec = engines[args.mtp]
                before = spec.stats()
                (rate, median_rate), (_, median_mtp_rate) = interleaved_decode_rates(
                    [ours(engines[0], prompts), ours(spec, prompts)], batch, args.new_tokens, args.repeats)
                after = spec.stats()
            else:
                rate = decode_rate(ours(engines[0], prompts), batch, args.new_tokens, args.repeats)
            if cuda:
                memory["nanoseek"] = torch.cuda.max_memory_allocated(device) - resident + engine_bytes(engines[0])
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            record = {"batch": batch, "prompt_len": prompt_len, "nanoseek_tokens_per_s": rate}
            line = f"{batch:>5} {prompt_len:>6} | {rate:>14.1f}"
            if hf is not None:
                hf_rate = decode_rate(theirs(prompts), batch, args.new_tokens, args.repeats)
                if cuda:
                    memory["transformers"] = torch.cuda.max_memory_allocated(device) - resident + held_bytes(hf)
                record.update(transformers_tokens_per_s=hf_rate, ratio=rate / hf_rate)
                line += f" | {hf_rate:>18.1f} | {rate / hf_rate:>5.2f}x"
            record.update({f"{k}_peak_memory_bytes": v for k, v in memory.items()})
            if args.mtp:
                drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
                accept = (after["spec_accepted_tokens"] - before["spec_accepted_tokens"]) / drafted if drafted else None
                shown = f"{accept:.2f}" if drafted else "off"  # above speculative_max_batch
                speedup = median_mtp_rate / median_rate  # medians: the best of few runs is noisier
                line += f" | {shown:>15} | {speedup:>11.2f}x"
                record.update(mtp_tokens_per_s=median_mtp_rate, mtp_acceptance=accept, mtp_speedup=speedup)
            results.append(record)
            print(line, flush=True)

    # cache bytes per token: the latent cache vs the per-head K/V cache of the same model
    itemsize = dtype.itemsize
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    latent = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
    mha = L * H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * itemsize
    print(f"\nKV cache per token ({L} layers, {itemsize}-byte values): nanoseek latent {latent} B, "
          f"multi-head K/V (transformers) {mha} B: {mha / latent:.1f}x smaller")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "dtype": str(dtype), "new_tokens": args.new_tokens, "results": results,
                       "latent_bytes_per_token": latent, "mha_bytes_per_token": mha}, f, indent=2)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
