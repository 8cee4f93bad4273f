"""`nanoseek serve`: an OpenAI / DeepSeek-compatible HTTP API over the inference engine.

    nanoseek serve --model runs/small --port 8000 [--api-key KEY] [--served-model-name NAME]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    r = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "2+3?"}])
    r.choices[0].message.reasoning_content, r.choices[0].message.content

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (and /v1/models/{id}),
GET /health, GET /metrics (Prometheus text) and a chat page at /. The wire format is OpenAI's (vLLM's where OpenAI is silent):
SSE chunks that start with a role delta, end with a finish_reason chunk, an optional usage chunk and
`data: [DONE]`; errors are `{"error": {"message", "type", "param", "code"}}` with 400 / 401 / 404 / 503.
Chat prompts are rendered with the checkpoint's own chat template (sandboxed Jinja2; a template
that fails is a 400 with code `chat_template_error`). Like DeepSeek's API, reasoning
(`<think>...</think>`) is returned as `reasoning_content` when the tokenizer has those markers (a
tokenizer without them serves plain content), and usage carries `prompt_cache_hit_tokens` /
`prompt_cache_miss_tokens` from the engine's prefix cache. `response_format` json_object / json_schema
is enforced by constrained decoding (nanoseek.inference.structured), on both endpoints. Function
calling: `tools` go to the chat template and the model's calls, written in DeepSeek's special-token
format (deepseek_v3 or deepseek_v31) or V3.2's / V4's DSML (deepseek_v32, deepseek_v4: the one the
template or encoder writes, or --tool-call-parser), come back as `tool_calls` (tools.py); tool_choice
"required" or a named function constrains the output to a call. `chat_template_kwargs` (vLLM's
field, e.g. {"thinking": true}) go to the template as variables, or to V3.2's / V4's encoder. A last assistant message with `prefix: true` (or `continue_final_message`) is continued.

This module is only the HTTP layer: the endpoints, the app and the CLI. The engine (`nanoseek.LLM`)
checks requests and generates; a single background thread drives it (engine_loop.py), so all
concurrent requests share its continuous batching. generation.py admits a request into it and
relays its outputs; responses.py encodes them (JSON or SSE, both endpoints); protocol.py holds the
request models and the error shape.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.checkpoint import generation_defaults
from nanoseek.device import add_device_arguments, add_quantize_argument, at_least
from nanoseek.dsml import ENCODERS
from nanoseek.errors import ChatTemplateError, ContextLengthError, NanoseekError
from nanoseek.inference.generate import (add_speculative_arguments, chat_template_kwargs_argument, context_length,
                                         note_max_model_len, note_speculation)
from nanoseek.inference.sampling import SamplingParams
from nanoseek.serve.engine_loop import EngineLoop
from nanoseek.serve.generation import Generation, ServerState
from nanoseek.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from nanoseek.serve.reasoning import leaves_reasoning_open, prompt_opens_reasoning
from nanoseek.serve.responses import ChatFormat, CompletionFormat, respond
from nanoseek.serve.tools import FORMATS, ToolCallFormat, detect_format, tool_call_regex
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpointing import checkpoint_argument

logger = logging.getLogger("nanoseek.serve")
STATIC_DIR = Path(__file__).parent / "static"


# ------------------------------------------------------------------ request preparation
#
# The engine checks every request (LLM.prompt_ids for the prompt, SamplingParams.validate when it is
# added); the pydantic models check the JSON. What is left here is the API's own policy (the model
# name, max_tokens against the context) and mapping the engine's errors to OpenAI's.


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist.", "not_found_error", "model", "model_not_found")


def _prompt_ids(state: ServerState, prompt, param: str, add_bos: bool = True) -> list[int]:
    """The engine's token ids for a prompt (text: bos in front where the tokenizer adds one,
    unless add_bos=False; ids: as given), its errors as a 400."""
    try:
        return state.engine_loop.engine.prompt_ids(prompt, add_bos)
    except ContextLengthError as e:
        raise bad_request(str(e), param, "context_length_exceeded") from e
    except NanoseekError as e:
        raise bad_request(str(e), param) from e


def _max_tokens(state: ServerState, prompt_ids: list[int], requested: int | None, default: int | None) -> int:
    """The max_tokens to run with. An explicit value that does not fit the context is an error (as
    in vLLM); the default (None: the whole context) is shrunk to fit."""
    limit, n = state.max_model_len, len(prompt_ids)
    if requested is None:
        return limit - n if default is None else min(default, limit - n)
    if n + requested > limit:
        raise bad_request(f"max_tokens is too large: {requested}. This model's maximum context length is {limit} "
                           f"tokens and your request has {n} input tokens ({limit - n} tokens are left for the "
                           "completion).", "max_tokens", "context_length_exceeded")
    return requested


async def _prepare_constraint(state: ServerState, params: SamplingParams, param: str = "response_format") -> None:
    """Compile a response_format's schema (or tool_choice's pattern) before admission (cached per
    tokenizer), in a worker thread: a large one takes seconds, which must stall neither the event
    loop nor the engine's thread. A constraint that cannot be enforced is a 400 naming `param`."""
    if not params.constrained:
        return
    try:
        await asyncio.to_thread(state.engine_loop.engine.prepare_constraint, params)
    except NanoseekError as e:
        raise bad_request(f"{param}: {e}", param) from e


def _tool_calling(state: ServerState, body: ChatCompletionRequest) -> tuple[ToolCallFormat | None, dict]:
    """The tool-call format to parse the output with (None: no parsing) and the constraint that
    tool_choice "required" or a named function asks for (SamplingParams' regex: a tool-call section
    in the checkpoint's format, calling an offered function with arguments that match its schema)."""
    choice = body.tool_choice_mode()
    if choice == "none":
        return None, {}
    fmt = state.tool_format
    if fmt is None:
        raise bad_request("this checkpoint's chat template writes no DeepSeek tool calls, so its tool calls cannot "
                          "be read: start the server with --tool-call-parser deepseek_v3 (or deepseek_v31, "
                          "deepseek_v32, deepseek_v4), or send "
                          'tool_choice "none"', "tools", "unsupported_parameter")
    if choice == "auto":
        return fmt, {}
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request("tool_choice that demands a call and response_format cannot both be enforced: the output is "
                          "either tool calls or the formatted answer", "tool_choice")
    tools = body.tool_specs()
    if choice != "required":
        tools = [t for t in tools if t["function"]["name"] == choice.function.name]
    try:
        regex = tool_call_regex(fmt, tools, several=choice == "required" and body.parallel_tool_calls)
    except NanoseekError as e:
        raise bad_request(f"tool_choice: {e}", "tool_choice") from e
    return fmt, {"regex": regex}


# ------------------------------------------------------------------ endpoints


async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    _check_model(state, body.model)
    tool_format, tool_constraint = _tool_calling(state, body)
    encoder = state.tokenizer.prompt_format in ENCODERS  # V3.2 / V4: the encoder reads reasoning_content
    conversation, continues = body.conversation(keep_reasoning=encoder), body.continues_final_message()
    try:
        prompt_text = state.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=body.add_generation_prompt and not continues,
            tools=body.tool_specs(), continue_final_message=continues,
            chat_template_kwargs={**state.chat_template_kwargs, **(body.chat_template_kwargs or {})})
    except ChatTemplateError as e:
        param = "chat_template_kwargs" if str(e).startswith("chat_template_kwargs") else "messages"
        raise bad_request(str(e), param, "chat_template_error") from e
    except NanoseekError as e:
        raise bad_request(str(e), "messages") from e
    # the template's text as it is (it writes bos itself), as transformers tokenizes a chat
    prompt_ids = _prompt_ids(state, prompt_text, "messages", add_bos=False)
    max_tokens = _max_tokens(state, prompt_ids, body.max_completion_tokens or body.max_tokens, None)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                            **body.sampling_kwargs(state.sampling_defaults), **tool_constraint)
    split = state.separate_reasoning if body.separate_reasoning is None else body.separate_reasoning
    split = split and state.tokenizer.think_end is not None  # no reasoning markers: plain content
    await _prepare_constraint(state, params, "tool_choice" if tool_constraint else "response_format")
    # the model starts inside a think block: the template's generation prompt opened it, or the
    # message a prefix completion continues left one open
    in_reasoning = prompt_opens_reasoning(prompt_text) or (
        continues and leaves_reasoning_open(conversation[-1]["content"]))

    generation = Generation(state, "chat", [prompt_ids], params)
    await generation.start()
    fmt = ChatFormat(state, generation, split, in_reasoning, logprobs, tool_format, body.parallel_tool_calls)
    return await respond(request, generation, fmt, body.stream, body.include_usage)


async def completions(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    _check_model(state, body.model)
    prompts = body.prompts()
    if not prompts:
        raise bad_request("the prompt is empty", "prompt")
    prompt_ids = [_prompt_ids(state, p, "prompt") for p in prompts]
    # OpenAI's default of 16 tokens is shrunk to fit each prompt's context; an explicit value must fit.
    sampling = body.sampling_kwargs(state.sampling_defaults)
    params = [SamplingParams(max_tokens=_max_tokens(state, ids, body.max_tokens, 16), logprobs=body.logprobs,
                             **sampling) for ids in prompt_ids]
    await _prepare_constraint(state, params[0])

    generation = Generation(state, "completions", prompt_ids, params)
    await generation.start()
    prompt_texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts]
    echo = [prompt_texts[c.index // generation.n] if body.echo else "" for c in generation.choices]
    fmt = CompletionFormat(state, generation, echo, body.logprobs)
    return await respond(request, generation, fmt, body.stream, body.include_usage)


# ------------------------------------------------------------------ the app


class APIKeyMiddleware:
    """Every /v1 route needs 'Authorization: Bearer <key>'. Checked before the app reads the body
    (an ASGI middleware, not a route dependency, which FastAPI resolves after parsing the JSON), so
    a request without the key gets a 401 whatever its body, never a 400 about it."""

    def __init__(self, app, api_key: str, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
                message = ("Missing API key: send 'Authorization: Bearer <key>'." if not auth
                           else "Incorrect API key provided.")
                error = APIError(401, message, "authentication_error", code="invalid_api_key")
                self.metrics.rejected[error.code] += 1
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, *, model_name: str = "nanoseek", api_key: str | None = None,
               separate_reasoning: bool = True, max_waiting: int = 256, max_running: int | None = None,
               sampling_defaults: dict | None = None, tool_call_parser: str = "auto",
               chat_template_kwargs: dict | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (a `nanoseek.LLM` with a tokenizer). `sampling_defaults`
    (e.g. the checkpoint's generation_config.json) apply to the sampling fields a request leaves out.
    `tool_call_parser`: the format tool calls are read in, "deepseek_v3", "deepseek_v31",
    "deepseek_v32" or "deepseek_v4", or "auto": the one the chat template (or the V3.2 / V4 prompt
    encoder) writes (none: requests that want tool calls get a 400). `chat_template_kwargs`: defaults
    for a request's own (which win key by key), e.g. {"thinking": true}.

    The engine is driven by a background thread that starts with the app (lifespan) and stops with
    it; the app must be the engine's only user while it runs.
    """
    if engine.tokenizer is None:
        raise NanoseekError("the server needs a tokenizer: load a checkpoint directory that has tokenizer.json")
    engine_loop = EngineLoop(engine)
    state = ServerState(
        engine_loop=engine_loop, tokenizer=engine.tokenizer, model_name=model_name,
        max_model_len=engine.max_model_len, separate_reasoning=separate_reasoning,
        max_running=max_running or engine.scheduler.max_num_seqs, max_waiting=max_waiting,
        sampling_defaults=dict(sampling_defaults or {}), chat_template_kwargs=dict(chat_template_kwargs or {}),
        tool_format=detect_format(engine.tokenizer) if tool_call_parser == "auto" else FORMATS[tool_call_parser],
    )

    @asynccontextmanager
    async def lifespan(app):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state

    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, metrics=state.metrics)

    v1 = APIRouter(prefix="/v1")
    v1.add_api_route("/chat/completions", chat_completions, methods=["POST"])
    v1.add_api_route("/completions", completions, methods=["POST"])

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nanoseek",
                "max_model_len": state.max_model_len}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model:path}")  # the openai client's models.retrieve(); a model id may hold "/"
    async def model(model: str):
        _check_model(state, model)
        return model_card()

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if engine_loop.dead is not None or not engine_loop.thread.is_alive():
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(engine_loop.stats, state.in_flight),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        state.metrics.rejected[e.code or str(e.status)] += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        # FastAPI's default is a 422 with its own shape; OpenAI clients expect a 400 in the error envelope.
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            err = bad_request(f"The request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
        elif not loc and first.get("type") == "model_attributes_type":  # the body as a whole: not an object
            content_type = request.headers.get("content-type", "")
            hint = "" if "json" in content_type else (" sent with 'Content-Type: application/json' (this "
                                                      f"request's: {content_type or 'none'})")
            err = bad_request(f"The request body must be a JSON object{hint}.", None, "invalid_json")
        else:
            where = ".".join(loc)
            msg = first.get("msg", "invalid request")
            err = bad_request(f"{where}: {msg}" if where else msg, loc[0] if loc else None,
                               "missing_required_parameter" if first.get("type") == "missing" else "invalid_value")
        return await api_error(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        types = {404: "not_found_error", 405: "invalid_request_error"}
        err = APIError(e.status_code, str(e.detail), types.get(e.status_code, "invalid_request_error"),
                       code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("unhandled error")
        err = APIError(500, "internal server error; see the server log", "server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    return app


# ------------------------------------------------------------------ CLI: nanoseek serve


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=checkpoint_argument,
                        help="checkpoint directory (config.json, weights, tokenizer.json), or a run directory: its "
                             "latest checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 0-65535 (0: any free one)")
    parser.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOSEEK_API_KEY, else open)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id in the API (default: the directory's name after symlinks, so "
                             "runs/x/latest serves as checkpoint-<step>; GET /v1/models lists it)")
    parser.add_argument("--no-reasoning-split", action="store_true",
                        help="return the generated text as it is, think tags included, as content instead of "
                             "splitting it into reasoning_content (where the chat template opens the think block "
                             "in the prompt, as R1's does, the text starts inside it: no opening <think>)")
    parser.add_argument("--tool-call-parser", choices=["auto", *FORMATS], default="auto",
                        help="how the model writes tool calls: DeepSeek-V3's format (deepseek_v3: V2.5, V3, R1-0528), "
                             "V3.1's (deepseek_v31), or DSML (deepseek_v32: V3.2; deepseek_v4: V4); auto: the one "
                             "the checkpoint's chat template (or V3.2's / V4's prompt encoder) writes")
    parser.add_argument("--default-chat-template-kwargs", type=chat_template_kwargs_argument, default=None,
                        metavar="JSON", help="chat_template_kwargs every request gets unless it sets them itself "
                                             "(vLLM's option): '{\"thinking\": true}' serves V3.1 / V3.2 in thinking mode")
    parser.add_argument("--max-num-seqs", type=at_least(1, "a number of sequences: 1 or more"), default=64,
                        help="sequences the engine batches at once")
    parser.add_argument("--max-waiting", type=at_least(0, "a number of sequences: 0 or more"), default=256,
                        help="sequences that may queue beyond --max-num-seqs before requests get 503")
    parser.add_argument("--max-model-len", type=context_length, default=None,
                        help="context window in tokens (default, and at most: the model's)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn the engine's prefix cache off")
    parser.add_argument("--generation-config", choices=["auto", "openai"], default="auto",
                        help="defaults of the sampling fields a request leaves out: the checkpoint's "
                             "generation_config.json where it sets them (auto), or OpenAI's (temperature 1)")
    add_speculative_arguments(parser)
    add_device_arguments(parser)
    add_quantize_argument(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def port_number(text: str) -> int:
    """argparse type for --port: an integer in 0-65535, or a usage error naming the range."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give an integer from 0 to 65535")
    return int(text)


def check_bindable(host: str, port: int) -> int:
    """Fail before the model loads if the address cannot be bound (in use, or no such interface).
    Returns the port: the one the system picks for port 0, so the server can say where it listens."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NanoseekError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            raise NanoseekError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                                "(or stop what holds it)") from None
        return sock.getsockname()[1]


def run(args) -> int:
    import uvicorn

    from nanoseek.inference.engine import LLM

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise NanoseekError(f"--model {args.model}: " + ("a file, not a directory" if model_dir.exists() else
                                                         "no such directory") + "; point it at a checkpoint directory")
    args.port = check_bindable(args.host, args.port)  # --port 0: a free one, named in the line below
    if (model_dir / "tokenizer.json").is_file():  # a chat template that does not compile fails before the model loads
        tokenizer = Tokenizer.from_dir(model_dir)
        tokenizer.check_chat_template()
        if args.default_chat_template_kwargs and tokenizer.prompt_format is not None:  # nor do options it refuses
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                          chat_template_kwargs=args.default_chat_template_kwargs)
    engine = LLM(model_dir, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                 enable_prefix_caching=not args.no_prefix_caching, speculative_mtp=args.speculative_mtp,
                 speculative_max_batch=args.speculative_max_batch, device=args.device, dtype=args.dtype,
                 quantize=args.quantize, enforce_eager=args.enforce_eager)
    note_max_model_len(engine, args.max_model_len, "serve")
    note_speculation(engine, args)
    name = args.served_model_name or model_dir.resolve().name
    defaults = generation_defaults(model_dir) if args.generation_config == "auto" else {}
    app = create_app(engine, model_name=name, api_key=args.api_key, separate_reasoning=not args.no_reasoning_split,
                     max_waiting=args.max_waiting, sampling_defaults=defaults, tool_call_parser=args.tool_call_parser,
                     chat_template_kwargs=args.default_chat_template_kwargs)
    print(f"nanoseek serve: {name} (max_model_len {engine.max_model_len}) on http://{args.host}:{args.port}  "
          f"chat page at /, API at /v1{'  (API key required)' if args.api_key else ''}")
    if engine.tokenizer.prompt_format in ENCODERS:
        print(f"nanoseek serve: no chat template; prompts built by the {engine.tokenizer.prompt_format} encoder "
              "(nanoseek.dsml; chat_template_kwargs {\"thinking\": ...} switches thinking mode)")
    tool_format = app.state.server.tool_format
    print(f"nanoseek serve: tool calls read in {tool_format.name} format" if tool_format else
          "nanoseek serve: no tool-call format (the chat template writes none; see --tool-call-parser): "
          "requests that want tool calls get a 400")
    if defaults:
        print("nanoseek serve: sampling defaults from generation_config.json: "
              + ", ".join(f"{k} {v}" for k, v in defaults.items()))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
