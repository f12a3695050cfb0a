"""``bastion incidents``: the incident log and its incidents."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

import typer


def count(n: int, noun: str) -> str:
    """``1 record``, ``2 records``: what the CLI prints a number of things as."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


IncidentId = Annotated[
    int, typer.Argument(help="Incident number (incidents list).", metavar="INCIDENT")
]
incidents = typer.Typer(
    help="Incidents (list, show, open, close, report) and the tamper-evident log (verify, "
    "public-key)."
)
Url = Annotated[str, typer.Option(envvar="BASTION_URL", help="Gateway address.")]
Token = Annotated[str, typer.Option(envvar="BASTION_ADMIN_TOKEN", help="Admin token.")]


def admin_call(url: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    """One admin API call; its error printed and exit status 1 on failure."""
    from bastion.gateway.admin_client import AdminError, call

    try:
        return call(url, token, method, path, **kwargs)
    except AdminError as exc:
        typer.echo(f"error: {cli_words(str(exc))}", err=True)
        raise typer.Exit(1) from None


def cli_words(message: str) -> str:
    """An admin API error in the CLI's words: the flags a user types, not the API's fields
    (``query.status`` is ``--status``), and how to give the admin token."""
    message = re.sub(
        r"\b(?:query|body)\.([a-z_]+)", lambda m: "--" + m.group(1).replace("_", "-"), message
    )
    message = re.sub(r"\bpath\.([a-z_]+)", lambda m: m.group(1).upper(), message)  # an argument
    if message.startswith(("401", "403")) and "token" in message.lower():
        message += " (pass --token, or set BASTION_ADMIN_TOKEN)"
    return message


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


@incidents.command("list")
def incidents_list(
    state: Annotated[str | None, typer.Option(help="open or closed.")] = None,
    url: Url = "127.0.0.1:8000",
    token: Token = "",
) -> None:
    """Incidents, newest first: id, state, opened, subjects, entries, title."""
    path = "/v2/admin/incidents" + (f"?state={state}" if state else "")
    rows = admin_call(url, token, "GET", path)["incidents"]
    typer.echo(f"{'id':>5}  {'state':<7} {'opened':<21} {'subjects':>8} {'entries':>7}  title")
    for r in rows:
        typer.echo(
            f"{r['id']:>5}  {r['state']:<7} {_when(r['opened_at']):<21} {r['subjects']:>8} "
            f"{r['entries']:>7}  {r['title']}"
        )


@incidents.command("show")
def incidents_show(
    incident: IncidentId,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
    url: Url = "127.0.0.1:8000",
    token: Token = "",
) -> None:
    """One incident and its timeline (the log entries, oldest first)."""
    shown = admin_call(url, token, "GET", f"/v2/admin/incidents/{incident}")
    if as_json:
        typer.echo(json.dumps(shown, indent=1))
        return
    typer.echo(f"incident {shown['id']} ({shown['state']}): {shown['title']}")
    typer.echo(f"opened {_when(shown['opened_at'])}, closed {_when(shown['closed_at'])}")
    typer.echo(f"subjects ({shown['subjects']}): {', '.join(shown['subjects_shown'][:20])}")
    for e in shown["timeline"]:
        body = json.dumps(e["body"], sort_keys=True)
        typer.echo(f"  #{e['seq']:<6} {_when(e['time'])} {e['kind']:<18} {e['subject']}  {body}")


@incidents.command("open")
def incidents_open(
    title: Annotated[str, typer.Argument(help="What happened, in a line.", metavar="TITLE")],
    subject: Annotated[list[str] | None, typer.Option(help="A client, campaign or model.")] = None,
    url: Url = "127.0.0.1:8000",
    token: Token = "",
) -> None:
    """Opens an incident by hand; later entries about its subjects join it."""
    body = {"title": title, "subjects": subject or []}
    made = admin_call(url, token, "POST", "/v2/admin/incidents", body=body)
    typer.echo(f"opened incident {made['id']}")


@incidents.command("close")
def incidents_close(
    incident: IncidentId,
    note: Annotated[str | None, typer.Option(help="What was found and done.")] = None,
    url: Url = "127.0.0.1:8000",
    token: Token = "",
) -> None:
    """Closes an incident (logged)."""
    admin_call(url, token, "POST", f"/v2/admin/incidents/{incident}/close", body={"note": note})
    typer.echo(f"closed incident {incident}")


@incidents.command("verify")
def incidents_verify(
    log: Annotated[Path | None, typer.Option(help="The log (default: incident_log_path).")] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(help="Ed25519 public key PEM (default: the half of incident_key_path)."),
    ] = None,
    witness: Annotated[
        Path | None,
        typer.Option(
            help="Witness file (default: incident_checkpoint_path; none for a log in "
            "PostgreSQL, where each replica keeps its own: give one of theirs)."
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="The log in PostgreSQL, shared by the replicas (default: BASTION_DATABASE_URL "
            "when set and --log is not given)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Proves offline that no entry was edited, removed, reordered or truncated since the
    last signed checkpoint; names the first bad entry. Exit status 1 when one was."""
    import json

    from bastion.gateway.incidents.signing import load_public_key
    from bastion.gateway.incidents.verify import verify
    from bastion.gateway.settings import Settings

    settings = Settings()
    url = database_url or (settings.database_url if log is None else None)
    try:
        key = load_public_key(public_key or settings.incident_key_path)
        if url:
            verdict = verify(url, key, witness)
        else:
            where = log or settings.incident_log_path
            verdict = verify(where, key, witness or settings.incident_checkpoint_path)
    except (OSError, ValueError) as exc:
        typer.echo(
            f"error: {exc}\n(give the files with --log (or --database-url), --public-key and "
            "--witness, or the gateway's BASTION_INCIDENT_LOG_PATH (or BASTION_DATABASE_URL), "
            "BASTION_INCIDENT_KEY_PATH and BASTION_INCIDENT_CHECKPOINT_PATH)",
            err=True,
        )
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(verdict.to_json(), indent=1))
    elif verdict.ok:
        seen = "no witness" if verdict.witnessed is None else f"witness at {verdict.witnessed}"
        typer.echo(
            f"ok: {verdict.entries} entries, {verdict.checkpoints} signed checkpoints, {seen}"
        )
    else:
        where = "the witness" if verdict.first_bad is None else f"entry {verdict.first_bad}"
        typer.echo(f"TAMPERED: first bad {where}")
        for problem in verdict.problems[:50]:
            typer.echo(f"  {problem}")
    if not verdict.ok:
        raise typer.Exit(1)


@incidents.command("public-key")
def incidents_public_key(
    key: Annotated[Path | None, typer.Option(help="Default: incident_key_path.")] = None,
) -> None:
    """Prints the log's public key (PEM) and its id: keep a copy where whoever can write the
    database cannot, and give it to 'verify --public-key'."""
    from bastion.gateway.incidents.signing import key_id, load_public_key, public_pem
    from bastion.gateway.settings import Settings

    try:
        public = load_public_key(key or Settings().incident_key_path)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(public_pem(public).decode(), nl=False)
    typer.echo(f"key id {key_id(public)}", err=True)


@incidents.command("report")
def incidents_report(
    incident: IncidentId,
    out: Annotated[Path, typer.Option(help="Folder for incident-ID.json and .html.")] = Path("."),
    log: Annotated[Path | None, typer.Option(help="The log (default: incident_log_path).")] = None,
    ledger: Annotated[Path | None, typer.Option(help="Default: ledger_path.")] = None,
    repository: Annotated[
        Path | None,
        typer.Option(help="For the reference profile (default: the model_repository setting)."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="The log and the ledger in PostgreSQL, shared by the replicas (default: "
            "BASTION_DATABASE_URL when set and neither --log nor --ledger is given)."
        ),
    ] = None,
    drift: Annotated[
        bool,
        typer.Option(
            help="Also write incident-ID-drift.html, the drift report (Evidently) of the "
            "window, and link it (needs the reports extra)."
        ),
    ] = True,
) -> None:
    """Writes the impact report (JSON and an HTML page with plots): the clients involved,
    every served prediction linked to the campaign, what else they were served, the class
    mix against the reference, the model versions that answered, and a link to the drift
    report of the window. Offline, read-only."""
    from bastion.gateway.incidents.report import STAGES, build, write
    from bastion.gateway.progress import Progress
    from bastion.gateway.settings import Settings

    settings = Settings()
    url = database_url or (settings.database_url if log is None and ledger is None else None)
    started = time.perf_counter()
    try:
        with Progress(f"incident {incident} report", STAGES, "stages", every_s=0) as progress:
            report = build(
                incident,
                url or log or settings.incident_log_path,
                url or ledger or settings.ledger_path,
                repository or settings.model_repository,
                progress,
            )
    except KeyError:
        typer.echo(f"error: no incident {incident}", err=True)
        raise typer.Exit(1) from None
    except (OSError, ValueError, sqlite3.Error) as exc:
        typer.echo(
            f"error: {exc}\n(give the files with --log and --ledger, or the database with "
            "--database-url, or the gateway's BASTION_INCIDENT_LOG_PATH and "
            "BASTION_LEDGER_PATH (or BASTION_DATABASE_URL))",
            err=True,
        )
        raise typer.Exit(2) from None
    if drift:
        report["drift_report"] = _drift_report(
            report, out, url or ledger or settings.ledger_path,
            repository or settings.model_repository,
        )  # fmt: skip
    paths = write(report, out)
    typer.echo(
        f"{paths[1]}\n{paths[0]}\n{report['linked_served_count']} served predictions linked to "
        f"the campaign, {len(report['clients_involved'])} clients involved "
        f"({time.perf_counter() - started:.1f} s)"
    )


def _drift_report(
    report: dict[str, Any], out: Path, ledger: Path | str, repository: Path
) -> dict[str, Any]:
    """The drift report of the incident's window for the version that answered most (the
    one the report's reference is): where it was written, or why there is none."""
    from bastion.gateway.cli_drift import write_report

    top = report.get("reference") or max(
        report.get("versions") or [{}], key=lambda v: v.get("requests", 0)
    )
    if not top.get("model"):
        return {"missing": "no model version answered in the window"}
    name = f"incident-{report['incident']['id']}-drift.html"
    window = report["window"]
    try:
        write_report(
            top["model"], int(top["version"]), out / name, ledger, repository,
            window["start"], window["end"],
        )  # fmt: skip
    except ImportError:
        return {"missing": "the reports extra is not installed (pip install "
                           "'bastion-gateway[reports]')"}  # fmt: skip
    except Exception as exc:  # the impact report is written whatever befalls this one
        return {"missing": str(exc) or type(exc).__name__}
    return {"file": name, "model": top["model"], "version": str(top["version"])}


def quarantine_export(
    out: Annotated[Path, typer.Option(help="Folder for the .npz and the .csv manifest.")],
    model: Annotated[str | None, typer.Option(help="One model (inputs of one shape).")] = None,
    status: Annotated[
        str | None, typer.Option(help="quarantined, released or review (default: all).")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="Default: quarantine_path.")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="The store in PostgreSQL, shared by the replicas (default: "
            "BASTION_DATABASE_URL when set and --store is not given)."
        ),
    ] = None,
) -> None:
    """Exports the quarantined and reviewed inputs with their verdicts and labels (released:
    clean, quarantined: adversarial, review: unreviewed) as a dataset for retraining: NumPy
    .npz plus a CSV manifest. Offline; the export is an entry of the incident log."""
    from bastion.gateway.incidents.export import export
    from bastion.gateway.progress import Progress
    from bastion.gateway.settings import Settings

    settings = Settings()
    url = database_url or (settings.database_url if store is None else None)
    try:
        with (
            _quarantine_store(url, store or settings.quarantine_path) as records,
            Progress("quarantine export", None, "records read") as progress,
        ):
            done = export(records, out, model, status, progress=progress)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # no file, or PostgreSQL away
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    log_offline("export", "quarantine", done)
    typer.echo(f"{count(done['count'], 'input')} {done['labels']} -> {out}")


def _quarantine_store(url: str | None, path: Path) -> Any:
    """The quarantine store to read: PostgreSQL at ``url`` (migrated by the gateway), else
    the SQLite file at ``path``, which must exist. Raises ``OSError`` when neither opens."""
    if url:
        from bastion.gateway.quarantine.postgres import PostgresQuarantineStore

        return PostgresQuarantineStore(url, migrate=False)
    from bastion.gateway.quarantine.sqlite import SQLiteQuarantineStore

    if not path.is_file():
        raise FileNotFoundError(f"no quarantine store at {path}")
    return SQLiteQuarantineStore(path)


def log_offline(kind: str, subject: str, body: dict[str, Any]) -> None:
    """Appends a command's decision to the incident log from this process (the log takes
    appends from several); a warning, not a failure, when it cannot."""
    from bastion.gateway.incidents.factory import open_log
    from bastion.gateway.incidents.log import TamperedLog
    from bastion.gateway.settings import Settings

    try:
        log = open_log(Settings())  # the shared log in PostgreSQL when BASTION_DATABASE_URL
        try:
            log.append(kind, subject, body, "admin")
        finally:
            log.close()
    except (OSError, ValueError, sqlite3.Error, TamperedLog) as exc:
        typer.echo(f"warning: done, but not recorded in the incident log: {exc}", err=True)
