"""What a re-index run tells its operator: the summary, the rejects file, progress.

Everything here is output only; nothing in it decides what the run does.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..durable import atomic_write, atomic_write_text
from .manifest import Reject

log = logging.getLogger(__name__)

REJECTS_FILE = "rejects.csv"
SUMMARY_FILE = "reindex-summary.json"


@dataclass
class Summary:
    """What a run did; written as JSON beside the rejects file and printed at the end."""

    rows: int = 0
    bookings: int = 0             # rows accepted for the new gallery (before photo checks)
    duplicates: int = 0           # rows repeating an earlier row's traveller and photo
    expired: int = 0              # rows whose booking window is already over
    embedded: int = 0             # photos that went through the pipeline this run
    skipped: int = 0              # photos whose template was already stored
    remembered_rejects: int = 0   # photos refused earlier, not embedded again
    rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    enrolled: int = 0             # travellers added or changed in the store
    unchanged: int = 0
    removed: int = 0              # travellers deleted (cancelled, expired or no good photo)
    gallery_travellers: int = 0
    gallery_templates: int = 0
    gallery_version: int = 0
    snapshot: str = ""
    rejects_file: str = ""
    photos_per_s: float = 0.0     # embedded / embedding time (embedder start-up included)
    steady_photos_per_s: float | None = None  # after the first batch; None: too few batches
    photos_by_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> embedded
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejects_by_reason.items()))
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return [
            f"manifest rows {self.rows}: bookings {self.bookings}, expired {self.expired}, "
            f"duplicates {self.duplicates}",
            f"photos: embedded {self.embedded} ({self.photos_per_s:.1f} photos/s"
            + (f", {self.steady_photos_per_s:.1f} once started"
               if self.steady_photos_per_s is not None else "")
            + (f", on {len(self.photos_by_node)} Ray node(s)" if self.photos_by_node else "")
            + "), "
            f"skipped {self.skipped} (already stored), "
            f"remembered rejects {self.remembered_rejects}",
            f"rejected rows {self.rejected}" + (f" ({reasons})" if reasons else ""),
            f"travellers: enrolled or changed {self.enrolled}, unchanged {self.unchanged}, "
            f"removed {self.removed}",
            f"gallery: {self.gallery_travellers} travellers, {self.gallery_templates} "
            f"templates at gallery_version {self.gallery_version}",
            f"snapshot: {self.snapshot}",
            f"rejects: {self.rejects_file}",
            f"time: {times}",
        ]


def write_summary(path: Path, summary: Summary) -> None:
    """The summary as JSON, replaced atomically."""
    atomic_write_text(path, json.dumps(summary.as_dict(), indent=2, sort_keys=True))


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    """CSV ``row,traveller_id,reason`` sorted by row, replaced atomically."""
    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(["row", "traveller_id", "reason"])
        for r in sorted(rejects, key=lambda r: r.row):
            writer.writerow([r.row, r.traveller_id, r.reason])

    atomic_write(path, write)


class Progress:
    """tqdm on a terminal; elsewhere (CI, cron) one log line per 10% instead of a bar."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self._bar = None
        self._started: float | None = None  # at the first photo: start-up is not throughput
        self._first = 0
        self._next_report = 0.1
        self._enabled = enabled and total > 0
        self._redirect = None
        if self._enabled and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # Log lines go through tqdm.write, above the bar instead of through it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=total, unit="photo", desc="reindex", smoothing=0.1,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._started is None:
            self._started = time.monotonic()
            self._first = n
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and self.done >= self._next_report * self.total:
            elapsed = time.monotonic() - self._started
            rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
            if rate > 0:
                log.info("reindex: %d/%d photos (%.0f%%), %.1f photos/s, ETA %.0f s",
                         self.done, self.total, 100 * self.done / self.total, rate,
                         (self.total - self.done) / rate)
            else:  # only the first batch is back: no rate yet
                log.info("reindex: %d/%d photos (%.0f%%)", self.done, self.total,
                         100 * self.done / self.total)
            while self._next_report * self.total <= self.done:
                self._next_report += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
