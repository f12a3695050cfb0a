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


@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="Model name in the repository.")],
    model_repository: Annotated[
        Path | None, typer.Option(help="Triton-style model repository [the bundled one].")
    ] = None,
    version: Annotated[int | None, typer.Option(help="Version folder [the latest].")] = None,
    fpr: Annotated[float, typer.Option(help="Target false-positive rate on clean data.")] = 0.05,
    data: Annotated[
        Path | None, typer.Option(help="Clean images (.npz with 'images') [bundled split].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Set screening thresholds on clean data and write calibration.json beside the weights."""
    from gateway.screening.calibrate import calibrate_model
    from gateway.settings import DEFAULT_REPOSITORY

    calibration, path = calibrate_model(
        model_repository or DEFAULT_REPOSITORY, model, version, fpr, data, device
    )
    typer.echo(f"wrote {path}")
    typer.echo(f"{'detector':<20} threshold (flag when above)")
    for name, value in calibration.thresholds.items():
        typer.echo(f"{name:<20} {value:.6g}")
    typer.echo(f"{'combined':<20} {calibration.combined_threshold:.6g}  "
               f"(calibration FPR {calibration.calibration_fpr:.3f}, n={calibration.samples})")
