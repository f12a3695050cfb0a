"""The ``bastion`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Bastion: a Triton-compatible inference gateway.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Bastion: a Triton-compatible inference gateway."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [8000].")] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Triton-style model repository [the bundled one].")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda [auto].")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML/JSON settings file (also BASTION_CONFIG_FILE).")
    ] = None,
) -> None:
    """Serve the model repository over KServe v2 HTTP."""
    import os

    import uvicorn

    from gateway.app import create_app
    from gateway.settings import Settings

    if config is not None:
        os.environ["BASTION_CONFIG_FILE"] = str(config)
    flags: dict[str, Any] = {
        "host": host,
        "port": port,
        "model_repository": model_repository,
        "device": device,
    }
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=settings.access_log,
        proxy_headers=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
