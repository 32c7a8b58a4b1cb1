"""`mlxinfer serve`: an OpenAI- and Anthropic-compatible HTTP server on one Engine.

    GET  /health                      503 while the model loads, 200 once it serves
    GET  /v1/models                   the one model served
    POST /v1/chat/completions         OpenAI chat (streamed with "stream": true)
    POST /v1/completions              OpenAI completions (text or token ids)
    POST /v1/messages                 Anthropic Messages (streamed with Anthropic's events)
    POST /v1/messages/count_tokens    the prompt's tokens
    GET  /metrics                     Prometheus text: requests, tokens, latency histograms

protocol.py reads and writes the APIs' bodies (plain functions), app.py is the Starlette app and
its streaming, prometheus.py the /metrics text. Every request goes through `Engine.submit`, so
the server batches whatever its clients send (seeds, penalties, a quantized or rotating cache).
"""

from .app import Server, ServerOptions, create_app

__all__ = ["Server", "ServerOptions", "create_app"]
