"""Opens the incident log, its incidents and the ledger where the settings put them.

SQLite files beside the gateway by default; PostgreSQL, shared by every replica, when
``database_url`` is set (the schema migrated on open). Opening is blocking I/O: the
composition root calls these before serving, or from a thread.
"""

from __future__ import annotations

from pathlib import Path

from bastion.gateway.incidents.database import Database, PostgresDatabase
from bastion.gateway.incidents.grouping import Grouper
from bastion.gateway.incidents.ledger import Ledger
from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.incidents.signing import Signer
from bastion.gateway.incidents.store import IncidentStore
from bastion.gateway.monitoring.metrics import Metrics
from bastion.gateway.settings import Settings


def open_log(settings: Settings) -> IncidentLog:
    """The incident log (its signing key created on first use, its witness file). In
    PostgreSQL it refuses to open with a key other than the one the replicas sign with."""
    signer = Signer.from_file(settings.incident_key_path)
    if settings.database_url:
        from bastion.gateway.incidents.log_postgres import PostgresIncidentLog

        return PostgresIncidentLog(settings.database_url, signer, settings.incident_checkpoint_path)
    return IncidentLog(settings.incident_log_path, signer, settings.incident_checkpoint_path)


def open_incidents(settings: Settings, metrics: Metrics) -> tuple[IncidentLog, Grouper]:
    """The incident log and the incidents its entries open and join (in the log's
    database), with the log's listeners for the entry metrics and the grouping."""
    incident_log = open_log(settings)
    try:
        if settings.database_url:  # migrated by the log's opening
            store = IncidentStore(PostgresDatabase(settings.database_url, migrate=False))
        else:
            store = IncidentStore(settings.incident_log_path)
    except BaseException:
        incident_log.close()
        raise
    grouper = Grouper(store, incident_log)
    incident_log.listeners.append(lambda e: metrics.incident_log_entries.labels(e.kind).inc())
    incident_log.listeners.append(grouper.on_entry)
    return incident_log, grouper


def open_ledger(settings: Settings, metrics: Metrics) -> Ledger | None:
    """The served-prediction ledger, or None when ``ledger`` is off."""
    if not settings.ledger:
        return None
    where: Path | Database = settings.ledger_path
    if settings.database_url:
        where = PostgresDatabase(settings.database_url)
    return Ledger(
        where,
        settings.ledger_retention_s,
        settings.ledger_max_rows,
        settings.ledger_backlog,
        on_drop=metrics.ledger_dropped.inc,
    )
