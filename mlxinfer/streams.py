"""MLX streams and the threads that own them: a process that used MLX on a thread must end cleanly.

MLX streams belong to the thread that made them, and MLX 0.32 asks every thread that used them to
call `mx.clear_streams()` before it ends (ml-explore/mlx #3395, #4327): streams left to the
exit-time destructors make the process abort ("terminate called without an active exception",
exit 134) or crash (139). Measured here: `generate` on a `threading.Thread`, then a normal exit,
aborted in 5 of 8 runs; with the thread's streams cleared as it ends, 0 of 8.

- `own_streams()`: every mlxinfer call that does MLX work on the caller's thread (load,
  stream_generate, batch_generate, the inspect functions) calls it first. On a thread other than
  the main one it leaves a sentinel in thread-local storage; Python deletes it as the thread
  ends, in that thread, and its `__del__` waits for the thread's work and clears its streams.
- Engines: the engine's own thread clears its streams when it stops (engine.py), and at exit
  every engine still open is closed first (`track_engine`, an atexit handler), cancelling what
  it was running: an engine left mid-request (no `close()`, or an uncaught exception) no longer
  takes the process down with it.
"""

from __future__ import annotations

import atexit
import threading
import weakref

import mlx.core as mx


class _ThreadStreams:
    """Deleted with its thread's thread-local storage, in that thread, as the thread ends."""

    def __del__(self) -> None:
        try:
            mx.synchronize()
            mx.clear_streams()
        except Exception:  # never raise from a finalizer; the thread is ending anyway
            pass


_local = threading.local()


def own_streams() -> None:
    """Make sure this thread's MLX streams are cleared when it ends (see the module docstring).
    Cheap after the first call on a thread; nothing on the main thread, whose streams MLX
    releases at exit without harm."""
    if threading.current_thread() is threading.main_thread():
        return
    if getattr(_local, "streams", None) is None:
        _local.streams = _ThreadStreams()


_engines: weakref.WeakSet = weakref.WeakSet()
EXIT_CLOSE_TIMEOUT_S = 60.0  # an engine's step in flight finishes first


def track_engine(engine) -> None:
    """Close `engine` at exit if it is still open (its thread stops and clears its streams):
    anything with `close(cancel, timeout)` whose thread uses MLX (the Engine's _Worker)."""
    _engines.add(engine)


@atexit.register
def _close_engines() -> None:
    for engine in list(_engines):
        try:
            engine.close(cancel=True, timeout=EXIT_CLOSE_TIMEOUT_S)
        except Exception:
            pass
