"""Writes decisions made on the request path to the incident log, off the event loop.

The defence decides under its lock on the serving path; an append (an fsync'd SQLite commit and
a signature, about a millisecond; a round trip or more to PostgreSQL) must not wait there.
``submit`` puts the decision on a bounded queue and returns; one thread appends them in order.
A full queue drops the decision and counts it (``on_drop``); it never blocks a request.

While the log's database is away (PostgreSQL down, SQLite's disk full or locked past its busy
timeout) the thread keeps the entry it holds and tries it again with a capped exponential
back-off, so nothing is lost to an outage shorter than the backlog takes to fill, and the
entries are written in the order they were decided once the database is back. An append cut
off during its COMMIT may have been committed all the same (it was never acknowledged): tried
again, that decision can appear twice, never not at all. An entry the log refuses for good (a
malformed one, or a log ``TamperedLog`` stops) is dropped and counted.

``close`` writes what is queued for at most ``drain_s`` and counts the rest as dropped, so a
gateway whose database stays down still stops in bounded time.
Admin actions do not come through here: their routes append and wait, so the response is sent
only once the entry is durable.
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from bastion.gateway.incidents.log import IncidentLog

log = logging.getLogger(__name__)
_STOP: Final = object()
SHEDDABLE = frozenset({"campaign"})
RETRY_S: Final = (0.05, 2.0)  # the back-off between attempts while the database is away
DRAIN_S: Final = 5.0  # the longest ``close`` waits for the queue to be written
GRACE_S: Final = 1.0  # past the drain, for an attempt under way to end
DROP_LOG_S: Final = 10.0  # drops are logged at most this often (an outage drops thousands)
# what a database that is away raises (DatabaseUnavailable is an OSError): worth another try
TRANSIENT: Final = (OSError, sqlite3.OperationalError)

Item = tuple[str, str, dict[str, Any], str]


class LogWriter:
    """``backlog``: entries waiting (the one being tried aside); ``on_drop`` is called once for
    every entry that will not be written."""

    def __init__(
        self,
        incident_log: IncidentLog,
        backlog: int,
        on_drop: Callable[[], None] | None = None,
        retry_s: tuple[float, float] = RETRY_S,
        drain_s: float = DRAIN_S,
    ) -> None:
        self.log = incident_log
        self.backlog, self.retry_s, self.drain_s = backlog, retry_s, drain_s
        # unbounded underneath: ``submit`` enforces the bound, so ``close`` can always queue
        # its stop; a lock makes the size check and the put one step for concurrent producers
        self._queue: queue.Queue[Any] = queue.Queue()
        self._gate = threading.Lock()
        self._on_drop = on_drop
        self._closed = False
        self._deadline = math.inf  # monotonic; past it, what is not written is dropped
        self._wake = threading.Event()  # cuts a back-off short when ``close`` starts
        self._drops_unlogged, self._drop_logged_at = 0, -math.inf
        self._thread = threading.Thread(target=self._run, name="incident-log", daemon=True)
        self._thread.start()

    def submit(self, kind: str, subject: str, body: dict[str, Any], actor: str = "gateway") -> bool:
        """Queues one entry; False when the backlog is full (the entry is dropped). Campaign
        links, which any client can make many of, may fill only half of it: the other half
        stays for containments, releases and alarms."""
        with self._gate:
            waiting = self._queue.qsize()
            room = self.backlog // 2 if kind in SHEDDABLE else self.backlog
            if not self._closed and waiting < room:
                self._queue.put_nowait((kind, subject, body, actor))
                return True
        self._dropped(kind, subject, "closed" if self._closed else "backlog full")
        return False

    def flush(self) -> None:
        """Returns once every entry queued so far is written (or dropped): while the database
        is away, not before it is back."""
        self._queue.join()

    def close(self) -> None:
        """Writes what is queued, for at most ``drain_s``; what is left then is dropped and
        counted. Returns within ``drain_s + GRACE_S``; later ``submit`` calls are refused."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._deadline = time.monotonic() + self.drain_s
            self._queue.put_nowait(_STOP)
        self._wake.set()
        self._thread.join(self.drain_s + GRACE_S)
        if self._thread.is_alive():  # stuck in one attempt (a connect timing out): what waits
            self._discard_queued()  # behind it goes now; it drops its own if that fails
            self._queue.put_nowait(_STOP)

    def _discard_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._dropped(item[0], item[1], "not written before close")
            self._queue.task_done()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._write(item)
            finally:
                self._queue.task_done()

    def _write(self, item: Item) -> None:
        """Appends one entry, trying again while the database is away; once ``close``'s
        deadline has passed, drops it instead of trying (again)."""
        kind, subject, _, _ = item
        delay, attempts, failing_since = self.retry_s[0], 0, 0.0
        while time.monotonic() < self._deadline:
            try:
                self.log.append(*item)
            except TRANSIENT as exc:
                attempts += 1
                if attempts == 1:
                    failing_since = time.monotonic()
                    log.error(
                        "incident log unavailable, keeping %d entries queued and retrying: %s",
                        self._queue.qsize() + 1,
                        exc,
                    )
                self._wake.wait(max(0.0, min(delay, self._deadline - time.monotonic())))
                self._wake.clear()
                delay = min(delay * 2, self.retry_s[1])
                continue
            except Exception:  # refused for good: one bad entry must not stop the log
                log.exception("could not append a %s entry for %s", kind, subject)
                self._dropped(kind, subject, None)
                return
            if attempts:
                log.warning(
                    "incident log available again after %.1f s (%d failed attempts)",
                    time.monotonic() - failing_since,
                    attempts,
                )
            return
        self._dropped(kind, subject, "not written before close")

    def _dropped(self, kind: str, subject: str, why: str | None) -> None:
        """Counts one entry that will not be written; logs it, or how many since the last
        line, at most every ``DROP_LOG_S`` (``why`` None: logged already)."""
        if self._on_drop is not None:
            self._on_drop()
        if why is None:
            return
        now = time.monotonic()
        with self._gate:
            self._drops_unlogged += 1
            if now - self._drop_logged_at < DROP_LOG_S:
                return
            count, self._drops_unlogged, self._drop_logged_at = self._drops_unlogged, 0, now
        more = f" ({count - 1} more dropped since the last report)" if count > 1 else ""
        log.error("incident log: dropped a %s entry for %s, %s%s", kind, subject, why, more)
