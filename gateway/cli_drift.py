"""``bastion drift``: drift reports in Evidently's format, from the ledger and the reference."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

import typer

drift = typer.Typer(help="Drift reports: a window of what was served against the reference.")


def write_report(
    model: str,
    version: int | None,
    out: Path,
    ledger: Path | str,
    repository: Path,
    start: float | None = None,
    end: float | None = None,
    last: int | None = None,
) -> dict[str, Any]:
    """Builds and writes one report; returns what it found: the version, the window's size,
    both judges' drifted statistics and their differences. Raises ValueError (no profile, an
    empty window), KeyError (no such model), OSError and ImportError (no ``reports`` extra)."""
    from bastion.gateway.incidents.report import snapshot
    from bastion.gateway.monitoring import drift_report
    from bastion.gateway.monitoring.reference import ReferenceProfile
    from bastion.gateway.repository import ModelRepository
    from bastion.gateway.settings import Settings

    config = ModelRepository(repository).config(model)
    chosen = version if version is not None else max(config.versions)
    profile = ReferenceProfile.load(config.version_path(chosen))
    if profile is None:
        raise ValueError(
            f"{model} version {chosen} has no reference profile "
            f"(bastion profile {model} writes one)"
        )
    with snapshot(ledger) as db:
        window = drift_report.window_frame(db, model, str(chosen), start, end, last)
    span = (
        f"the last {len(window)} images" if last is not None else f"{_when(start)} to {_when(end)}"
    )
    settings = Settings()
    page, ours, theirs, notes = drift_report.build(
        profile,
        window,
        f"{model} version {chosen}: {span}",
        settings.drift_psi_threshold,
        settings.drift_js_threshold,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return {
        "version": chosen,
        "images": len(window),
        "monitor_drifted": [v.statistic for v in ours if v.drifted],
        "evidently_drifted": [v.statistic for v in theirs if v.drifted],
        "differences": notes,
    }


def _when(moment: float | None) -> str:
    if moment is None:
        return "any time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


@drift.command("report")
def report(
    model: Annotated[str, typer.Argument(help="Model name in the repository.", metavar="MODEL")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("drift.html"),
    version: Annotated[
        int | None, typer.Option(help="Model version (default: the latest in the repository).")
    ] = None,
    window: Annotated[
        str | None,
        typer.Option(
            help="'last': the last 500 images, as the monitor scores (the default "
            "unless --from or --to is given)."
        ),
    ] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="Window start: ISO 8601 (UTC) or Unix seconds.")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="Window end: ISO 8601 (UTC) or Unix seconds.")
    ] = None,
    ledger: Annotated[Path | None, typer.Option(help="Default: ledger_path.")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="The ledger in PostgreSQL, shared by the replicas (default: "
            "BASTION_DATABASE_URL when set and --ledger is not given)."
        ),
    ] = None,
    repository: Annotated[
        Path | None,
        typer.Option(help="For the reference profile (default: the model_repository setting)."),
    ] = None,
) -> None:
    """Writes an Evidently data-drift report of a recorded window of the ledger against the
    model version's reference profile (confidence, margin, pixel mean and sd, predicted class,
    embedding summary), with the in-path monitor's verdicts on the same window and where the
    two differ and why. Offline, read-only; needs the reports extra."""
    from bastion.gateway.errors import NotFound
    from bastion.gateway.monitoring.drift_report import LAST_IMAGES, parse_time
    from bastion.gateway.repository import ConfigError
    from bastion.gateway.settings import Settings

    if window not in (None, "last"):
        typer.echo(f"error: --window is 'last' (or give --from/--to), not {window!r}", err=True)
        raise typer.Exit(2)
    if window == "last" and (start or end):
        typer.echo("error: give --window last or --from/--to, not both", err=True)
        raise typer.Exit(2)
    try:
        bounds = [parse_time(v) if v else None for v in (start, end)]
    except ValueError as exc:
        typer.echo(f"error: --from/--to: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = Settings()
    url = database_url or (settings.database_url if ledger is None else None)
    last = LAST_IMAGES if not (start or end) else None
    started = time.perf_counter()
    try:
        found = write_report(
            model,
            version,
            out,
            url or ledger or settings.ledger_path,
            repository or settings.model_repository,
            bounds[0],
            bounds[1],
            last,
        )
    except ImportError:
        typer.echo(
            "error: drift reports need the reports extra: pip install 'bastion-gateway[reports]'",
            err=True,
        )
        raise typer.Exit(2) from None
    except NotFound:
        typer.echo(f"error: no model {model!r} in the repository", err=True)
        raise typer.Exit(1) from None
    except (OSError, ValueError, sqlite3.Error, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"{out}\n{found['images']} images of {model} version {found['version']}; drift by the "
        f"monitor: {', '.join(found['monitor_drifted']) or 'none'}; by Evidently: "
        f"{', '.join(found['evidently_drifted']) or 'none'} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    for note in found["differences"]:
        typer.echo(f"differs: {note}")
