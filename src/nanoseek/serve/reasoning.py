"""Split generated text into reasoning (`<think>...</think>`) and answer, as DeepSeek's API does.

DeepSeek returns the chain of thought as `message.reasoning_content` (`delta.reasoning_content` when
streaming) and the answer as `content`. The splitter works on text, not token ids, so it is the same
for every tokenizer, and it is incremental: `feed(delta)` can be called with arbitrary chunks of the
text (a tag may arrive split across chunks, e.g. "</th" + "ink>") and the result never depends on how
the text was chunked. Non-streaming responses are the one-chunk case of the same machine.

The rules, following SGLang's DeepSeek-R1 detector:

- If the prompt already ends with `<think>` (DeepSeek-R1's updated chat template appends "<think>\\n",
  V3.2's and V4's encoders "<think>" in thinking mode), the model starts inside its reasoning and only
  a closing `</think>` will appear: start in reasoning. Their chat mode ends the prompt with `</think>`,
  which closes the block before the model writes: its output is the answer.
- Otherwise, reasoning happens only if the output *starts* with `<think>` (leading whitespace allowed).
  A model that answers straight away gets everything as `content`.
- Inside reasoning, everything up to the first `</think>` is reasoning; after it, everything is content.
  Whitespace right after `<think>` and right after `</think>` is dropped (R1 writes "<think>\\n...</think>\\n\\n"),
  and so is a redundant `<think>` at the start of an output whose prompt already opened the block.
- `finish()` flushes text held back as a possible partial tag; an unterminated reasoning block (the
  generation hit max_tokens mid-thought) stays reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.tokenizer import THINK_END, THINK_START


@dataclass
class Delta:
    """The text one `feed` released, by destination; either may be empty."""

    reasoning: str = ""
    content: str = ""

    def __iadd__(self, other: "Delta") -> "Delta":
        self.reasoning += other.reasoning
        self.content += other.content
        return self


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the prompt leaves the model inside a `<think>` block (R1's updated template)."""
    return prompt.rstrip().endswith(THINK_START)


def leaves_reasoning_open(text: str) -> bool:
    """True when `text` has a `<think>` that no `</think>` follows: a message that a prefix
    completion continues inside its reasoning."""
    return text.rfind(THINK_START) > text.rfind(THINK_END)


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (a tag still arriving)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Incremental `<think>` splitter; see the module docstring for the rules.

    States: "start" (output has not yet shown whether it reasons), "skip_ws_reasoning" / "reasoning"
    (inside the think block), "skip_ws_content" / "content" (after it, or no reasoning at all).
    """

    def __init__(self, in_reasoning: bool = False):
        self.state = "skip_ws_reasoning" if in_reasoning else "start"
        self.buffer = ""  # text not yet released: a possible partial tag, or leading whitespace
        self.saw_reasoning = in_reasoning

    def feed(self, text: str) -> Delta:
        """Consume the next chunk of generated text; return what can be released now."""
        self.buffer += text
        out = Delta()
        while self.buffer:
            before = (self.state, len(self.buffer))
            self._advance(out)
            if (self.state, len(self.buffer)) == before:  # waiting for more text
                break
        return out

    def finish(self) -> Delta:
        """End of generation: release whatever was held back, in the current state's field."""
        out = Delta()
        rest, self.buffer = self.buffer, ""
        if self.state in ("reasoning", "skip_ws_reasoning"):
            out.reasoning = rest.lstrip() if self.state == "skip_ws_reasoning" else rest
        else:
            out.content = rest.lstrip() if self.state == "skip_ws_content" else rest
        return out

    def _advance(self, out: Delta) -> None:
        """One transition of the state machine; leaves the buffer untouched when it needs more text."""
        buf = self.buffer
        if self.state == "start":
            stripped = buf.lstrip()
            if not stripped:
                return  # only whitespace so far: cannot tell yet
            if stripped.startswith(THINK_START):
                self.buffer = stripped[len(THINK_START):]
                self.state, self.saw_reasoning = "skip_ws_reasoning", True
            elif not THINK_START.startswith(stripped):  # cannot become "<think>": a plain answer
                self.state = "content"
        elif self.state == "skip_ws_reasoning":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):  # a model that writes <think> although the prompt had it
                self.buffer = stripped[len(THINK_START):]
            elif stripped and not THINK_START.startswith(stripped):
                self.buffer, self.state = stripped, "reasoning"
        elif self.state == "skip_ws_content":
            self.buffer = buf.lstrip()
            if self.buffer:
                self.state = "content"
        elif self.state == "reasoning":
            end = buf.find(THINK_END)
            if end >= 0:
                out.reasoning += buf[:end]
                self.buffer = buf[end + len(THINK_END):]
                self.state = "skip_ws_content"
            else:
                keep = _partial_tag_len(buf, THINK_END)
                out.reasoning += buf[:len(buf) - keep]
                self.buffer = buf[len(buf) - keep:]
        else:  # content: everything goes through, tags included
            out.content += buf
            self.buffer = ""


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str | None]:
    """Non-streaming split: (reasoning_content, content), None where a part is absent (DeepSeek's shape)."""
    splitter = ReasoningSplitter(in_reasoning)
    out = splitter.feed(text)
    out += splitter.finish()
    if not splitter.saw_reasoning:
        return None, out.content
    return out.reasoning, out.content or None
