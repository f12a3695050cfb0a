"""Writes decisions made on the request path to the incident log, off the event loop.

The defence decides under its lock on the serving path; an append (an fsync'd SQLite commit and
a signature, about a millisecond) must not wait there. ``submit`` puts the decision on a bounded
queue and returns; one thread appends them in order. A full queue drops the decision, counts it
and logs it (never blocks a request); ``close`` writes what is queued before it returns.
Admin actions do not come through here: their routes append and wait, so the response is sent
only once the entry is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from bastion.gateway.incidents.log import IncidentLog

log = logging.getLogger(__name__)
_STOP = object()
SHEDDABLE = frozenset({"campaign"})


class LogWriter:
    def __init__(
        self, incident_log: IncidentLog, backlog: int, on_drop: Callable[[], None] | None = None
    ) -> None:
        self.log = incident_log
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=backlog)
        self._on_drop = on_drop
        self._thread = threading.Thread(target=self._run, name="incident-log", daemon=True)
        self._thread.start()

    def submit(self, kind: str, subject: str, body: dict[str, Any], actor: str = "gateway") -> bool:
        """Queues one entry; False when the backlog is full (the entry is dropped). Campaign
        links, which any client can make many of, may fill only half of it: the other half
        stays for containments, releases and alarms."""
        try:
            if kind in SHEDDABLE and self._queue.qsize() >= self._queue.maxsize // 2:
                raise queue.Full
            self._queue.put_nowait((kind, subject, body, actor))
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()
            log.error("incident log backlog full: dropped a %s entry for %s", kind, subject)
            return False
        return True

    def flush(self) -> None:
        """Returns once every entry queued so far is written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                kind, subject, body, actor = item
                try:
                    self.log.append(kind, subject, body, actor)
                except Exception:  # one bad entry must not stop the log
                    log.exception("could not append a %s entry for %s", kind, subject)
            finally:
                self._queue.task_done()
