"""The route table shared by replicas through Redis: a rollback on one routes all of them.

The routes live in the hash ``bastion:routes`` (model -> the route's JSON, as the incident log
records it). A change on a replica (an admin's route, a rule's rollback, a roll forward) is
written and announced in one transaction (``HSET`` or ``HDEL``, then ``PUBLISH bastion:routes
<model>``); every replica is subscribed and applies the model's route from the hash as the
message arrives, so all replicas route the same way within a round trip or two. At start, and
after Redis was away (a message may have been missed), a replica takes the whole hash: Redis
holds the current table, the incident log holds its history (and rebuilds it when Redis has
none).

Two threads, both blocked until there is work (nothing polls): one sends the changes queued on
this replica (the route table never waits for Redis), the other applies the others'. Nothing is
unpickled; a malformed route is skipped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

from bastion.gateway.routing import Route, RouteTable, route_from_json

log = logging.getLogger(__name__)

HASH = "bastion:routes"
CHANNEL = "bastion:routes"
MAX_MODEL_CHARS = 256


class RouteSync:
    """``redis``: a sync ``redis.Redis``; ``failed(op)`` counts a Redis failure."""

    def __init__(self, redis: Any, routes: RouteTable, failed: Any = lambda op: None) -> None:
        self.redis, self.routes, self.failed = redis, routes, failed
        self._queue: queue.Queue[tuple[str, Route | None] | None] = queue.Queue(1024)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.synced = threading.Event()  # the hash has been read at least once

    def start(self) -> None:
        self.routes.on_change = self._changed
        for target, name in ((self._run, "route-sync"), (self._send_loop, "route-send")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self.routes.on_change = None
        self._stop.set()
        self._queue.put(None)  # wakes the sender
        for thread in self._threads:
            thread.join(timeout=5)

    def _changed(self, model: str, route: Route | None) -> None:
        try:
            self._queue.put_nowait((model, route))
        except queue.Full:  # a flood of changes: the table here is right, Redis lags
            self.failed("routes_dropped")

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(CHANNEL)
                    self._take_all()  # what changed while nobody listened
                    self.synced.set()
                message = pubsub.get_message(timeout=1.0)  # blocks until one arrives
                if message is not None:
                    self._take(message["data"].decode(errors="replace")[:MAX_MODEL_CHARS])
            except Exception as exc:  # Redis away: retry, then read the whole table again
                self.failed("routes")
                log.debug("route sync: %r", exc)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        log.debug("route sync: closing the subscription failed")
                pubsub = None
                self._stop.wait(1.0)
        if pubsub is not None:
            pubsub.close()

    def _send_loop(self) -> None:
        """This replica's changes as they come, each written and announced in one transaction;
        kept and tried again while Redis is away."""
        change: tuple[str, Route | None] | None = None
        while not self._stop.is_set():
            if change is None:
                change = self._queue.get()
                if change is None:
                    return
            model, route = change
            pipe = self.redis.pipeline(transaction=True)
            if route is None:
                pipe.hdel(HASH, model)
            else:
                pipe.hset(HASH, model, json.dumps(route.to_json()))
            pipe.publish(CHANNEL, model)
            try:
                pipe.execute()
                change = None
            except Exception as exc:
                self.failed("routes")
                log.debug("route sync: sending %s: %r", model, exc)
                self._stop.wait(1.0)

    def _take(self, model: str) -> None:
        raw = self.redis.hget(HASH, model)
        self._apply(model, raw)

    def _take_all(self) -> None:
        for model, raw in self.redis.hgetall(HASH).items():
            self._apply(model.decode(errors="replace")[:MAX_MODEL_CHARS], raw)

    def _apply(self, model: str, raw: bytes | None) -> None:
        if raw is None:
            route = None
        else:
            try:
                route = route_from_json(json.loads(raw))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("skipped a malformed shared route for %r: %s", model, exc)
                return
        if self.routes.routes().get(model) != route:
            self.routes.apply(model, route)
