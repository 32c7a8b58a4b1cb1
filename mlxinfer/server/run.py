"""Serving the app with uvicorn in the foreground: signals, the drain at shutdown, the exit code."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from .app import Server, create_app

DRAIN_S = 5.0  # seconds in-flight requests get to finish at SIGTERM before they are cancelled


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, Ctrl-C) stops taking requests, lets those in
    flight finish, and a second before its drain period ends cancels the engine's requests:
    replies still running then end with an error event saying the server shut down (the
    clients raise it) instead of a connection cut mid-stream."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.mlxinfer = server

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        cut = loop.call_later(
            max(DRAIN_S - 1.0, 0.0), lambda: loop.run_in_executor(None, self.mlxinfer.close)
        )
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()


def run(server: Server, host: str, port: int) -> int:
    """Serve until SIGTERM (exit 0) or Ctrl-C (KeyboardInterrupt, which the command turns into
    130); 1 when the model did not load."""
    config = uvicorn.Config(
        create_app(server),
        host=host,
        port=port,
        log_level="info",
        # after the cut at DRAIN_S - 1, room for the engine's step in flight to end and the
        # cancelled replies to reach their clients before uvicorn closes connections
        timeout_graceful_shutdown=int(DRAIN_S) + 5,
        lifespan="on",
    )
    http = DrainingServer(config, server)
    server.on_load_failure = lambda: setattr(http, "should_exit", True)
    logging.getLogger("mlxinfer.server").addHandler(logging.StreamHandler())
    # uvicorn handles SIGTERM and Ctrl-C, then raises the signal again for the handler it found:
    # SIGTERM's is a no-op here, so the process exits 0; Ctrl-C's raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    http.run()
    return 1 if server.error is not None else 0
