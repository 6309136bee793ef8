"""Run the service: `serve(settings)` is uvicorn plus the signals operators expect.

SIGHUP           reload the model folder in the background (the old version serves meanwhile)
SIGTERM, SIGINT  stop accepting, finish in-flight requests (up to drain_timeout_s), exit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading

import uvicorn

from service.app import create_app
from service.config import Settings
from service.engine import Engine

log = logging.getLogger(__name__)


class FlashServer(uvicorn.Server):
    """uvicorn's server with SIGHUP -> reload and SIGTERM -> drain."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Readiness drops and new generations get 503 at once; uvicorn stops accepting,
        # waits for open requests, then the lifespan stops the device thread.
        self.engine.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
                yield
                return
            previous = signal.signal(signal.SIGHUP, self._on_sighup)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    def _on_sighup(self, sig: int, frame) -> None:
        if self._loop is not None:
            log.info("SIGHUP: reloading %s in the background", self.engine.settings.model_dir)
            self._loop.call_soon_threadsafe(self.engine.reload_in_background)


def build_server(settings: Settings) -> FlashServer:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        lifespan="on",
    )
    return FlashServer(config, app.state.engine)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT. A missing model folder is an error before binding."""
    if not settings.model_dir.is_dir():
        raise SystemExit(
            f"model folder {settings.model_dir} not found: build the default family first "
            "or set FLASH_MODEL_DIR / --model to a folder made by distill/"
        )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    build_server(settings).run()


def parse_args(argv: list[str] | None = None) -> dict:
    """Command-line overrides of the FLASH_* environment (only the options given)."""
    p = argparse.ArgumentParser(
        prog="flash serve",
        description="Serve a model family over HTTP. Every option also reads its FLASH_* environment variable.",
        epilog="examples:\n  flash serve --model models/shapes64 --port 8000\n"
        "  FLASH_API_KEYS=k1,k2 FLASH_ADMIN_TOKEN=secret flash serve --max-batch-size 32\n"
        "  FLASH_BACKEND=onnxruntime flash serve --model models/shapes64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", dest="model_dir", help="family folder (FLASH_MODEL_DIR)")
    p.add_argument("--host", help="interface (FLASH_HOST)")
    p.add_argument("--port", type=int, help="port (FLASH_PORT)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (FLASH_DEVICE)")
    p.add_argument("--backend", help="inference backend (FLASH_BACKEND)")
    p.add_argument("--max-batch-size", type=int, help="FLASH_MAX_BATCH_SIZE")
    p.add_argument("--max-wait-ms", type=float, help="FLASH_MAX_WAIT_MS")
    p.add_argument("--log-level", help="FLASH_LOG_LEVEL")
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    serve(Settings(**parse_args(argv)))
