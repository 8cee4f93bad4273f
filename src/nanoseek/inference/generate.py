"""`nanoseek generate`: complete prompts with a checkpoint from the command line.

    nanoseek generate --model runs/small --prompt "Once upon a time" --max-tokens 64
    nanoseek generate --model runs/small --prompt "a" --prompt "b" --n 4 --temperature 0.8 --seed 0

Each completion is printed in full; throughput and prefix-cache figures go to stderr. A single
prompt with --stream prints tokens as they are produced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nanoseek.device import add_device_arguments, add_quantize_argument, at_least
from nanoseek.errors import NanoseekError
from nanoseek.train.checkpointing import checkpoint_argument


def context_length(text: str) -> int:
    """argparse type for --max-model-len (generate, chat, serve): a positive number of tokens. A
    usage error otherwise; -5 used to fail in the cache sizing and 0 to mean the model's default."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a context length: give a positive number of tokens, "
                                         "or leave --max-model-len out for the model's own")
    return n


def add_speculative_arguments(parser) -> None:
    """--speculative-mtp / --speculative-max-batch (generate, chat, serve)."""
    parser.add_argument("--speculative-mtp", type=int, default=0, metavar="K",
                        help="draft K tokens per step with the model's MTP module (greedy output unchanged)")
    parser.add_argument("--speculative-max-batch", type=at_least(0, "a batch size: 0 (never speculate) or more"),
                        default=None, metavar="N",
                        help="speculate only while at most N sequences decode (default: 1 on a CPU, 32 on a GPU "
                             "decoding eagerly, 0 = never where decode steps replay CUDA graphs)")


def note_speculation(llm, args) -> None:
    """Say (one stderr line) when --speculative-mtp was asked for but the device's default turns it off."""
    if llm.speculative_mtp and not llm.speculative_max_batch and args.speculative_max_batch is None:
        print(f"nanoseek {args.command}: --speculative-mtp {llm.speculative_mtp} is off by default where decode "
              "steps replay CUDA graphs (against a graphed plain step it has not yet been measured to pay); "
              "--speculative-max-batch N turns it on up to batch N", file=sys.stderr)


def note_max_model_len(llm, requested: int | None, command: str) -> None:
    """Say (one stderr line) when the engine runs with a shorter context than --max-model-len asked for."""
    if requested is None or llm.max_model_len >= requested:
        return
    positions = llm.model.config.max_position_embeddings
    why = (f"the model's {positions} positions (max_position_embeddings)" if llm.max_model_len == positions
           else f"the KV cache holds ({llm.max_model_len} tokens)")
    print(f"nanoseek {command}: --max-model-len {requested} is more than {why}; using {llm.max_model_len}",
          file=sys.stderr)


def add_engine_arguments(parser) -> None:
    """The model and sampling flags `generate` and `chat` share."""
    parser.add_argument("--model", required=True, type=checkpoint_argument,
                        help="checkpoint directory (weights + tokenizer), or a run directory: its latest checkpoint")
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens per completion")
    shipped = "default: the checkpoint's generation_config.json, else"
    parser.add_argument("--temperature", type=float, default=None, help=f"0 is greedy ({shipped} 0)")
    parser.add_argument("--top-p", type=float, default=None, help=f"({shipped} 1)")
    parser.add_argument("--top-k", type=int, default=None, help=f"0: no limit ({shipped} 0)")
    parser.add_argument("--seed", type=int, default=None)
    add_speculative_arguments(parser)
    parser.add_argument("--max-model-len", type=context_length, default=None,
                        help="context length in tokens (default, and at most: the model's)")
    add_device_arguments(parser)
    add_quantize_argument(parser)


# Without flags or a generation_config.json that sets them: greedy decoding.
CLI_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


def sampling_settings(args) -> dict:
    """The SamplingParams fields --temperature / --top-p / --top-k give, the rest from the
    checkpoint's generation_config.json (as vLLM and transformers read it: R1-Distill ships
    temperature 0.6, top_p 0.95), else greedy; one stderr line names what came from the file."""
    from nanoseek.checkpoint import generation_defaults

    given = {k: getattr(args, k) for k in CLI_SAMPLING if getattr(args, k) is not None}
    shipped = {k: v for k, v in generation_defaults(args.model).items() if k not in given}
    if shipped:
        print(f"nanoseek {args.command}: {', '.join(f'{k} {v}' for k, v in shipped.items())} "
              "from the checkpoint's generation_config.json", file=sys.stderr)
    return {**CLI_SAMPLING, **shipped, **given}


def build_engine(args):
    from nanoseek.inference.engine import LLM

    llm = LLM(args.model, max_model_len=args.max_model_len, speculative_mtp=args.speculative_mtp,
              speculative_max_batch=args.speculative_max_batch, device=args.device, dtype=args.dtype,
              quantize=args.quantize, enforce_eager=args.enforce_eager)
    if llm.tokenizer is None:
        raise NanoseekError(f"{args.model} has no tokenizer.json; save the checkpoint with its tokenizer")
    note_max_model_len(llm, args.max_model_len, args.command)
    note_speculation(llm, args)
    return llm


def add_arguments(parser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt, n=1)")
    parser.add_argument("--json-schema", default=None, metavar="SCHEMA",
                        help="the output must be JSON matching this schema: its JSON text, or @FILE "
                             "('{\"type\": \"object\"}' for any JSON object); needs outlines-core (the serve extra)")
    parser.add_argument("--regex", default=None, help="the output must match this regular expression")


def chat_template_kwargs_argument(value: str) -> dict:
    """--chat-template-kwargs / --default-chat-template-kwargs: a JSON object, e.g. '{"thinking": true}'."""
    try:
        kwargs = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at position {e.pos}): give an object such as "
                                         "'{\"thinking\": true}'") from None
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError("give a JSON object such as '{\"thinking\": true}'")
    return kwargs


def json_schema_argument(value: str | None) -> str | None:
    """--json-schema: the schema's JSON text as given, or read from @FILE."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise NanoseekError(f"--json-schema {value}: no such file; give the schema's JSON text or @FILE of a schema")
    return path.read_text()


def run(args) -> int:
    from nanoseek.inference.sampling import SamplingParams

    params = SamplingParams(n=args.n, **sampling_settings(args), seed=args.seed, max_tokens=args.max_tokens,
                            json_schema=json_schema_argument(args.json_schema), regex=args.regex)
    params.validate()  # a bad flag is reported before the model loads
    llm = build_engine(args)
    start = time.perf_counter()
    if args.stream:
        if len(args.prompt) != 1 or args.n != 1:
            raise NanoseekError("--stream takes one --prompt and --n 1")
        shown, outs = 0, []
        for out in llm.stream(args.prompt[0], params):
            outs = [out]  # the last one carries the finish reason
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        print()
    else:
        outs = llm.generate(args.prompt, params)
        for i, out in enumerate(outs):
            for c in out.outputs:
                label = f"[{i}]" if args.n == 1 else f"[{i}.{c.index}]"
                print(f"{label} {out.prompt}{c.text}  ({c.finish_reason})")
    if any(c.finish_reason == "length" and len(c.token_ids) < args.max_tokens for o in outs for c in o.outputs):
        print(f"nanoseek generate: the context ({llm.max_model_len} tokens, prompt included) ended a completion "
              f"before --max-tokens {args.max_tokens}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    s = llm.stats()
    line = (f"{s['generation_tokens']} tokens in {elapsed:.2f}s ({s['generation_tokens'] / elapsed:.1f} tok/s), "
            f"{s['prefix_cache_hit_tokens']}/{s['prompt_tokens']} prompt tokens from the prefix cache")
    if args.speculative_mtp and s["spec_draft_tokens"]:
        line += f", MTP acceptance {s['spec_acceptance_rate']:.2f}"
    elif args.speculative_mtp:
        why = ("speculation is off (--speculative-max-batch 0)" if not llm.speculative_max_batch else
               "no decode step ran" if s["generation_tokens"] <= len(args.prompt) * args.n else
               f"every decode step ran more than --speculative-max-batch {llm.speculative_max_batch} sequences")
        line += f", no MTP drafts: {why}"
    print(line, file=sys.stderr)
    return 0
