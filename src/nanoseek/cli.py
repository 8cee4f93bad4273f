"""The `nanoseek` command: one subcommand per stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int | None`; the table below
maps subcommand names to those modules, so a stage is added by writing its module and one line
here. User errors (`NanoseekError`) print one clear line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nanoseek import __version__
from nanoseek.errors import NanoseekError

# subcommand -> (module, one-line help). Modules are imported lazily, only for the chosen command.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("nanoseek.info", "parameter counts and KV-cache size of a preset or checkpoint"),
    "tokenizer": ("nanoseek.tokenizer", "train a byte-level BPE with DeepSeek's special tokens and chat template"),
    "data": ("nanoseek.data.corpus", "tokenize text/jsonl/json/parquet corpora into token shards for pretraining"),
    "generate": ("nanoseek.inference.generate", "complete prompts with a checkpoint (sampling, n samples, MTP speculation)"),
    "chat": ("nanoseek.inference.chat", "terminal chat with a checkpoint through its chat template, streamed"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain a DeepSeek-V3 model (next-token + MTP loss, aux-loss-free balancing)"),
    "serve": ("nanoseek.serve.api", "OpenAI/DeepSeek-compatible HTTP server (chat, completions, reasoning_content, SSE) and chat page"),
    "sft": ("nanoseek.train.sft", "supervised fine-tuning on chat / prompt-completion jsonl (loss on assistant tokens, packing)"),
    "distill": ("nanoseek.train.distill", "R1-Distill: rejection-sample a teacher's verified traces, fine-tune a student on them"),
    "rl": ("nanoseek.train.grpo", "R1-Zero RL: GRPO / Dr. GRPO / DAPO with rule-based rewards, from a base checkpoint"),
    "grm": ("nanoseek.train.grm", "DeepSeek-GRM: train a generative reward model (cold start, RFT, +1/-1 RL, meta RM) and measure voting"),
    "judge": ("nanoseek.grm", "judge responses with a generative reward model: principles, critique, scores; k votes, meta RM"),
    "eval": ("nanoseek.eval", "pass@1 / pass@k / maj@k of a checkpoint on a task's held-out problems"),
    "speedrun": ("nanoseek.speedrun", "the whole recipe in one command (every stage, resumable) and its report card"),
}

# Optional packages (pyproject.toml's extras) -> the extra that installs each, so that a command run
# without one (`nanoseek serve` without fastapi) says what to install instead of a traceback.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "reasoning_gym": "rl", "math_verify": "rl"}


def _missing_extra(e: ModuleNotFoundError) -> str:
    """The error line for a missing optional package; any other missing module is a bug, re-raised."""
    package = (e.name or "").partition(".")[0]
    if package not in EXTRAS:
        raise e
    return f"needs {package}, which is not installed: pip install -e '.[{EXTRAS[package]}]'"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek recipe at toy scale.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    chosen, parsers = argv[0] if argv else None, {}
    for name, (module, help_text) in COMMANDS.items():
        p = parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:
            try:  # the command's module is imported here, before run()'s handlers below apply
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as e:
                print(f"nanoseek {name}: error: {_missing_extra(e)}", file=sys.stderr)
                return 2
    args, extra = parser.parse_known_args(argv)
    # a training stage's key=value overrides may follow an option (`--resume max_steps=5`), where
    # argparse has already closed the positional list: they are overrides all the same
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:  # argparse's usage error, from the subcommand's parser so it shows that command's usage
        parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = importlib.import_module(args._module).run(args)
    except NanoseekError as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package imported only when needed (uvicorn)
        print(f"nanoseek {args.command}: error: {_missing_extra(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nanoseek info ... | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
        return 141  # what a shell reports for a command that SIGPIPE ended
    except KeyboardInterrupt:
        # A training stage saves when Ctrl-C comes during a step; this is setup or a second Ctrl-C.
        training = args._module.startswith("nanoseek.train.")
        lost = "; nothing saved since the last checkpoint, if any" if training else ""
        print(f"nanoseek {args.command}: interrupted{lost}", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
