"""What serving needs from a gallery, whichever serves it: the primary or a replica."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np

from ..errors import InvalidInput
from ..templates import check_templates, fuse_templates, to_epoch
from .index import SearchResult
from .store import EnrolResult, Traveller


@dataclass(frozen=True)
class ClaimScore:
    """A probe scored against one claimed traveller (1:1)."""

    traveller_id: str
    score: float          # cosine with the traveller's fused booking template
    within_window: bool   # the booking is valid at the time asked about
    valid_from: float
    valid_to: float
    photos: int = 1       # booking photos fused into the one template compared
    gallery_version: int = 0  # the gallery_version the booking was read at


class ServedGallery(Protocol):
    """Implemented by gallery.primary.PrimaryGallery and gallery.replica.ReplicaGallery."""

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def template_count(self) -> int: ...

    @property
    def index_entries(self) -> int: ...

    @property
    def index_kind(self) -> str: ...

    def searchable(self, now: datetime | float | None = None) -> int: ...

    def search(self, probes: np.ndarray, k: int = 5, now: datetime | float | None = None
               ) -> SearchResult: ...

    def score_traveller(self, traveller_id: str, probe: np.ndarray,
                        now: datetime | float | None = None) -> ClaimScore: ...

    def get(self, traveller_id: str) -> Traveller: ...

    def enroll(self, traveller_id: str, templates: np.ndarray, valid_from, valid_to,
               photo_sha256s, wait_s: float | None = None) -> EnrolResult: ...

    def remove(self, traveller_id: str, wait_s: float | None = None) -> int: ...

    def close(self) -> None: ...


def epoch_now(now: datetime | float | None) -> float:
    return time.time() if now is None else to_epoch(now, "now")


def check_search(probes: np.ndarray, k: object) -> tuple[np.ndarray, int]:
    """A 1:N search's probes (n, 512) float32 (n may be 0) and its k, a positive int."""
    if not isinstance(k, int) or k < 1:
        raise InvalidInput("k must be a positive integer")
    return check_templates(probes, what="probe templates", allow_empty=True), k


def check_claim_probe(probe: np.ndarray) -> np.ndarray:
    """The one probe template of a 1:1 check -> (512,) float32; checked before any lookup."""
    x = check_templates(probe, what="the probe template")
    if len(x) != 1:
        raise InvalidInput("a 1:1 check takes exactly one probe template")
    return x[0]


def score_claim(traveller_id: str, templates: np.ndarray, probe: np.ndarray,
                valid_from: float, valid_to: float, now: datetime | float | None,
                gallery_version: int, photos: int | None = None) -> ClaimScore:
    """Cosine of a checked (512,) probe with the traveller's fused booking template (one
    comparison, as a search makes it), and whether the booking holds at ``now``.
    ``templates``: one row per booking photo, or the fused one of ``photos`` photos, as
    read at ``gallery_version``."""
    score = float(fuse_templates(templates) @ probe) if len(templates) else float("-inf")
    t = epoch_now(now)
    return ClaimScore(traveller_id, score, valid_from <= t < valid_to, valid_from, valid_to,
                      len(templates) if photos is None else photos, gallery_version)
