"""What a running server serves now: its engine once loaded, the snapshot it serves, how it
publishes one. The running server changes it, the servicer only reads it."""
from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable

from .engine import MatchEngine

# Publishes a snapshot of the writer's gallery: (snapshot name, gallery_version).
Publisher = Callable[[], Awaitable[tuple[str, int]]]


class ServingState:
    """Handed to the servicer at construction; changed only through ``loaded`` and
    ``snapshot_served`` (the loader, and the snapshot watcher's thread on a hot swap)."""

    def __init__(self, role: str = "writer") -> None:
        self.role = role
        self._lock = threading.Lock()  # the watcher thread and the event loop both swap
        self._engine: MatchEngine | None = None
        self._snapshot_name = ""
        self._publish: Publisher | None = None

    @property
    def engine(self) -> MatchEngine | None:
        """None while models and gallery are loading."""
        return self._engine

    @property
    def snapshot_name(self) -> str:
        return self._snapshot_name

    @property
    def publish(self) -> Publisher | None:
        """None on a replica: only the writer publishes snapshots."""
        return self._publish

    def loaded(self, engine: MatchEngine, snapshot_name: str = "",
               publish: Publisher | None = None) -> None:
        """Models and gallery are ready: calls are answered from now on."""
        with self._lock:
            self._snapshot_name = snapshot_name
            self._publish = publish
            self._engine = engine

    def snapshot_served(self, name: str) -> None:
        """A snapshot was swapped in or published."""
        with self._lock:
            self._snapshot_name = name
