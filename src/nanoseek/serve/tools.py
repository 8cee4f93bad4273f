"""Function calling: the model's tool calls, parsed out of its text in DeepSeek's formats.

DeepSeek's chat models write tool calls with special tokens, after any content (and, for a
reasoning model, after its `</think>`: the parser only ever sees the answer part):

    deepseek_v3  (V2.5, V3, V3-0324, R1-0528):
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>
        \\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>
    deepseek_v31 (V3.1, V3.2's chat template):
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

(vLLM's `--tool-call-parser deepseek_v3` / `deepseek_v31` read the same.) Which one a checkpoint
speaks is what its own chat template writes for a past tool call (`detect_format`), or what
`--tool-call-parser` says.

`ToolCallParser` is incremental, like the reasoning splitter: `feed(text)` takes any chunking of
the text and returns events, the same whatever the chunking: ("content", text) for text before
the calls, ("call", index, name) once a call's header is complete, ("arguments", index, text) as its
arguments arrive (the tail that may be the start of the closing marker is held back). The markers
themselves never reach the content. Text that breaks the format is content: a section that goes
wrong before its first call is released as content, as is the rest after a call that goes wrong
(then `succeeded` is False: the finish reason stays the engine's, not "tool_calls"). A call's
arguments must be a JSON object. The whole-text parse (`parse_tool_calls`, non-streaming) is all
or nothing: any malformed call, and the whole text is content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP


@dataclass(frozen=True)
class ToolCallFormat:
    """One of DeepSeek's tool-call formats: how a call's header and its arguments are written."""

    name: str
    v3_header: bool  # deepseek_v3: "function<｜tool▁sep｜>NAME\n```json\n"; deepseek_v31: "NAME<｜tool▁sep｜>"
    arguments_end: str  # what closes the arguments: the rest of the call is this marker

    def parse_header(self, text: str) -> tuple[str, int] | None:
        """(function name, header length) when `text` starts with a complete header; None when more
        text may still complete it; raises ValueError when it cannot be one."""
        sep = text.find(TOOL_SEP)
        if sep < 0:
            if "\n" in text or TOOL_CALL_END in text or (not self.v3_header and _has_space(text)):
                raise ValueError("no <｜tool▁sep｜> in the call's header")
            return None
        before, after = text[:sep], text[sep + len(TOOL_SEP):]
        if not self.v3_header:
            return _checked_name(before), sep + len(TOOL_SEP)
        if not before or _has_space(before):
            raise ValueError(f"bad call type {before!r}")
        newline = after.find("\n")
        if newline < 0:
            if _has_space(after) or TOOL_CALL_END in after:
                raise ValueError("bad function name")
            return None
        name, rest = _checked_name(after[:newline]), after[newline:]
        fence = "\n```json\n"
        if len(rest) < len(fence):
            if not fence.startswith(rest):
                raise ValueError("no ```json fence after the function name")
            return None
        if not rest.startswith(fence):
            raise ValueError("no ```json fence after the function name")
        return name, sep + len(TOOL_SEP) + newline + len(fence)

    def call_text(self, name: str, arguments: str) -> str:
        """One call, as the model writes it (tests and the tool_choice constraint build on this)."""
        if self.v3_header:
            return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{arguments}\n```{TOOL_CALL_END}"
        return f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{arguments}{TOOL_CALL_END}"

    @property
    def call_separator(self) -> str:
        return "\n" if self.v3_header else ""


DEEPSEEK_V3 = ToolCallFormat("deepseek_v3", True, "\n```" + TOOL_CALL_END)
DEEPSEEK_V31 = ToolCallFormat("deepseek_v31", False, TOOL_CALL_END)
FORMATS = {f.name: f for f in (DEEPSEEK_V3, DEEPSEEK_V31)}


def _has_space(text: str) -> bool:
    return any(c.isspace() for c in text)


def _checked_name(name: str) -> str:
    if not name or _has_space(name) or "<｜" in name:
        raise ValueError(f"bad function name {name!r}")
    return name


def _partial_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (still arriving)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def render_calls(fmt: ToolCallFormat, calls: list[tuple[str, str]]) -> str:
    """A tool-call section as the model writes it: [(name, arguments JSON), ...]."""
    body = fmt.call_separator.join(fmt.call_text(name, arguments) for name, arguments in calls)
    return TOOL_CALLS_BEGIN + body + TOOL_CALLS_END


def detect_format(tokenizer) -> ToolCallFormat | None:
    """The format the tokenizer's chat template writes a past tool call in (None: neither, or the
    template does not render tool calls): a probe conversation is rendered and read back."""
    probe = [{"role": "user", "content": "x"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_0", "type": "function", "function": {"name": "probe_fn", "arguments": '{"a": 1}'}}]}]
    try:
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that cannot render tool calls has no format
        return None
    start = text.find(TOOL_CALLS_BEGIN)
    if start < 0:
        return None
    for fmt in FORMATS.values():
        content, calls = parse_tool_calls(text[start:], fmt)
        if [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("probe_fn", {"a": 1})]:
            return fmt
    return None


class ToolCallParser:
    """Incremental tool-call parser over one choice's answer text; see the module docstring.

    States: "content" (before the calls), "calls" (between calls), "header" (a call's type and
    name), "arguments", "after" (past <｜tool▁calls▁end｜>), "content_only" (the format broke:
    everything else is content).
    """

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self.state = "content"
        self.buffer = ""       # text not yet released
        self.section = ""      # the raw section since <｜tool▁calls▁begin｜>, while no call has started
        self.calls: list[dict] = []   # {"name", "arguments"} per started call
        self.complete = 0      # calls closed with a JSON object as arguments
        self.failed = False

    @property
    def succeeded(self) -> bool:
        """Every call the text started was complete and well-formed (and there was at least one)."""
        return self.complete > 0 and self.complete == len(self.calls) and not self.failed

    def feed(self, text: str) -> list[tuple]:
        self.buffer += text
        events: list[tuple] = []
        while self.buffer:
            before = (self.state, len(self.buffer))
            self._advance(events)
            if (self.state, len(self.buffer)) == before:  # waiting for more text
                break
        return _merged(events)

    def finish(self) -> list[tuple]:
        """End of the text: release what was held back. A call still open is malformed (its text
        goes out as arguments); a section that never reached its first call is content."""
        events: list[tuple] = []
        rest, self.buffer = self.buffer, ""
        if self.state in ("content", "content_only", "after"):
            events.append(("content", rest))
        elif self.state == "arguments":
            self.failed = True
            events.append(("arguments", len(self.calls) - 1, rest))
        elif self.state == "calls" and self.calls:
            pass  # <｜tool▁calls▁end｜> missing after complete calls: tolerated
        else:  # the section broke off before (or inside) a call header
            self._fail(events, rest)
        return _merged([e for e in events if e[-1]])

    def _fail(self, events: list, rest: str) -> None:
        """The text stopped following the format: what is held (the section so far, if no call
        started) and the rest go out as content from now on."""
        self.failed = True
        events.append(("content", (self.section if not self.calls else "") + rest))
        self.state, self.section = "content_only", ""

    def _take(self, n: int) -> str:
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        if not self.calls:
            self.section += taken
        return taken

    def _advance(self, events: list) -> None:
        """One step of the state machine; leaves the buffer untouched when it needs more text."""
        buf = self.buffer
        if self.state in ("content", "after", "content_only"):
            if self.state == "content":
                start = buf.find(TOOL_CALLS_BEGIN)
                if start >= 0:
                    events.append(("content", buf[:start]))
                    self.buffer = buf[start:]
                    self._take(len(TOOL_CALLS_BEGIN))
                    self.state = "calls"
                    return
                keep = _partial_len(buf, TOOL_CALLS_BEGIN)
                events.append(("content", buf[:len(buf) - keep]))
                self.buffer = buf[len(buf) - keep:]
            else:  # text after the section (rarely more than whitespace): content
                events.append(("content", buf))
                self.buffer = ""
        elif self.state == "calls":
            stripped = buf.lstrip()
            skipped = len(buf) - len(stripped)
            if stripped.startswith(TOOL_CALL_BEGIN):
                self._take(skipped + len(TOOL_CALL_BEGIN))
                self.state = "header"
            elif stripped.startswith(TOOL_CALLS_END):
                self._take(skipped + len(TOOL_CALLS_END))
                self.state = "after" if self.calls else "content_only"
                if not self.calls:  # an empty section: nothing was called
                    self._fail(events, "")
            elif stripped and not (TOOL_CALL_BEGIN.startswith(stripped) or TOOL_CALLS_END.startswith(stripped)):
                self.buffer = ""
                self._fail(events, buf)
        elif self.state == "header":
            try:
                parsed = self.fmt.parse_header(buf)
            except ValueError:
                self.buffer = ""
                self._fail(events, buf)
                return
            if parsed is not None:
                name, length = parsed
                self._take(length)
                self.calls.append({"name": name, "arguments": ""})
                self.section = ""
                events.append(("call", len(self.calls) - 1, name))
                self.state = "arguments"
        elif self.state == "arguments":
            index, end_marker = len(self.calls) - 1, self.fmt.arguments_end
            end = buf.find(end_marker)
            if end >= 0:
                self._arguments(events, index, buf[:end])
                self.buffer = buf[end + len(end_marker):]
                if _is_json_object(self.calls[index]["arguments"]):
                    self.complete += 1
                    self.state = "calls"
                else:
                    self._fail(events, "")
            else:
                keep = _partial_len(buf, end_marker)
                self._arguments(events, index, buf[:len(buf) - keep])
                self.buffer = buf[len(buf) - keep:]

    def _arguments(self, events: list, index: int, text: str) -> None:
        self.calls[index]["arguments"] += text
        events.append(("arguments", index, text))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _merged(events: list[tuple]) -> list[tuple]:
    """Drop empty events and join neighbours of the same kind (one chunk each, not one per step)."""
    out: list[tuple] = []
    for e in events:
        if e[0] != "call" and not e[-1]:
            continue
        if out and e[0] != "call" and out[-1][:-1] == e[:-1]:
            out[-1] = (*e[:-1], out[-1][-1] + e[-1])
        else:
            out.append(e)
    return out


def parse_tool_calls(text: str, fmt: ToolCallFormat) -> tuple[str, list[dict]]:
    """Non-streaming: (content before the calls, [{"function": {"name", "arguments"}}, ...]). All or
    nothing: text that does not follow the format (a bad header, arguments that are not a JSON
    object, a call cut off) is all content, with no calls."""
    parser = ToolCallParser(fmt)
    events = parser.feed(text) + parser.finish()
    if not parser.succeeded:
        return text, []
    content = "".join(e[1] for e in events if e[0] == "content")
    return content, [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for c in parser.calls]


# ------------------------------------------------------------------ tool_choice "required" / a named function


_REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$#&\-~])")


def _literal(text: str) -> str:
    """`text` as a regex that matches exactly it (outlines-core's Rust regex syntax)."""
    return _REGEX_SPECIAL.sub(r"\\\1", text).replace("\n", "\\n")


def tool_call_regex(fmt: ToolCallFormat, tools: list[dict], several: bool) -> str:
    """A regex of a tool-call section that calls one of `tools` (OpenAI function specs), with
    arguments that match the function's parameters schema; `several`: one or more calls. What
    tool_choice "required" or a named function is enforced with (the structured-output guide)."""
    from nanoseek.inference.structured import _outlines

    build_regex_from_schema = _outlines().json_schema.build_regex_from_schema  # a clear error if not installed
    alternatives = []
    for tool in tools:
        function = tool["function"]
        schema = function.get("parameters") or {"type": "object"}
        try:
            arguments = build_regex_from_schema(json.dumps(schema))
        except (ValueError, TypeError, RuntimeError) as e:
            raise NanoseekError(f"the parameters of function {function['name']!r} cannot be enforced: {e}") from None
        marker = "\x00ARGUMENTS\x00"  # stands for the arguments while the rest is escaped
        alternatives.append(_literal(fmt.call_text(function["name"], marker)).replace(_literal(marker),
                                                                                     f"({arguments})"))
    call = "(" + "|".join(alternatives) + ")"
    calls = f"{call}({_literal(fmt.call_separator)}{call})*" if several else call
    return _literal(TOOL_CALLS_BEGIN) + calls + _literal(TOOL_CALLS_END)
