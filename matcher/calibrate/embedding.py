"""A labelled folder through the served pipeline: labels.csv read, every photo embedded
(the face nearest the centre), what became of each, cached per labels and settings."""
from __future__ import annotations

import csv
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..durable import atomic_write
from ..errors import InvalidInput, MatcherError
from ..face.pipeline import Face, Pipeline
from ..templates import EMBEDDING_DIM

log = logging.getLogger(__name__)

# What became of one labelled photo.
OK, NO_FACE, LOW_QUALITY, UNREADABLE = "ok", "no_face", "low_quality", "unreadable"


@dataclass
class Embedded:
    """One labelled set run through the pipeline. Rows follow labels.csv."""

    files: np.ndarray        # (n,) str
    identities: np.ndarray   # (n,) str
    status: np.ndarray       # (n,) str: OK / NO_FACE / LOW_QUALITY / UNREADABLE
    reasons: np.ndarray      # (n,) str, quality reasons joined by ';'
    templates: np.ndarray    # (n, 512) float32; the chosen face's template, NaN if none
    settings_hash: str
    labels_sha256: str

    def usable(self, quality_gate: bool = True) -> np.ndarray:
        """Rows whose template would be searched (bool mask)."""
        ok = self.status == OK
        return ok if quality_gate else ok | (self.status == LOW_QUALITY)

    def save(self, path: Path) -> None:
        atomic_write(path, lambda f: np.savez(
            f, files=self.files, identities=self.identities, status=self.status,
            reasons=self.reasons, templates=self.templates,
            settings_hash=self.settings_hash, labels_sha256=self.labels_sha256), binary=True)

    @classmethod
    def load(cls, path: Path) -> Embedded:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["files"], z["identities"], z["status"], z["reasons"], z["templates"],
                       str(z["settings_hash"]), str(z["labels_sha256"]))


def read_labels(folder: Path) -> list[tuple[str, str]]:
    """(file, identity) rows of ``folder/labels.csv``; files relative to the folder."""
    path = folder / "labels.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise InvalidInput(f"{path} not found: a calibration folder needs a labels.csv "
                           "with the columns file,identity") from None
    if not rows or not {"file", "identity"} <= set(rows[0]):
        raise InvalidInput(f"{path} needs the columns file,identity")
    return [(r["file"], r["identity"]) for r in rows]




def central_face(faces: list[Face], shape: tuple[int, ...]) -> Face | None:
    """The face nearest the image centre: the labelled person in LFW-style photos."""
    if not faces:
        return None
    cy, cx = shape[0] / 2, shape[1] / 2

    def distance(face: Face) -> float:
        x1, y1, x2, y2 = face.bbox
        return float(((x1 + x2) / 2 - cx) ** 2 + ((y1 + y2) / 2 - cy) ** 2)

    return min(faces, key=distance)


def _analyse_one(pipeline: Pipeline, path: Path) -> tuple[str, str, np.ndarray | None]:
    try:
        image = pipeline.decode_scaled(path.read_bytes())  # as the service decodes it
    except (OSError, MatcherError) as exc:
        log.warning("%s: unreadable (%s)", path.name, type(exc).__name__)
        return UNREADABLE, "", None
    face = central_face(pipeline.analyse(image), image.shape)
    if face is None:
        return NO_FACE, "", None
    status = OK if face.quality.accepted else LOW_QUALITY
    return status, ";".join(face.quality.reasons), face.template


def embed_folder(folder: Path, pipeline: Pipeline, cache_dir: Path | None = None,
                 workers: int = 2, progress: bool = True) -> Embedded:
    """Run every labelled photo through ``pipeline``; reuse a cached run of the same
    labels and settings from ``cache_dir``."""
    folder = Path(folder)
    rows = read_labels(folder)
    labels_sha = hashlib.sha256((folder / "labels.csv").read_bytes()).hexdigest()
    settings = pipeline.settings_hash()
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"embedded-{labels_sha[:12]}-{settings[:12]}.npz"
        if cache.exists():
            log.info("reusing %s", cache)
            return Embedded.load(cache)
    n = len(rows)
    status = np.empty(n, dtype=object)
    reasons = np.empty(n, dtype=object)
    templates = np.full((n, EMBEDDING_DIM), np.nan, dtype=np.float32)
    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda r: _analyse_one(pipeline, folder / r[0]), rows)
        for i, (st, why, template) in enumerate(results):
            status[i], reasons[i] = st, why
            if template is not None:
                templates[i] = template
            if progress and (i + 1) % 500 == 0:
                rate = (i + 1) / (time.monotonic() - started)
                log.info("embedded %d/%d photos (%.1f/s)", i + 1, n, rate)
    embedded = Embedded(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                        status.astype(str), reasons.astype(str), templates, settings,
                        labels_sha)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        embedded.save(cache)
    return embedded

