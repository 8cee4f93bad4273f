"""DeepSeek-V3.2's and DeepSeek-V4's prompt formats, and DSML, the markup their tool calls use.

The released DeepSeek-V3.2 (December 2025) and DeepSeek-V4 checkpoints ship no Jinja chat
template: DeepSeek publishes a Python encoder instead (`encoding/encoding_dsv32.py`,
`encoding/encoding_dsv4.py` in the model repositories). This module builds the same prompts, string
for string (tests/dsml_prompts.json holds the reference's output for a set of
conversations). `Tokenizer.apply_chat_template` uses it for a checkpoint whose config.json says
model_type "deepseek_v32" / "deepseek_v4" and whose tokenizer has no template of its own.

The shared shape, V3.2 (V4's differences below):

    <｜begin▁of▁sentence｜>{system}\\n\\n## Tools ...(the function specs, one JSON per line)...
    <｜User｜>{question}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{question}<｜Assistant｜><think>        <- the generation prompt, thinking mode

- Thinking mode opens a `<think>` block after the last user turn; every other turn (and every turn
  in chat mode) is closed at once with `</think>`. Past turns' reasoning is dropped; an assistant
  message after the last user turn (a tool-calling loop) keeps its `reasoning_content`, which the
  client sends back, followed by `</think>`.
- The tools are listed after the first system prompt (an empty one is put first when there is none),
  with an explanation of DSML.
- A past tool call is written in DSML after the message's content:

      \\n\\n<｜DSML｜function_calls>
      <｜DSML｜invoke name="get_weather">
      <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
      <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
      </｜DSML｜invoke>
      </｜DSML｜function_calls>

  string="true": the value is the raw text of a string argument; "false": the value is JSON.
- V3.2: tool results follow the assistant's eos as \\n\\n<function_results>\\n<result>...</result>...
  \\n</function_results>, then \\n\\n<think> (thinking mode, after the last user turn) or \\n\\n</think>;
  the model answers from there, in the same turn.

DeepSeek-V4 writes `<｜DSML｜tool_calls>` instead of `function_calls`; its tool results are user
turns (`<｜User｜><tool_result>...</tool_result>`, consecutive tool and user messages form one user
turn, its parts joined by blank lines, results in the order of the calls); `<｜Assistant｜>` is
written after a user turn, not as part of it; when tools are offered, past reasoning is kept and
every user turn opens `<think>` in thinking mode; `reasoning_effort` "max" puts an instruction to
think exhaustively at the very start ("high", the default, adds nothing).

Thinking is off by default for V3.2 (as vLLM's deepseek_v32 tokenizer and V3.1's template have it)
and on for V4 (as vLLM's deepseek_v4 tokenizer and DeepSeek's own API have it); a request turns it
on or off with `chat_template_kwargs` {"thinking": true/false} (see `prompt_options`).
What the encoders do not render, because the OpenAI API has no way to ask for it: V3.2's
`developer` role and V4's `latest_reminder` role, quick-instruction `task`s and per-message
`response_format`.
"""

from __future__ import annotations

import json

from nanoseek.errors import ChatTemplateError

DSML = "｜DSML｜"  # one token in DeepSeek's vocabulary (id 128825)
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"

# Which DSML block each format's tool calls go in
CALLS_BLOCK = {"deepseek_v32": "function_calls", "deepseek_v4": "tool_calls"}

# The tools section of the system prompt, word for word as the models were trained on it
# ({block}: the format's calls block, {schemas}: one JSON function spec per line).
V32_TOOLS = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your \
reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and \
objects should use JSON format. The "string" attribute should be set to "true" for string type parameters \
and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a \
thinking block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""

V4_TOOLS = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, \
booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

V4_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# chat_template_kwargs each format takes, and their defaults
OPTIONS = {"deepseek_v32": {"thinking": False}, "deepseek_v4": {"thinking": True, "reasoning_effort": "high"}}
REASONING_EFFORTS = ("high", "max")  # V4's encoder knows these two; "max" adds V4_EFFORT_MAX


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def prompt_options(fmt: str, kwargs: dict | None) -> dict:
    """The encoder options of a request's chat_template_kwargs: `thinking` (vLLM's `enable_thinking`
    is read as well) and, for V4, `reasoning_effort` ("high" or "max"; "none" turns thinking off, as
    vLLM reads it). Anything else is a ChatTemplateError that names what the format takes."""
    options = dict(OPTIONS[fmt])
    for key, value in (kwargs or {}).items():
        if key in ("thinking", "enable_thinking"):
            if not isinstance(value, bool):
                raise ChatTemplateError(f"chat_template_kwargs.{key} must be true or false, not {value!r}")
            options["thinking"] = value
        elif key == "reasoning_effort" and fmt == "deepseek_v4":
            if value == "none":
                options["thinking"] = False
            elif value in REASONING_EFFORTS:
                options["reasoning_effort"] = value
            else:
                raise ChatTemplateError(f"chat_template_kwargs.reasoning_effort {value!r} is not one DeepSeek-V4 "
                                        "takes: give \"high\" (the default), \"max\" or \"none\" (no thinking)")
        else:
            raise ChatTemplateError(f"chat_template_kwargs.{key} means nothing to the {fmt} prompt format (it takes "
                                    f"{' and '.join(OPTIONS[fmt])})")
    return options


# ---- DSML ----


def dsml_arguments(arguments, fmt: str) -> list[tuple[str, bool, str]]:
    """A call's arguments (a JSON object, or its text as OpenAI sends it) as DSML parameters:
    [(name, is_string, value text)]. V4's encoder keeps text that is not JSON as one parameter named
    "arguments"; V3.2's has no such fallback, and neither takes JSON that is not an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            if fmt != "deepseek_v4":
                raise ChatTemplateError(f"tool call arguments {arguments!r:.80} are not JSON") from None
            arguments = {"arguments": arguments}
    if not isinstance(arguments, dict):
        raise ChatTemplateError(f"tool call arguments must be a JSON object, not {_json(arguments):.80}")
    return [(k, isinstance(v, str), v if isinstance(v, str) else _json(v)) for k, v in arguments.items()]


def parameter_text(name: str, is_string: bool, value: str) -> str:
    return f'<{DSML}parameter name="{name}" string="{"true" if is_string else "false"}">{value}</{DSML}parameter>'


def invoke_text(name: str, parameters: str) -> str:
    """One call: `parameters` is its parameter lines joined by newlines."""
    return f'<{DSML}invoke name="{name}">\n{parameters}\n</{DSML}invoke>'


def calls_text(fmt: str, invokes: list[str]) -> str:
    block = CALLS_BLOCK[fmt]
    return f"<{DSML}{block}>\n" + "\n".join(invokes) + f"\n</{DSML}{block}>"


def _past_calls(fmt: str, message: dict) -> str:
    """An assistant message's tool calls as the model wrote them ("" for none)."""
    calls = message.get("tool_calls") or []
    if not calls:
        return ""
    invokes = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatTemplateError(f"a tool call needs a function with a name: {call!r:.80}")
        params = dsml_arguments(function.get("arguments", "{}"), fmt)
        invokes.append(invoke_text(function["name"], "\n".join(parameter_text(*p) for p in params)))
    return "\n\n" + calls_text(fmt, invokes)


def _tools_text(fmt: str, tools: list[dict]) -> str:
    schemas = "\n".join(_json(t["function"] if "function" in t else t) for t in tools)
    return (V32_TOOLS if fmt == "deepseek_v32" else V4_TOOLS).format(dsml=DSML, schemas=schemas)


def _with_tools(messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], int]:
    """The messages with a leading system message to list the tools after (the first message, if it
    is a system prompt; else an empty one put first), and its index (-1: no tools)."""
    if not tools:
        return messages, -1
    if messages and messages[0].get("role") == "system":
        return messages, 0
    return [{"role": "system", "content": ""}] + messages, 0


def _last_user(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _check_roles(messages: list[dict]) -> None:
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ChatTemplateError(f"unknown chat role: {m.get('role')!r} (system, user, assistant or tool)")


# ---- DeepSeek-V3.2 ----


def encode_v32(messages: list[dict], tools: list[dict] | None = None, thinking: bool = False) -> str:
    """DeepSeek-V3.2's prompt for a conversation (encoding_dsv32.py's `encode_messages`, thinking
    mode "thinking" or "chat"), the generation prompt included: a user turn ends with it."""
    _check_roles(messages)
    messages, tools_at = _with_tools(messages, tools)
    last_user = _last_user(messages)
    prompt = BOS
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            prompt += _text(m) + ("\n\n" + _tools_text("deepseek_v32", tools) if i == tools_at else "")
        elif role == "user":
            prompt += USER + _text(m) + ASSISTANT + (THINK_START if thinking and i == last_user else THINK_END)
        elif role == "tool":
            # the n-th result answers the n-th call of the assistant message the results follow
            caller = i - 1
            while caller >= 0 and messages[caller]["role"] == "tool":
                caller -= 1
            calls = messages[caller].get("tool_calls") or [] if caller >= 0 else []
            n = i - caller
            if caller < 0 or messages[caller]["role"] != "assistant" or n > len(calls):
                raise ChatTemplateError(f"tool message {i} answers no tool call: a tool result must follow the "
                                        "assistant message that called the tool (one result per call)")
            prompt += ("\n\n<function_results>" if n == 1 else "") + f"\n<result>{_text(m)}</result>"
            if n == len(calls):
                prompt += "\n</function_results>\n\n" + (THINK_START if thinking and i >= last_user else THINK_END)
        else:  # assistant
            calls = _past_calls("deepseek_v32", m)
            reasoning = ""
            if thinking and i > last_user:  # the current turn: its reasoning so far stays
                if not m.get("reasoning_content") and not calls:
                    raise ChatTemplateError(f"assistant message {i} comes after the last user message in thinking "
                                            "mode, so it needs its reasoning_content (or tool calls)")
                reasoning = (m.get("reasoning_content") or "") + THINK_END
            prompt += reasoning + _text(m) + calls + EOS
    return prompt


# ---- DeepSeek-V4 ----


def _v4_turns(messages: list[dict]) -> list[dict]:
    """V4's user turns: tool results become `tool_result` parts of a user turn, and consecutive tool
    and user messages share one turn ({"role": "user", "parts": [text, ...]}); the results are put
    in the order of the calls they answer (by tool_call_id)."""
    turns: list[dict] = []
    order: dict[str, int] = {}  # call id -> its place among the last assistant message's calls
    for m in messages:
        role = m["role"]
        if role in ("user", "tool"):
            if role == "tool":
                part = {"result": _text(m), "order": order.get(m.get("tool_call_id") or "", 0)}
            else:
                part = {"text": _text(m)}
            if turns and turns[-1]["role"] == "user":
                turns[-1]["parts"].append(part)
            else:
                turns.append({"role": "user", "parts": [part]})
        else:
            if role == "assistant" and m.get("tool_calls"):
                order = {c.get("id"): k for k, c in enumerate(m["tool_calls"]) if isinstance(c, dict) and c.get("id")}
            turns.append(m)
    for turn in turns:
        if turn["role"] == "user":
            results = iter(sorted((p for p in turn["parts"] if "result" in p), key=lambda p: p["order"]))
            turn["parts"] = [next(results) if "result" in p else p for p in turn["parts"]]
    return turns


def encode_v4(messages: list[dict], tools: list[dict] | None = None, thinking: bool = True,
              reasoning_effort: str = "high") -> str:
    """DeepSeek-V4's prompt for a conversation (encoding_dsv4.py's `encode_messages`), the
    generation prompt included: `<｜Assistant｜>` and the think marker follow the last user turn."""
    _check_roles(messages)
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatTemplateError(f"reasoning_effort {reasoning_effort!r}: give one of {', '.join(REASONING_EFFORTS)}")
    messages, tools_at = _with_tools(messages, tools)
    turns = _v4_turns(messages)
    keep_reasoning = tools_at >= 0  # with tools, V4 keeps every turn's reasoning
    last_user = _last_user(turns)
    prompt = BOS + (V4_EFFORT_MAX if thinking and reasoning_effort == "max" else "")
    for i, m in enumerate(turns):
        role = m["role"]
        if role == "system":
            prompt += _text(m) + ("\n\n" + _tools_text("deepseek_v4", tools) if i == 0 and tools_at == 0 else "")
        elif role == "user":
            prompt += USER + "\n\n".join(p["text"] if "text" in p else f"<tool_result>{p['result']}</tool_result>"
                                         for p in m["parts"])
        else:  # assistant
            reasoning = ""
            if thinking and (keep_reasoning or i > last_user):
                reasoning = (m.get("reasoning_content") or "") + THINK_END
            prompt += reasoning + _text(m) + _past_calls("deepseek_v4", m) + EOS
        # the assistant's turn opens after a user turn that the assistant answers (or that ends the prompt)
        if role == "user" and (i + 1 == len(turns) or turns[i + 1]["role"] == "assistant"):
            prompt += ASSISTANT + (THINK_START if thinking and (keep_reasoning or i == last_user) else THINK_END)
    return prompt


ENCODERS = {"deepseek_v32": encode_v32, "deepseek_v4": encode_v4}


def encode(fmt: str, messages: list[dict], tools: list[dict] | None = None, options: dict | None = None) -> str:
    """The prompt of `messages` in format `fmt` ("deepseek_v32" / "deepseek_v4"); `options` are the
    request's chat_template_kwargs (checked by `prompt_options`)."""
    return ENCODERS[fmt](messages, tools, **prompt_options(fmt, options))
