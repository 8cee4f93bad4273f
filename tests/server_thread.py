"""`ServerThread`: a nanoseek app served by uvicorn on a background thread, for tests."""

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
