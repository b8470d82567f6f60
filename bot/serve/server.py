"""Run the OpenAI-compatible server: ``bot serve``."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time

log = logging.getLogger(__name__)


def serve(backbone, adapters_dir, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, precision: str = "auto", max_batch: int = 16,
          max_queue: int = 64, max_len: int = 2048, with_router: bool = True,
          limits=None) -> int:
    """Load the adapters, start the scheduler and serve HTTP until interrupted."""
    import uvicorn  # lazy: uvicorn is heavy

    # lazy: bot.serve.api imports fastapi, transformers, uvicorn
    from bot.serve.api import create_app
    from bot.serve.state import ServerState  # lazy: bot.serve.state imports transformers, uvicorn

    state = ServerState.build(backbone, adapters_dir, api_key=api_key, precision=precision,
                              max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                              with_router=with_router, limits=limits)
    state.scheduler.start()
    log.info("serving %s on http://%s:%d/v1 (precision %s, max batch %d, queue %d, context %d)",
             ", ".join(state.model_ids()), host, port, state.scheduler.precision, max_batch,
             max_queue, state.scheduler.max_len)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can "
                    "use the server. Fix: --api-key KEY (or BOT_API_KEY)", host)
    app = create_app(state)
    freeze_heap()
    uvicorn.run(app, host=host, port=port, log_level="warning",
                **state.limits.uvicorn_options())  # header and keep-alive timeouts
    state.scheduler.close()
    return 0


def freeze_heap(collect: bool = True) -> None:
    """Keep what is loaded by now (model, tokenizer, libraries) out of the garbage collector.

    A full collection walks every tracked object; with torch and transformers loaded it
    stopped the whole server (event loop and engine thread) for 0.3-0.7 s at a time under
    issue 28's hostile mix, so /health and running streams waited that long. Objects
    frozen here are long-lived anyway; ``gc.unfreeze()`` hands them back.

    Args:
        collect: collect garbage first, so none of it is frozen (skipped by tests, whose
            servers unfreeze on exit).
    """
    if collect:
        gc.collect()
    gc.freeze()


class BackgroundServer:
    """Serve ``state`` from a thread on a free port (tests and benchmarks).

    Args:
        state: a ServerState.
        port: 0 picks a free port.
    """

    def __init__(self, state, host: str = "127.0.0.1", port: int = 0):
        import uvicorn  # lazy: uvicorn is heavy

        # lazy: bot.serve.api imports fastapi, transformers, uvicorn
        from bot.serve.api import create_app

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.state = state
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                                **state.limits.uvicorn_options())
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        freeze_heap(collect=False)  # as `bot serve` does; undone on exit
        self.thread.start()
        for _ in range(400):
            if self.server.started:
                return self
            time.sleep(0.025)
        raise RuntimeError("the background server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.scheduler.close()
        gc.unfreeze()
