"""The OpenAI-compatible API's wire types: request bodies as pydantic models, and its error shape.

Field names, defaults and ranges follow OpenAI's API (and vLLM / DeepSeek where OpenAI is silent), so
the official clients work unchanged. Validation happens here, before anything reaches the engine:
a wrong type or an out-of-range value becomes a 400 that names the field (the server maps pydantic's
errors to OpenAI's error shape; FastAPI's default would be a 422). Unknown fields are accepted and
ignored, as OpenAI-compatible servers do, so clients that send extras (`user`, `metadata`...) work.

Function calling follows OpenAI (and vLLM where OpenAI is silent): `tools` (function specs) go to the
chat template, `tool_choice` is "auto" when tools are given ("none" otherwise), "none" (tools shown
to the template, the output not parsed), "required" or a named function (enforced by constrained
decoding; see api.py), `parallel_tool_calls` false keeps one call. Conversations carry assistant
`tool_calls` and `tool` messages (`tool_call_id`) to the template. Chat-prefix completion: a last
assistant message with `prefix: true` (DeepSeek's beta API), or `continue_final_message` (vLLM's),
makes the model continue that message.

`response_format` json_object and json_schema are enforced (constrained decoding, after the reasoning
of a prompt that opens a `<think>` block); a json_schema without a schema is a 400 here, one that
cannot be compiled a 400 from the handler.

Extensions beyond OpenAI's fields: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, `chat_template_kwargs` (vLLM's names; the last are extra variables for the chat
template, or the options of a DeepSeek-V3.2 / V4 prompt encoder: {"thinking": true},
{"reasoning_effort": "max"}) and `separate_reasoning` (SGLang's name; false returns the raw text
with its `<think>` tags as `content`).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nanoseek.inference.structured import JSON_OBJECT_SCHEMA


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class JSONSchemaFormat(OpenAIModel):
    name: str | None = None  # OpenAI requires a name; nothing here uses it, so it may be left out
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # `schema` would shadow a pydantic method
    strict: bool | None = None  # enforced either way: the output is decoded under the schema


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format, enforced by constrained decoding (nanoseek.inference.structured):
    json_object: the content is a JSON object; json_schema: JSON matching `json_schema.schema`."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _json_schema_needs_a_schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('type "json_schema" needs json_schema.schema: the JSON schema the output must match')
        return self

    def sampling_kwargs(self) -> dict:
        """The SamplingParams constraint this format asks for."""
        if self.type == "json_object":
            return {"json_schema": JSON_OBJECT_SCHEMA}
        if self.type == "json_schema":
            return {"json_schema": self.json_schema.schema_}
        return {}


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionSpec(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(OpenAIModel):
    name: str
    arguments: Union[str, dict] = "{}"  # OpenAI sends a JSON string; an object is accepted too


class ToolCall(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None           # a tool message: the call it answers
    name: str | None = None
    prefix: bool = False                      # DeepSeek's chat-prefix completion: continue this message
    reasoning_content: str | None = None      # an assistant turn's reasoning, as DeepSeek's API returned it

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        # Without this an image part fails both union branches and the first error shown is
        # "content.str: Input should be a valid string", which does not say what is wrong.
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind is not None and kind != "text":
                    raise ValueError(f"content parts of type {kind!r} are not supported: this model reads text "
                                     "only (send {'type': 'text', 'text': ...} parts or a string)")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class SamplingFields(OpenAIModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Union[str, Annotated[list[str], Field(max_length=16)], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def sampling_kwargs(self, defaults: dict | None = None) -> dict:
        """The `SamplingParams` fields of this request (max_tokens and logprobs come from the
        endpoint). `defaults` (the checkpoint's generation_config.json) replace OpenAI's defaults for
        the fields the request leaves out, as vLLM does."""
        kwargs = dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            **(self.response_format.sampling_kwargs() if self.response_format else {}),
        )
        kwargs.update({k: v for k, v in (defaults or {}).items() if k not in self.model_fields_set})
        return kwargs

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)             # deprecated by OpenAI, still what most clients send
    max_completion_tokens: int | None = Field(None, ge=1)  # wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    separate_reasoning: bool | None = None                 # None: the server's setting
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True                     # vLLM's
    continue_final_message: bool = False                   # vLLM's name for chat-prefix completion
    chat_template_kwargs: dict | None = None               # vLLM's: extra template variables, e.g. {"thinking": true}

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def conversation(self, keep_reasoning: bool = False) -> list[dict]:
        """Messages as the tokenizer's chat template takes them.

        `developer` is OpenAI's new name for `system`. Past assistant turns lose any reasoning the
        client sends back (`reasoning_content` is not read), as DeepSeek's API does, unless
        `keep_reasoning`: DeepSeek-V3.2's and V4's encoders take it (they keep the reasoning of the
        turn in progress, a tool-calling loop, and drop the rest themselves). As in
        OpenAI's API, user, system and tool messages need content; an assistant message may omit it
        (there it means an empty reply, or only tool calls: content "", which DeepSeek-V3's template
        needs). Tool calls keep OpenAI's shape, their arguments a JSON string.
        """
        conversation = []
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":  # OpenAI's own error for it, word for word
                raise bad_request(f"Missing required parameter: 'messages[{i}].content'.", f"messages[{i}].content",
                                  "missing_required_parameter")
            if m.prefix and (m.role != "assistant" or i != len(self.messages) - 1):
                raise bad_request(f"messages[{i}]: prefix is only allowed on the last message, an assistant one "
                                  "(the text the model continues)", f"messages[{i}].prefix")
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.role == "assistant" and m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                    "name": c.function.name, "arguments": c.function.arguments if isinstance(c.function.arguments, str)
                    else json.dumps(c.function.arguments, ensure_ascii=False)}} for c in m.tool_calls]
            if m.role == "tool" and m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
            if m.prefix:
                message["prefix"] = True  # V3.1's template reads it
            if keep_reasoning and m.role == "assistant" and m.reasoning_content is not None:
                message["reasoning_content"] = m.reasoning_content
            conversation.append(message)
        return conversation

    def continues_final_message(self) -> bool:
        """Chat-prefix completion: the model continues the last message instead of starting a turn."""
        explicit_generation_prompt = self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set
        if self.continue_final_message and explicit_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true: the model "
                              "either continues the last message or starts a new one", "continue_final_message")
        return self.continue_final_message or self.messages[-1].prefix

    def tool_choice_mode(self) -> Union[str, NamedToolChoice]:
        """The tool_choice in force ("auto" when tools are given and it is left out, else "none"),
        after checking it against the tools, as OpenAI does."""
        if self.tools is not None and not self.tools:
            raise bad_request("tools is an empty list: give at least one function, or leave tools out", "tools")
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if self.tool_choice != "none" and not self.tools:
            raise bad_request(f"tool_choice {self._choice_name()} needs tools: give the functions the model may "
                              "call", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise bad_request(f"tool_choice names the function {self.tool_choice.function.name!r}, which is not "
                                  f"among the tools ({', '.join(names)})", "tool_choice")
        return self.tool_choice

    def _choice_name(self) -> str:
        return repr(self.tool_choice) if isinstance(self.tool_choice, str) else \
            f"{{function: {self.tool_choice.function.name!r}}}"

    def tool_specs(self) -> list[dict] | None:
        """The tools as plain JSON for the chat template."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class CompletionRequest(SamplingFields):
    # One prompt (text or token ids) or a batch of them; each prompt gets n choices.
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(None, ge=1)             # None: OpenAI's default of 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# ------------------------------------------------------------------ errors


class APIError(Exception):
    """An error to return in OpenAI's shape; raised anywhere in a handler before streaming starts."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)
