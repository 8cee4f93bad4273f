"""`nanoseek chat`: a terminal chat with a checkpoint, streamed through its own chat template.

    nanoseek chat --model runs/r1-zero --temperature 0.6

Replies stream as they are generated. A reasoning model's `<think>...</think>` part is shown
dimmed when stdout is a terminal. As DeepSeek-R1 recommends, earlier turns' reasoning is not sent
back: the history keeps only each reply's final answer. Type /reset to start over, /exit (or
Ctrl-D) to leave. A turn that fails (the conversation outgrows the context, the chat template
refuses it) is reported and dropped; the conversation before it goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nanoseek.errors import ContextLengthError, NanoseekError
from nanoseek.inference.generate import (add_engine_arguments, build_engine, chat_template_kwargs_argument,
                                         sampling_settings)
from nanoseek.serve.reasoning import prompt_opens_reasoning
from nanoseek.tokenizer import Tokenizer
from nanoseek.tokenizer import THINK_END, THINK_START

DIM, RESET = "\033[2m", "\033[0m"


def styled(text: str, tty: bool, in_reasoning: bool = False) -> str:
    """The reply as printed: the think part dimmed on a terminal (from the start when the prompt
    opened the think block, as R1's template does). Growing text gives growing output (the think
    tags are single tokens, so they never arrive split), so deltas can be printed."""
    if not tty:
        return text
    return (DIM if in_reasoning else "") + text.replace(THINK_START, DIM + THINK_START).replace(
        THINK_END, THINK_END + RESET)


def final_answer(reply: str) -> str:
    return reply.split(THINK_END, 1)[1].strip() if THINK_END in reply else reply.strip()


def turn_error(e: NanoseekError, history: list[dict], system: bool = False) -> str:
    """The one line a failed turn prints: what failed and what the user can do about it here.
    `history` is the conversation before the failed message; `system`: a --system prompt is sent."""
    if isinstance(e, ContextLengthError) and e.tokens is not None:
        if history:  # the earlier turns are what fills the context
            return (f"message not sent: with the earlier turns the prompt would be {e.tokens} tokens, but the "
                    f"context holds {e.limit}; /reset to start a new conversation (or send a shorter message)")
        return (f"message not sent: the prompt would be {e.tokens} tokens, but the context holds {e.limit}; "
                "shorten the message" + (" or the --system prompt" if system else ""))
    return f"{e}; message not sent" + ("; /reset starts a new conversation" if history else "")


def fits(llm, messages: list[dict], template_kwargs: dict | None = None) -> bool:
    """Whether `messages` leave room in the context for a reply (False where the template fails too)."""
    try:
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   chat_template_kwargs=template_kwargs)
    except NanoseekError:
        return False
    return len(llm.tokenizer.encode(prompt)) < llm.max_model_len


def stream_reply(llm, messages: list[dict], params, tty: bool, template_kwargs: dict | None = None) -> str:
    """Stream the model's reply to `messages` to stdout; returns its text."""
    # the checkpoint's own template; its text tokenized as it is (it writes bos itself)
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               chat_template_kwargs=template_kwargs)
    in_reasoning = prompt_opens_reasoning(prompt)
    shown, text = "", ""
    for out in llm.stream(llm.tokenizer.encode(prompt), params):
        text = out.outputs[0].text
        now = styled(text, tty, in_reasoning)
        sys.stdout.write(now[len(shown):])
        sys.stdout.flush()
        shown = now
    print(RESET if tty and (in_reasoning or THINK_START in text) and THINK_END not in text else "")
    return text


def add_arguments(parser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--chat-template-kwargs", type=chat_template_kwargs_argument, default=None, metavar="JSON",
                        help="extra chat-template variables, or the options of DeepSeek-V3.2's / V4's prompt "
                             "encoder: '{\"thinking\": true}' (V3.1, V3.2), '{\"reasoning_effort\": \"max\"}' (V4)")


def run(args) -> int:
    from nanoseek.inference.sampling import SamplingParams

    params = SamplingParams(**sampling_settings(args), seed=args.seed, max_tokens=args.max_tokens)
    params.validate()  # a bad flag is reported before the model loads, not after the first message
    if (Path(args.model) / "tokenizer.json").is_file():  # so is a chat template that cannot render
        Tokenizer.from_dir(args.model).apply_chat_template([{"role": "user", "content": "hi"}],
                                                           chat_template_kwargs=args.chat_template_kwargs)
    llm = build_engine(args)
    tty = sys.stdout.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("nanoseek chat: /reset clears the conversation, /exit leaves", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            history = []
            continue
        if not user:
            continue
        message = {"role": "user", "content": user}
        try:  # the engine and the template check before generating, so a failed turn printed nothing
            text = stream_reply(llm, system + history + [message], params, tty, args.chat_template_kwargs)
        except NanoseekError as e:  # this turn's problem, not the session's: report it and go on without it
            # the earlier turns are to blame (and /reset a way out) only if the message fits without them
            blamed = history if history and fits(llm, system + [message], args.chat_template_kwargs) else []
            print(f"nanoseek chat: error: {turn_error(e, blamed, bool(system))}", file=sys.stderr)
            continue
        history += [message, {"role": "assistant", "content": final_answer(text)}]
