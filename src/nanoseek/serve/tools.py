"""Function calling: the model's tool calls, parsed out of its text in DeepSeek's formats.

DeepSeek's chat models write tool calls with special tokens, after any content (and, for a
reasoning model, after its `</think>`: the parser only ever sees the answer part):

    deepseek_v3  (V2.5, V3, V3-0324, R1-0528):
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>
        \\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>
    deepseek_v31 (V3.1, V3.2's chat template):
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

    deepseek_v32 (DeepSeek-V3.2), deepseek_v4 (DeepSeek-V4; `tool_calls` instead of `function_calls`):
        DSML (nanoseek.dsml), after the content and a blank line:
        <｜DSML｜function_calls>
        <｜DSML｜invoke name="NAME">
        <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
        </｜DSML｜invoke>
        </｜DSML｜function_calls>

(vLLM's `--tool-call-parser deepseek_v3` / `deepseek_v31` / `deepseek_v32` / `deepseek_v4` read the
same.) Which one a checkpoint speaks is what its chat template (or V3.2's / V4's encoder) writes for
a past tool call (`detect_format`), or what `--tool-call-parser` says.

`ToolCallParser` is incremental, like the reasoning splitter: `feed(text)` takes any chunking of
the text and returns events, the same whatever the chunking: ("content", text) for text before
the calls, ("call", index, name) once a call's header is complete, ("arguments", index, text) as its
arguments arrive (the tail that may be the start of the closing marker is held back). The markers
themselves never reach the content. Text that breaks the format is content: a section that goes
wrong before its first call is released as content, as is the rest after a call that goes wrong
(then `succeeded` is False: the finish reason stays the engine's, not "tool_calls"). A call's
arguments must be a JSON object. The whole-text parse (`parse_tool_calls`, non-streaming) is all
or nothing: any malformed call, and the whole text is content.

`DSMLParser` reads DSML with the same events and guarantees. A call's arguments are rebuilt as a
JSON object from its parameters, as DeepSeek's reference parser does: a string="true" value becomes
a JSON string, a string="false" one goes in as the JSON it is (it must parse, else the call is
malformed); they go out parameter by parameter, `{"city": "Paris"`, `, "days": 3`, then `}` when
the invoke closes. Whitespace between the tags is free (the models write newlines), as is the
whitespace between the content and the block (DeepSeek writes a blank line; it is not content).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from nanoseek import dsml
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

    @property
    def start(self) -> str:
        return TOOL_CALLS_BEGIN

    def parser(self) -> "ToolCallParser":
        return ToolCallParser(self)


@dataclass(frozen=True)
class DSMLFormat:
    """DeepSeek-V3.2's or V4's DSML tool calls (they differ in the block's name)."""

    name: str  # "deepseek_v32" / "deepseek_v4", as nanoseek.dsml names the formats

    @property
    def start(self) -> str:
        return f"<{dsml.DSML}{dsml.CALLS_BLOCK[self.name]}>"

    @property
    def end(self) -> str:
        return f"</{dsml.DSML}{dsml.CALLS_BLOCK[self.name]}>"

    def parser(self) -> "DSMLParser":
        return DSMLParser(self)


DEEPSEEK_V3 = ToolCallFormat("deepseek_v3", True, "\n```" + TOOL_CALL_END)
DEEPSEEK_V31 = ToolCallFormat("deepseek_v31", False, TOOL_CALL_END)
DEEPSEEK_V32, DEEPSEEK_V4 = DSMLFormat("deepseek_v32"), DSMLFormat("deepseek_v4")
FORMATS = {f.name: f for f in (DEEPSEEK_V3, DEEPSEEK_V31, DEEPSEEK_V32, DEEPSEEK_V4)}


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


def detect_format(tokenizer) -> ToolCallFormat | DSMLFormat | None:
    """The format the tokenizer's chat template (or encoder) writes a past tool call in (None: none of
    them, or the template does not render tool calls): a probe conversation is rendered and read back."""
    probe = [{"role": "user", "content": "x"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_0", "type": "function", "function": {"name": "probe_fn", "arguments": '{"a": 1}'}}]}]
    try:
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that cannot render tool calls has no format
        return None
    for fmt in FORMATS.values():
        start = text.find(fmt.start)
        if start < 0:
            continue
        content, calls = parse_tool_calls(text[start:], fmt)
        if [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("probe_fn", {"a": 1})]:
            return fmt
    return None


class _IncrementalParser:
    """What both parsers share: `feed` runs the subclass's state machine (`_advance`, one step that
    leaves the buffer untouched while it needs more text) over everything buffered, and a parse
    succeeded when every call the text started was complete and well-formed (at least one)."""

    buffer: str
    state: str
    calls: list
    complete: int
    failed: bool

    @property
    def succeeded(self) -> bool:
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

    def _advance(self, events: list) -> None:
        raise NotImplementedError


class ToolCallParser(_IncrementalParser):
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


class DSMLParser(_IncrementalParser):
    """Incremental DSML tool-call parser over one choice's answer text: `ToolCallParser`'s events and
    guarantees (see the module docstring) for DeepSeek-V3.2's and V4's markup.

    States: "content" (before the block), "block" (between invokes), "name" (an invoke's name),
    "parameters" (between a call's parameters), "header" (a parameter's name and string flag),
    "value", "after" (past the block's end), "content_only" (the markup broke).
    """

    INVOKE, INVOKE_END = f'<{dsml.DSML}invoke name="', f"</{dsml.DSML}invoke>"
    PARAMETER, PARAMETER_END = f'<{dsml.DSML}parameter name="', f"</{dsml.DSML}parameter>"
    HEADER = re.compile(r'([^"\s<>]+)" string="(true|false)">')

    def __init__(self, fmt: DSMLFormat):
        self.fmt = fmt
        self.state = "content"
        self.buffer = ""     # text not yet released
        self.raw = ""        # text consumed since the last event: content again if the markup breaks
        self.calls: list[dict] = []   # {"name", "arguments"} per started call
        self.complete = 0    # calls closed well-formed
        self.failed = False
        self.parameter: tuple[str, bool] | None = None  # the open parameter: (name, is_string)
        self.value = ""      # its value so far
        self.keys: set[str] = set()  # the open call's parameter names

    def finish(self) -> list[tuple]:
        """End of the text: what was held back is content; a block cut off before its end is malformed
        (a missing block end after complete calls is tolerated)."""
        events: list[tuple] = []
        rest, self.buffer = self.buffer, ""
        if self.state in ("content", "after", "content_only"):
            events.append(("content", rest))
        elif not (self.state == "block" and self.calls):
            self._fail(events, rest)
        return _merged(events)

    def _take(self, n: int) -> str:
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        self.raw += taken
        return taken

    def _emit(self, events: list, event: tuple) -> None:
        events.append(event)
        self.raw = ""

    def _fail(self, events: list, rest: str) -> None:
        self.failed = True
        events.append(("content", self.raw + rest))
        self.state, self.raw, self.buffer = "content_only", "", ""

    def _expect(self, events: list, markers: list[str]) -> str | None:
        """The marker the buffer starts with (after whitespace, which is consumed), None while the
        text may still become one; the markup breaks when it cannot."""
        stripped = self.buffer.lstrip()
        for marker in markers:
            if stripped.startswith(marker):
                self._take(len(self.buffer) - len(stripped) + len(marker))
                return marker
        if stripped and not any(m.startswith(stripped) for m in markers):
            self._fail(events, self.buffer)
        return None

    def _advance(self, events: list) -> None:
        """One step of the state machine; leaves the buffer untouched when it needs more text."""
        buf, state = self.buffer, self.state
        if state == "content":
            start = buf.find(self.fmt.start)
            if start >= 0:  # the whitespace before the block separates it from the content
                content = buf[:start].rstrip()
                self._emit(events, ("content", content))
                self.buffer = buf[start + len(self.fmt.start):]
                self.raw = buf[len(content):start + len(self.fmt.start)]  # content again if the block breaks
                self.state = "block"
                return
            held = len(buf) - _partial_len(buf, self.fmt.start)
            held = len(buf[:held].rstrip())  # whitespace that may precede the block
            self._emit(events, ("content", buf[:held]))
            self.buffer = buf[held:]
        elif state in ("after", "content_only"):  # text after the block (rarely more than whitespace)
            events.append(("content", buf))
            self.buffer = ""
        elif state == "block":
            marker = self._expect(events, [self.INVOKE, self.fmt.end])
            if marker == self.INVOKE:
                self.state = "name"
            elif marker is not None:
                self.state = "after" if self.calls else "content_only"
                if not self.calls:  # an empty block: nothing was called
                    self._fail(events, "")
        elif state == "name":
            end = buf.find('">')
            if end >= 0:
                name = buf[:end]
                if not name or '"' in name or _has_space(name) or "<" in name:
                    self._fail(events, buf)
                    return
                self._take(end + 2)
                self.calls.append({"name": name, "arguments": ""})
                self.keys = set()
                self._emit(events, ("call", len(self.calls) - 1, name))
                self.state = "parameters"
            elif any(c in '"<' or c.isspace() for c in buf.removesuffix('"')):
                self._fail(events, buf)
        elif state == "parameters":
            marker = self._expect(events, [self.PARAMETER, self.INVOKE_END])
            if marker == self.PARAMETER:
                self.state = "header"
            elif marker is not None:  # the call is complete
                self._arguments(events, "}" if self.keys else "{}")
                self.complete += 1
                self.state = "block"
        elif state == "header":
            end = buf.find('">')
            match = self.HEADER.fullmatch(buf[:end + 2]) if end >= 0 else None
            if match and match[1] not in self.keys:
                self._take(end + 2)
                self.parameter, self.value = (match[1], match[2] == "true"), ""
                self.keys.add(match[1])
                self.state = "value"
            elif end >= 0 or "<" in buf or "\n" in buf:  # not a header, or a repeated parameter
                self._fail(events, buf)
        elif state == "value":
            end = buf.find(self.PARAMETER_END)
            if end < 0:
                keep = _partial_len(buf, self.PARAMETER_END)
                self.value += self._take(len(buf) - keep)
                return
            self.value += self._take(end)
            self._take(len(self.PARAMETER_END))
            name, is_string = self.parameter
            if not is_string and not _is_json(self.value):
                self._fail(events, "")
                return
            value = json.dumps(self.value, ensure_ascii=False) if is_string else self.value
            self._arguments(events, ("{" if len(self.keys) == 1 else ", ")
                            + json.dumps(name, ensure_ascii=False) + ": " + value)
            self.state = "parameters"

    def _arguments(self, events: list, text: str) -> None:
        index = len(self.calls) - 1
        self.calls[index]["arguments"] += text
        self._emit(events, ("arguments", index, text))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


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


def parse_tool_calls(text: str, fmt: ToolCallFormat | DSMLFormat) -> tuple[str, list[dict]]:
    """Non-streaming: (content before the calls, [{"function": {"name", "arguments"}}, ...]). All or
    nothing: text that does not follow the format (a bad header, arguments that are not a JSON
    object, a call cut off) is all content, with no calls."""
    parser = fmt.parser()
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


def tool_call_regex(fmt: ToolCallFormat | DSMLFormat, tools: list[dict], several: bool) -> str:
    """A regex of a tool-call section that calls one of `tools` (OpenAI function specs), with
    arguments that match the function's parameters schema; `several`: one or more calls. What
    tool_choice "required" or a named function is enforced with (the structured-output guide)."""
    from nanoseek.inference.structured import _outlines

    build_regex_from_schema = _outlines().json_schema.build_regex_from_schema  # a clear error if not installed
    if isinstance(fmt, DSMLFormat):
        return _dsml_regex(fmt, tools, several, build_regex_from_schema)
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


# What a parameters schema may say at its top level for its DSML form to be exactly the JSON one:
# the parameters are the properties; anything else (anyOf, $ref, minProperties...) is not enforced.
_DSML_OBJECT_KEYS = {"type", "properties", "required", "additionalProperties", "description", "title", "$schema"}


def _dsml_regex(fmt: DSMLFormat, tools: list[dict], several: bool, build_regex_from_schema) -> str:
    """The DSML block of one call (or several) of `tools`: one parameter per property of the
    function's parameters schema, in the schema's order, the required ones always and the others
    optionally. A plain string property (no constraints but an enum) is written raw, string="true",
    as the model was trained to (its text without "<", or one of its enum values); every other
    property is JSON that matches its schema, string="false" (a JSON string is fine there too). So
    every text the regex admits parses to arguments that match the schema. A schema with more at its
    top level than properties and required is refused: its DSML form cannot be enforced."""
    alternatives = []
    for tool in tools:
        function = tool["function"]
        schema = function.get("parameters") or {"type": "object"}
        properties, required = schema.get("properties") or {}, schema.get("required") or []
        if (set(schema) - _DSML_OBJECT_KEYS or schema.get("type", "object") != "object"
                or not isinstance(properties, dict) or not set(required) <= set(properties)):
            raise NanoseekError(f"the parameters of function {function['name']!r} cannot be enforced as DSML "
                                "parameters: give an object schema of properties (and required), or use "
                                'tool_choice "auto"')
        parameters = ""
        for key, spec in properties.items():
            spec = spec if isinstance(spec, dict) else {}
            plain = spec.get("type") == "string" and set(spec) <= {"type", "description", "title", "enum"}
            if plain and all(isinstance(v, str) and "<" not in v for v in spec.get("enum", [])):
                value = "|".join(_literal(v) for v in spec["enum"]) if "enum" in spec else "[^<]*"
            else:
                try:
                    value = build_regex_from_schema(json.dumps(spec))
                except (ValueError, TypeError, RuntimeError) as e:
                    raise NanoseekError(f"the parameter {key!r} of function {function['name']!r} cannot be "
                                        f"enforced: {e}") from None
            marker = "\x00VALUE\x00"
            one = _literal(dsml.parameter_text(key, plain, marker) + "\n").replace(_literal(marker), f"({value})")
            parameters += one if key in required else f"({one})?"
        head, tail = dsml.invoke_text(function["name"], "\x00").split("\x00")
        alternatives.append(_literal(head) + parameters + _literal(tail.removeprefix("\n")))
    call = "(" + "|".join(alternatives) + ")"
    calls = f"{call}(\\n{call})*" if several else call
    return _literal(fmt.start + "\n") + calls + _literal("\n" + fmt.end)
