"""``tao flywheel CONFIG``: serve a model, log its traffic, tune it on that traffic, promote what the gate passes.

One process holds the server (``tao serve``'s FastAPI app on uvicorn, logging every exchange to the
inference table) and the controller thread (:mod:`tao_core.flywheel_controller`), which runs each round
as a process of its own (:mod:`tao_core.flywheel_round`), gates it (:mod:`tao_core.flywheel_gate`) and
swaps a promoted model into the running server through ``app.state.tao.versions.reload`` (in-flight
requests finish on the old weights; new ones get the new version). The config is
:mod:`tao_core.flywheel_config`; docs/flywheel.md describes all of it.

Shutdown (Ctrl-C, SIGTERM, or :meth:`Flywheel.shutdown`): the controller stops first and terminates a
running round (its whole process group), then the server drains (requests in flight finish, for up to
``serve.drain_timeout_s``) and the table writes what it still holds.

Python API::

    from tao_core.flywheel import Flywheel
    from tao_core.flywheel_config import load_flywheel_config

    flywheel = Flywheel(load_flywheel_config("flywheel.toml"))
    asyncio.run(flywheel.serve())   # until Ctrl-C / SIGTERM, or flywheel.shutdown() from another thread
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import Any

import click

from tao_core.errors import TaoInputError
from tao_core.flywheel_config import FlywheelConfig, load_flywheel_config
from tao_core.flywheel_controller import JOURNAL, Controller, Served, read_history
from tao_core.serve.threads import in_passing_thread

log = logging.getLogger(__name__)
LOCK = "flywheel.lock"
RELOAD_TIMEOUT_S = 600.0  # a reload reads the weights and waits for the engine loop to take them
STOP_TIMEOUT_S = 30.0  # at shutdown, a gate still answering is abandoned after this (it has changed nothing)


class Flywheel:
    """The server and the controller of one flywheel directory; see the module docstring."""

    def __init__(self, cfg: FlywheelConfig) -> None:
        import torch

        from tao_core.flywheel_gate import load_gate_scorer

        self.cfg = cfg
        self.dir = Path(cfg.output_dir)
        self._lock_fd = _lock(self.dir)
        self.table = None
        try:
            history = read_history(self.dir / JOURNAL)
            self.served = history.served or Served(cfg.model, "0")
            if history.served is not None and not Path(history.served.model_dir).exists():
                raise TaoInputError(
                    f"{self.dir / JOURNAL} says version {history.served.version} is served from "
                    f"{history.served.model_dir}, which is gone; restore that directory, or move the journal "
                    f"aside to serve {cfg.model!r} as version 0 again")
            if cfg.server_threads is not None:
                torch.set_num_threads(cfg.server_threads)
            scorer = load_gate_scorer(cfg.gate)
            t = cfg.table
            self.table = _open_table(t.url, t.sample_fraction)
            self.app = in_passing_thread(self._app, name="tao-flywheel-load")  # tao_core.serve.threads
            self.controller = Controller(cfg, self.table, scorer, self._reload, served=self.served, history=history)
        except BaseException:
            self._release()
            raise
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None

    def _app(self) -> Any:
        from tao_core.models import load_model
        from tao_core.serve.app import create_app
        from tao_core.serve.settings import ServeConfig

        cfg = self.cfg
        config = ServeConfig(**{**cfg.serve, "served_model": cfg.serve.get("served_model") or cfg.model,
                                "model_version": self.served.version})
        lm = load_model(self.served.model_dir, dtype=cfg.dtype, device=cfg.device)
        return create_app(lm, config, logger=self.table)

    @property
    def serve_config(self) -> Any:
        return self.app.state.tao.config

    async def serve(self, sockets: list[Any] | None = None) -> None:
        """Serve and run the controller until shut down; the table is closed and the directory released after."""
        import uvicorn

        config = self.serve_config
        self.loop = asyncio.get_running_loop()
        self.server = _server(uvicorn.Config(self.app, host=config.host, port=config.port, log_level="info",
                                             timeout_graceful_shutdown=int(config.drain_timeout_s)),
                              on_exit=self.controller.stop)
        self.controller.start()
        try:
            await self.server.serve(sockets=sockets)
        finally:
            self.controller.stop()
            self.controller.join(STOP_TIMEOUT_S)  # terminates a running round and reaps it
            self._release()

    def shutdown(self) -> None:
        """Stop the controller and the server (from any thread)."""
        self.controller.stop()
        if self.server is not None:
            self.server.should_exit = True

    def _reload(self, model_dir: str, version: str) -> dict[str, str]:
        """Swap ``model_dir`` into the running server as ``version`` (called from the controller thread)."""
        if self.loop is None:
            raise RuntimeError("the server is not running")
        versions = self.app.state.tao.versions
        future = asyncio.run_coroutine_threadsafe(versions.reload(model_dir, version=version), self.loop)
        return future.result(timeout=RELOAD_TIMEOUT_S)

    def _release(self) -> None:
        if self.table is not None:
            self.table.close()  # a second close (the server's lifespan closed it) does nothing
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _server(config: Any, on_exit: Any) -> Any:
    """A uvicorn server whose Ctrl-C / SIGTERM also stops the controller before the server drains."""
    import uvicorn

    class FlywheelServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    return FlywheelServer(config)


def _open_table(url: str | None, sample_fraction: float) -> Any:
    """The served table (bodies kept: they are a round's prompts); a path that cannot be created names ``table.url``."""
    from tao_core.table import InferenceTable

    try:
        return InferenceTable.open(url, sample_fraction=sample_fraction)
    except OSError as e:
        raise TaoInputError(f"table.url {url!r}: cannot create the inference table ({e.strerror or e}: "
                            f"{e.filename or url}); give a writable path or a database URL") from None
    except TaoInputError as e:
        raise TaoInputError(f"table.url: {e}") from None


def _lock(directory: Path) -> int:
    """Hold ``directory/flywheel.lock``: two flywheels in one directory would number rounds twice."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TaoInputError(f"output_dir {str(directory)!r}: cannot create the flywheel's directory ({e.strerror or e}: "
                            f"{e.filename or directory}); choose a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TaoInputError(f"{directory} is in use by another tao flywheel; stop it first or choose another "
                            "output_dir") from None
    return fd


@click.command("flywheel")
@click.argument("config", type=click.Path(dir_okay=False))
def flywheel_cmd(config: str) -> None:
    """Serve a model and tune it on its own traffic: rounds of TAO on logged prompts, promoted by a gate.

    CONFIG is a flywheel TOML file (docs/flywheel.md): the model and [serve] settings, the run config of a
    round, the [trigger] and the [gate]. Every round's outcome is a line of OUTPUT_DIR/flywheel.jsonl.
    """
    cfg = load_flywheel_config(config)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in ("tao_core.flywheel", "tao_core.flywheel_controller"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        flywheel = Flywheel(cfg)
    except TaoInputError as e:  # the gate scorer's options, the directory, the table: name the file too
        raise TaoInputError(f"{config}: {e}") from None
    c, t = flywheel.serve_config, cfg.trigger
    when = " or ".join(([f"{t.min_new_prompts} new prompts"] if t.min_new_prompts else [])
                       + ([f"{t.interval_s:g} s with a new prompt"] if t.interval_s else []))
    click.echo(f"flywheel {cfg.output_dir}: serving {c.served_model!r} version {flywheel.served.version} at "
               f"http://{c.host}:{c.port}/v1, table {flywheel.table.url}; a round after {when}", err=True)
    # uvicorn raises SIGTERM again once drained: leave through the cleanup, not at the default handler's kill
    signal.signal(signal.SIGTERM, lambda signum, frame: _exit(signum))
    asyncio.run(flywheel.serve())


def _exit(signum: int) -> None:
    raise SystemExit(128 + signum)
