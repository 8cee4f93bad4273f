"""`ServerThread`: a nanoseek app served by uvicorn on a background thread, for tests; and
`collect_stream`, a streamed chat completion read back as the openai client delivers it."""

import threading
import time

from fastapi import FastAPI


class ServerThread:
    """Run an app with uvicorn in a background thread on a loopback port.

        with ServerThread(app) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="x")

    Port 0 asks the OS for a free port, so parallel runs never collide; `url` has the real one.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="nanoseek-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def collect_stream(chunks):
    """A stream's content, reasoning, tool calls (by index: id, name, arguments) and finish reason,
    checking that each call's first delta carries its id and name and later ones only arguments."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            for tc in c.delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
                else:
                    assert tc.id is None and not tc.function.name
                    calls[tc.index]["arguments"] += tc.function.arguments
            finish = c.finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish
