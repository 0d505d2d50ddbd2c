"""Labelled photos -> templates -> genuine/impostor scores -> a score model file.

``matcher calibrate`` runs the pipeline exactly as served over a folder with a
``labels.csv`` (file, identity), scores every genuine and impostor pair with blocked
matrix products and fits the score model that decision.py turns into thresholds
(matcher/gallery/scoremodel.py says how). An optional ``group`` column (nationality, say)
adds within-group models, per-group rates and thresholds that hold in the worst group
(docs/demographics.md).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .durable import atomic_write, atomic_write_text
from .errors import InvalidInput, MatcherError
from .face.pipeline import Face, Pipeline
from .gallery.scoremodel import FUSED, SINGLE, ScoreModel, gpd_fit
from .templates import EMBEDDING_DIM, fuse_templates

log = logging.getLogger(__name__)

# Each person contributes at most this many photos to pair statistics, so one person with
# hundreds of photos cannot outweigh a thousand people with two (LFW has one with 530).
MAX_PHOTOS_PER_PERSON = 10
# Impostor pairs scoring above this are kept one by one (for the tail fit and its
# bootstrap); the bulk below is only counted.
TAIL_KEEP_SCORE = 0.15
BLOCK = 2048

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


GROUP_COLUMN = "group"


def read_groups(folder: Path) -> dict[str, str]:
    """identity -> group from labels.csv's optional ``group`` column; {} without one.

    One group per person (a person's rows must agree); an empty cell is no group: that
    person counts in the population figures and in no group's."""
    path = Path(folder) / "labels.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if GROUP_COLUMN not in (reader.fieldnames or []):
            return {}
        groups: dict[str, str] = {}
        for r in reader:
            who, group = r["identity"], (r[GROUP_COLUMN] or "").strip()
            if groups.setdefault(who, group) != group:
                raise InvalidInput(f"{path}: {who!r} is in group {groups[who]!r} and "
                                   f"{group!r}; give each person one group")
    return {who: g for who, g in groups.items() if g}


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


# -- pairs ---------------------------------------------------------------------------

@dataclass
class PairScores:
    """Genuine and impostor scores of one labelled set, by identity.

    Genuine pairs are listed one by one; impostor pairs only above ``TAIL_KEEP_SCORE``
    (with both identities, for the bootstrap), plus a histogram of all of them.
    """

    identity_names: np.ndarray     # (m,) str
    photos_per_identity: np.ndarray  # (m,) int: photos used (after the cap)
    genuine: np.ndarray            # (g,) float32
    genuine_identity: np.ndarray   # (g,) int32
    tail: np.ndarray               # (t,) float32 impostor scores > TAIL_KEEP_SCORE
    tail_a: np.ndarray             # (t,) int32 identity of one side
    tail_b: np.ndarray             # (t,) int32 identity of the other
    histogram: np.ndarray          # (bins,) int64 counts of all impostor scores
    bin_edges: np.ndarray          # (bins + 1,)
    # Fused pairs only: 1 where the identity has a fused booking template (``tail_a``'s
    # side); None for photo-against-photo pairs.
    fused_per_identity: np.ndarray | None = None

    @property
    def impostor_pairs(self) -> int:
        return int(self.histogram.sum())

    @property
    def identity_pairs(self) -> int:
        m = int((self.photos_per_identity > 0).sum())
        if self.fused_per_identity is None:
            return m * (m - 1) // 2
        g = self.fused_per_identity > 0
        return int(g.sum()) * m - int((g & (self.photos_per_identity > 0)).sum())

    def impostor_total(self, weights: np.ndarray) -> float:
        """Impostor pairs when identity i appears weights[i] times (copies never pair up)."""
        per = weights * self.photos_per_identity
        if self.fused_per_identity is None:
            return float((per.sum() ** 2 - (per ** 2).sum()) / 2.0)
        fused = weights * self.fused_per_identity
        return float(fused.sum() * per.sum() - (fused * per).sum())


def capped_rows(identities: np.ndarray, usable: np.ndarray,
                cap: int = MAX_PHOTOS_PER_PERSON) -> np.ndarray:
    """Indices of usable rows, at most ``cap`` per identity (first in label order)."""
    taken: dict[str, int] = {}
    keep = []
    for i in np.flatnonzero(usable):
        who = identities[i]
        if taken.get(who, 0) < cap:
            taken[who] = taken.get(who, 0) + 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def _concat(parts: list[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
    """The parts end to end as ``dtype``; empty (not an error) when there are none."""
    return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)


def score_pairs(templates: np.ndarray, identities: np.ndarray,
                tail_keep: float = TAIL_KEEP_SCORE, block: int = BLOCK) -> PairScores:
    """Every pair of rows scored once, in blocks of ``block`` rows (no Python pair loop).

    templates (n, 512) float32 L2-normalised; identities (n,) str.
    """
    xb = np.ascontiguousarray(templates, dtype=np.float32)
    names, ident = np.unique(identities, return_inverse=True)
    ident = ident.astype(np.int32)
    n = len(xb)
    edges = np.linspace(-1.0, 1.0, 4001)
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    gen, gen_id, tail, ta, tb = [], [], [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = xb[start:stop] @ xb[start:].T            # rows start.. vs columns start..
        rows_id = ident[start:stop, None]
        cols_id = ident[None, start:]
        upper = np.triu(np.ones(sims.shape, dtype=bool), k=1)  # j > i within this band
        same = (rows_id == cols_id) & upper
        diff = (rows_id != cols_id) & upper
        gen.append(sims[same])
        gen_id.append(np.broadcast_to(rows_id, sims.shape)[same])
        imp = sims[diff]
        hist += np.histogram(imp, bins=edges)[0]
        hot = diff & (sims > tail_keep)
        tail.append(sims[hot])
        ta.append(np.broadcast_to(rows_id, sims.shape)[hot])
        tb.append(np.broadcast_to(cols_id, sims.shape)[hot])
    counts = np.bincount(ident, minlength=len(names))
    return PairScores(names, counts, _concat(gen, np.float32), _concat(gen_id, np.int32),
                      _concat(tail, np.float32), _concat(ta, np.int32), _concat(tb, np.int32),
                      hist, edges)


# A traveller booked with several photos is searched as one fused template; calibration
# fuses each person's first two photos the same way (templates.fuse_templates).
FUSED_BOOKING_PHOTOS = 2


def fused_pairs(templates: np.ndarray, identities: np.ndarray,
                photos: int = FUSED_BOOKING_PHOTOS, tail_keep: float = TAIL_KEEP_SCORE
                ) -> PairScores:
    """Fused booking templates against single photos: the comparisons the service makes
    for a traveller booked with ``photos`` photos.

    Each identity with at least ``photos`` rows gets the fused template of its first
    ``photos`` rows (row order); it is scored against every row of every other identity
    (impostor) and against its own remaining rows (genuine). templates (n, 512) float32.
    """
    names, ident = np.unique(identities, return_inverse=True)
    ident = ident.astype(np.int32)
    xb = np.ascontiguousarray(templates, dtype=np.float32)
    rank = np.zeros(len(ident), np.int64)
    seen: dict[int, int] = {}
    for i, who in enumerate(ident.tolist()):
        rank[i] = seen.get(who, 0)
        seen[who] = rank[i] + 1
    counts = np.bincount(ident, minlength=len(names))
    owners = np.flatnonzero(counts >= photos)
    fused = np.stack([fuse_templates(xb[(ident == who) & (rank < photos)]) for who in owners]
                     ) if len(owners) else np.empty((0, EMBEDDING_DIM), np.float32)
    edges = np.linspace(-1.0, 1.0, 4001)
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    gen, gen_id, tail, ta, tb = [], [], [], [], []
    for start in range(0, len(owners), BLOCK):
        sims = fused[start:start + BLOCK] @ xb.T                   # (owners, rows)
        own = owners[start:start + BLOCK, None]
        same = own == ident[None, :]
        mine = same & (rank[None, :] >= photos)                    # not a booking photo
        diff = ~same
        gen.append(sims[mine])
        gen_id.append(np.broadcast_to(own, sims.shape)[mine])
        hist += np.histogram(sims[diff], bins=edges)[0]
        hot = diff & (sims > tail_keep)
        tail.append(sims[hot])
        ta.append(np.broadcast_to(own, sims.shape)[hot])
        tb.append(np.broadcast_to(ident[None, :], sims.shape)[hot])
    has_fused = np.zeros(len(names), np.int64)
    has_fused[owners] = 1
    return PairScores(names, counts, _concat(gen, np.float32), _concat(gen_id, np.int32),
                      _concat(tail, np.float32), _concat(ta, np.int32), _concat(tb, np.int32),
                      hist, edges, has_fused)


def pair_scores_for(embedded: Embedded, quality_gate: bool = True,
                    cap: int = MAX_PHOTOS_PER_PERSON) -> PairScores:
    rows = capped_rows(embedded.identities, embedded.usable(quality_gate), cap)
    return score_pairs(embedded.templates[rows], embedded.identities[rows])


def source_summary(folder: Path, embedded: Embedded, pairs: PairScores) -> dict:
    """Where a score model's data came from, for the file's ``source`` section."""
    counts = {s: int((embedded.status == s).sum()) for s in (OK, LOW_QUALITY, NO_FACE,
                                                              UNREADABLE)}
    reasons: dict[str, int] = {}
    for r in embedded.reasons[embedded.status == LOW_QUALITY]:
        for code in r.split(";"):
            reasons[code] = reasons.get(code, 0) + 1
    return {
        "folder": Path(folder).name,
        "labels_sha256": embedded.labels_sha256,
        "photos": int(len(embedded.files)),
        "identities": int(len(np.unique(embedded.identities))),
        "photo_outcomes": counts,
        "quality_refusals_by_reason": dict(sorted(reasons.items())),
        "face_choice": "the detected face nearest the image centre",
        "max_photos_per_person": MAX_PHOTOS_PER_PERSON,
        "identities_used": int((pairs.photos_per_identity > 0).sum()),
        "genuine_pairs": int(len(pairs.genuine)),
        "impostor_pairs": pairs.impostor_pairs,
        "impostor_identity_pairs": pairs.identity_pairs,
    }


def write_json(path: Path, document: dict) -> None:
    atomic_write_text(path, json.dumps(document, indent=1, sort_keys=False) + "\n")


# -- label noise ---------------------------------------------------------------------

def _name_evidence(a: str, b: str) -> float:
    """How alike two names are, 0..1: the same words in another order count as 1."""
    import difflib

    def words(name: str) -> list[str]:
        return name.lower().replace("_", " ").replace("-", " ").split()

    if sorted(words(a)) == sorted(words(b)):
        return 1.0
    return difflib.SequenceMatcher(None, " ".join(words(a)), " ".join(words(b))).ratio()


def _thumbnail(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L").resize((32, 32)), dtype=np.float64)
    except OSError:
        return None
    grey -= grey.mean()
    return grey / max(float(np.linalg.norm(grey)), 1e-9)


def _same_photograph(folder: Path, files_a: list[str], files_b: list[str]) -> bool:
    """Do the two identities share one photograph (correlation of 32x32 thumbnails)?"""
    thumbs_b = [t for t in (_thumbnail(folder / f) for f in files_b) if t is not None]
    for fa in files_a:
        ta = _thumbnail(folder / fa)
        if ta is not None and any(float((ta * tb).sum()) >= SAME_PHOTO_CORRELATION
                                  for tb in thumbs_b):
            return True
    return False


NAME_EVIDENCE = 0.8           # John_Gruden / Jon_Gruden: 0.95; siblings share half a name
SAME_PHOTO_CORRELATION = 0.95  # one photograph filed twice, not two photographs


def label_noise(pairs: PairScores, genuine_floor: float, folder: Path | None = None,
                files_by_identity: dict[str, list[str]] | None = None, top: int = 40) -> dict:
    """Suspect labels, with score and name or image evidence.

    * ``dropped``: identity pairs scoring in the genuine range (best cross score >= the
      genuine 5th percentile) that are one person on other evidence too: near-identical
      names (John_Gruden / Jon_Gruden, Choi_Sung-hong / Sung_Hong_Choi), or one photograph
      filed under both names. Left out of the impostor counts. A high score alone never
      drops a pair, so twins, siblings and look-alikes stay in.
    * ``high_impostors``: the highest-scoring remaining identity pairs (at most ``top``).
    * ``look_alikes``: every remaining identity pair scoring in the genuine range:
      relatives, twins, look-alikes (and wrong labels without other evidence).
    * ``low_genuines``: the lowest genuine pairs (wrong label, wrong face picked, or a
      hard pair), listed and kept in.
    """
    names = pairs.identity_names
    best: dict[tuple[int, int], float] = {}
    for s, a, b in zip(pairs.tail.tolist(), pairs.tail_a.tolist(), pairs.tail_b.tolist(),
                       strict=True):
        key = (a, b) if a < b else (b, a)
        if s > best.get(key, -1.0):
            best[key] = s
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    dropped: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    alike: list[dict[str, Any]] = []
    for (a, b), s in ranked:
        na, nb = str(names[a]), str(names[b])
        row: dict[str, Any] = {"a": na, "b": nb, "best_score": round(s, 4),
               "name_similarity": round(_name_evidence(na, nb), 3)}
        evidence = None
        if s >= genuine_floor:
            if row["name_similarity"] >= NAME_EVIDENCE:
                evidence = "name"
            elif folder is not None and files_by_identity is not None and _same_photograph(
                    folder, files_by_identity[na], files_by_identity[nb]):
                evidence = "same photograph"
        if evidence:
            dropped.append({**row, "evidence": evidence})
            continue
        if s >= genuine_floor:
            alike.append(row)
        if len(kept) < top:
            kept.append(row)
    low = np.argsort(pairs.genuine)[:top]
    low_rows = [{"identity": str(names[pairs.genuine_identity[i]]),
                 "score": round(float(pairs.genuine[i]), 4)} for i in low]
    return {"dropped": dropped, "high_impostors": kept, "look_alikes": alike,
            "low_genuines": low_rows}


def drop_identity_pairs(pairs: PairScores, drop: list[dict]) -> PairScores:
    """Remove impostor pairs between the named identities (label noise, see above)."""
    if not drop:
        return pairs
    index = {str(n): i for i, n in enumerate(pairs.identity_names)}
    bad = {(min(index[d["a"]], index[d["b"]]), max(index[d["a"]], index[d["b"]])) for d in drop}
    lo, hi = np.minimum(pairs.tail_a, pairs.tail_b), np.maximum(pairs.tail_a, pairs.tail_b)
    mask = np.array([(a, b) not in bad for a, b in zip(lo.tolist(), hi.tolist(), strict=True)],
                    dtype=bool)
    hist = pairs.histogram.copy()
    removed = np.histogram(pairs.tail[~mask], bins=pairs.bin_edges)[0]
    hist -= removed
    return PairScores(pairs.identity_names, pairs.photos_per_identity, pairs.genuine,
                      pairs.genuine_identity, pairs.tail[mask], pairs.tail_a[mask],
                      pairs.tail_b[mask], hist, pairs.bin_edges, pairs.fused_per_identity)


# -- fitting -------------------------------------------------------------------------

TAIL_FMR = 1e-4          # the GPD is fitted to the top 1e-4 of impostor pairs ...
MIN_EXCEEDANCES = 200    # ... or to the top 200 pairs where the set is small
BOOTSTRAP = 200
MIN_RESOLVED_PAIRS = 3   # the empirical bound is used down to 3 expected pairs above it
CONFIDENCE = 0.95
# The empirical tail resolves rates down to about one identity pair in all; the fitted
# tail is trusted one decade beyond that and no further.
EXTRAPOLATION_DECADES = 1.0


def _tail_fit(tail_desc: np.ndarray, pair_weight: np.ndarray, total: float,
              tail_fmr: float) -> tuple[float, float, float]:
    """(u, xi, sigma): u is where ``tail_fmr`` of ``total`` pairs lie above."""
    cum = np.cumsum(pair_weight)
    need = tail_fmr * total
    if cum[-1] <= need:
        raise InvalidInput("too few high impostor scores kept for the tail fit")
    k = int(np.searchsorted(cum, need))
    u = float(tail_desc[k])
    above = tail_desc[:k]
    xi, sigma = gpd_fit(above - u, pair_weight[:k])
    return u, xi, sigma


def fit_score_model(pairs: PairScores, model_id: str, settings_hash: str, *,
                    bootstrap: int = BOOTSTRAP, confidence: float = CONFIDENCE,
                    seed: int = 0, document: dict | None = None):
    """Fit a ScoreModel (see matcher/gallery/scoremodel.py) to scored pairs."""
    m = len(pairs.photos_per_identity)
    total = pairs.impostor_total(np.ones(m))
    if total < MIN_EXCEEDANCES * 10 or len(pairs.genuine) < 10:
        raise InvalidInput(f"too little data to calibrate: {total:.0f} impostor pairs, "
                           f"{len(pairs.genuine)} genuine pairs")
    tail_fmr = max(TAIL_FMR, MIN_EXCEEDANCES / total)
    order = np.argsort(-pairs.tail)
    tail_desc = pairs.tail[order].astype(np.float64)
    ta, tb = pairs.tail_a[order], pairs.tail_b[order]
    point = _tail_fit(tail_desc, np.ones(len(tail_desc)), total, tail_fmr)

    rng = np.random.default_rng(seed)
    g_order = np.argsort(pairs.genuine)
    g_sorted = pairs.genuine[g_order].astype(np.float64)
    g_id = pairs.genuine_identity[g_order]
    grid = np.round(np.arange(-0.2, 1.0001, 0.005), 3)
    cut = np.searchsorted(g_sorted, grid, side="left")   # genuine pairs below each score

    def fnmr_curve(weights: np.ndarray) -> np.ndarray:
        w = weights[g_id]
        cum = np.concatenate([[0.0], np.cumsum(w)])
        return cum[cut] / max(cum[-1], 1e-12)

    # Rates the data resolves on its own: down to a few expected pairs above the threshold.
    resolved = np.geomspace(tail_fmr, MIN_RESOLVED_PAIRS / total, 40)
    replicates: list[tuple[float, float, float]] = []
    curve_rows: list[np.ndarray] = []
    threshold_rows: list[np.ndarray] = []
    for _ in range(bootstrap):
        w = rng.multinomial(m, np.full(m, 1.0 / m)).astype(np.float64)
        pair_weight = w[ta] * w[tb]
        total_b = pairs.impostor_total(w)
        try:
            replicates.append(_tail_fit(tail_desc, pair_weight, total_b, tail_fmr))
        except InvalidInput:
            continue  # a resample with too few high pairs: skip rather than bias
        curve_rows.append(fnmr_curve(w))
        cum = np.cumsum(pair_weight)
        at = np.minimum(np.searchsorted(cum, resolved * total_b), len(tail_desc) - 1)
        threshold_rows.append(tail_desc[at])
    curves = np.asarray(curve_rows)
    # A few look-alike people with many photos each make clusters of high pairs that a
    # smooth tail can miss; where the data resolves a rate, its own bound counts too
    # (every resample is kept, so a threshold can take any confidence level).
    empirical_thresholds = np.asarray(threshold_rows)
    lo, hi = np.quantile(curves, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    genuine = np.column_stack([grid, fnmr_curve(np.ones(m)), lo, hi])

    # Empirical exceedance curve: the histogram for the bulk, exact pairs in the tail.
    edges, hist = pairs.bin_edges, pairs.histogram
    above = hist[::-1].cumsum()[::-1]        # pairs in bins >= i
    bulk = [(float(edges[i]), float(above[i] / total))
            for i in range(0, len(hist), 10)
            if above[i] > 0 and edges[i] < TAIL_KEEP_SCORE]
    ranks = np.unique(np.geomspace(1, len(tail_desc), 300).astype(int)) - 1
    exact = [(float(tail_desc[r]), float((r + 1) / total)) for r in ranks[::-1]]
    empirical = np.asarray(bulk + exact)

    floor = 1.0 / (pairs.identity_pairs * 10 ** EXTRAPOLATION_DECADES)
    doc = dict(document or {})
    doc.setdefault("method", {}).update({
        "pairs": f"every pair of usable photos, at most {MAX_PHOTOS_PER_PERSON} per person",
        "tail": f"GPD (Zhang-Stephens) fitted to the top {tail_fmr:.3g} of impostor pairs",
        "bootstrap": f"{len(replicates)} resamples of identities (seed {seed})",
        "threshold": f"the {confidence:.0%} upper bound over the resamples, of the "
                     "fitted tail and, where the data resolves the rate (>= "
                     f"{MIN_RESOLVED_PAIRS} pairs), of the empirical tail: the larger",
        "fmr_floor": f"1 / (impostor identity pairs x 10^{EXTRAPOLATION_DECADES:g})",
        "one_to_many": "per-comparison FMR = FPIR / N (union bound; holds for dependent "
                       "comparisons)",
    })
    doc["impostor_summary"] = {
        "pairs": int(total), "identity_pairs": pairs.identity_pairs,
        "mean": float(((edges[:-1] + edges[1:]) / 2 * hist).sum() / total),
        "max": float(tail_desc[0]) if len(tail_desc) else None}
    doc["genuine_summary"] = {
        "pairs": int(len(g_sorted)),
        "identities": int(len(np.unique(pairs.genuine_identity))),
        "quantiles": {str(q): round(float(np.quantile(g_sorted, q)), 4)
                      for q in (0.001, 0.01, 0.05, 0.5)}}
    return ScoreModel(model_id, settings_hash, confidence, tail_fmr, point,
                      np.asarray(replicates), floor, empirical, genuine, doc, resolved,
                      empirical_thresholds)


def raw_kind_pairs(templates: np.ndarray, identities: np.ndarray) -> dict[str, PairScores]:
    """The pairs of each comparison kind the service makes ("single": one capture against
    one booking photo; "fused": against a traveller's fused booking photos)."""
    return {SINGLE: score_pairs(templates, identities),
            FUSED: fused_pairs(templates, identities)}


def kind_pairs(templates: np.ndarray, identities: np.ndarray, drop: Sequence[dict] = (),
               raw: dict[str, PairScores] | None = None) -> dict[str, PairScores]:
    """raw_kind_pairs (or ``raw``, already scored) with the identity pairs in ``drop`` left
    out (those naming someone absent are ignored)."""
    present = set(np.unique(identities).tolist())
    drop = [d for d in drop if d["a"] in present and d["b"] in present]
    raw = raw if raw is not None else raw_kind_pairs(templates, identities)
    return {kind: drop_identity_pairs(pairs, drop) for kind, pairs in raw.items()}


def fit_with_kinds(templates: np.ndarray, identities: np.ndarray, model_id: str,
                   settings_hash: str, *, drop: Sequence[dict] = (), bootstrap: int = BOOTSTRAP,
                   confidence: float = CONFIDENCE, seed: int = 0, document: dict | None = None,
                   fused_optional: bool = False, raw: dict[str, PairScores] | None = None):
    """The score model of every comparison the service makes: one capture against one
    booking photo, and (kind ``fused``) against a traveller's fused booking photos.
    templates (n, 512) of the capped usable rows; ``drop``: label noise (label_noise).
    ``fused_optional``: data too thin for a fused tail gives a model without that kind
    (said in its method) instead of an error (a small demographic group). ``raw``: the
    rows' raw_kind_pairs, when the caller has scored them already."""
    pairs = kind_pairs(templates, identities, list(drop), raw)
    model = fit_score_model(pairs[SINGLE], model_id, settings_hash, bootstrap=bootstrap,
                            confidence=confidence, seed=seed, document=document)
    try:
        fused_model = fit_score_model(
            pairs[FUSED], model_id, settings_hash, bootstrap=bootstrap, confidence=confidence,
            seed=seed, document={"method": {
                "pairs": f"the fused template of each person's first {FUSED_BOOKING_PHOTOS} "
                         "photos against every other photo"}})
    except InvalidInput as exc:
        if not fused_optional:
            raise
        model.document.setdefault("method", {})["kinds"] = f"no fused comparisons: {exc}"
        return model
    model.document.setdefault("method", {})["kinds"] = (
        "every threshold and rate is the worst of the single-photo model and the models in "
        "'kinds' (fused: a traveller's fused booking photos against one capture)")
    return replace(model, kinds={"fused": fused_model})


def fit_population(templates: np.ndarray, identities: np.ndarray, model_id: str,
                   settings_hash: str, *, dropped: list[dict], apart: list[dict],
                   raw: dict[str, PairScores] | None = None, bootstrap: int = BOOTSTRAP,
                   seed: int = 0, document: dict | None = None):
    """The population's model as ``matcher calibrate`` makes it: label noise ``dropped``;
    1:1 with the look-alikes in, and (``search``) 1:N with the ``apart`` pairs left out."""
    raw = raw if raw is not None else raw_kind_pairs(templates, identities)
    model = fit_with_kinds(templates, identities, model_id, settings_hash, drop=dropped,
                           bootstrap=bootstrap, seed=seed, document=document, raw=raw)
    if not apart:
        return model
    search = fit_with_kinds(templates, identities, model_id, settings_hash,
                            drop=dropped + apart, bootstrap=bootstrap, seed=seed, raw=raw,
                            document={"method": {
                                "look_alikes": f"{len(apart)} look-alike identity pairs "
                                               "(source.look_alikes_apart) left out"}})
    return replace(model, search=search)


# -- demographic groups ----------------------------------------------------------------

# A group is reported, and may set thresholds, when its own tail can be fitted (what
# fit_score_model needs: 2,000 impostor pairs, 200 of them above TAIL_KEEP_SCORE, and 10
# genuine pairs; at LFW's one or two photos a person that takes about 100 people) and it
# has at least this many people. Random groups of k people drawn from lfw-dev
# (benchmarks/_demographics.py, demo_group_size_coverage_*): wherever a group's data
# resolves the rate (5 expected false matches), the 95 % identity-bootstrap interval of its
# FMR covered the population's rate in 92-96 % of groups of 20, 30 and 50 people and in 86 %
# of groups of 10 (200 groups each): from about 20 people the interval needs no more people
# than the pairs bring. The floor is set above that because a group's threshold rests on its
# tail, whose units are pairs of people: a few people with many photos (10 people with 10
# photos make 4,500 impostor pairs but 45 pairs of people) leave one family or one
# mislabelled photo as the tail; 30 people make 435 pairs of people (fmr_floor 2.3e-4).
MIN_GROUP_PEOPLE = 30
# The worst-group rule takes each group's threshold at this confidence (the median over its
# identity resamples) and states the 95 % bound beside it. On lfw-dev the East-Asian-name
# group (119 people, benchmarks/_demographics.py) has at FMR 1e-5 a median of 0.382, a tail
# fit estimate of 0.535 and a 95 % bound of 0.898: resamples that repeat one look-alike
# pair (0.871) set the bound, and a 1:1 threshold there refuses nearly everyone. With
# several groups the maximum over them is biased upward already (the largest of several
# noisy estimates).
GROUP_CONFIDENCE = 0.5
GROUP_GALLERY_SIZES = (100, 1_000, 10_000)   # the 1:N points a group report shows


def group_of_rows(identities: np.ndarray, groups: dict[str, str]) -> np.ndarray:
    """(n,) str: each row's group ("" for none)."""
    return np.array([groups.get(str(who), "") for who in identities], dtype=object).astype(str)


def fit_groups(templates: np.ndarray, identities: np.ndarray, groups: dict[str, str],
               model_id: str, settings_hash: str, *, drop: Sequence[dict] = (),
               bootstrap: int = BOOTSTRAP, confidence: float = CONFIDENCE, seed: int = 0,
               min_people: int = MIN_GROUP_PEOPLE) -> tuple[dict, dict[str, str]]:
    """({group: within-group ScoreModel}, {group: why it has none}).

    Each model is fitted exactly as the population's (fit_with_kinds) to the pairs of two
    people of one group: its tail, bootstrap and floor say what that group's data shows,
    and how far any rate beyond it is extrapolated. templates (n, 512) of the capped
    usable rows; ``drop``: identity pairs to leave out (label noise, look-alikes)."""
    of_row = group_of_rows(identities, groups)
    fitted, skipped = {}, {}
    for name in sorted(set(groups.values())):
        mask = of_row == name
        people = len(np.unique(identities[mask]))
        if people < min_people:
            skipped[name] = f"{people} people with a usable photo, fewer than {min_people}"
            continue
        try:
            fitted[name] = fit_with_kinds(
                templates[mask], identities[mask], model_id, settings_hash, drop=drop,
                bootstrap=bootstrap, confidence=confidence, seed=seed, fused_optional=True,
                document={"group": {"name": name, "people": people,
                                    "photos": int(mask.sum())}})
        except InvalidInput as exc:
            skipped[name] = str(exc)
    return fitted, skipped


def attach_groups(model, templates: np.ndarray, identities: np.ndarray,
                  groups: dict[str, str], *, drop: Sequence[dict] = (), apart: Sequence[dict] = (),
                  worst_group: bool = True, group_confidence: float | None = GROUP_CONFIDENCE,
                  bootstrap: int = BOOTSTRAP, seed: int = 0, min_people: int = MIN_GROUP_PEOPLE):
    """``model`` with within-group models (its search variant too, look-alikes ``apart``
    there as in the population's), the worst-group rule on or off and each group's bound
    at ``group_confidence`` (None: the threshold's own): (model, skipped)."""
    fitted, skipped = fit_groups(templates, identities, groups, model.model_id,
                                 model.settings_hash, drop=drop, bootstrap=bootstrap,
                                 confidence=model.confidence, seed=seed, min_people=min_people)
    search = model.search
    if search is not None:
        apart_fitted, _ = fit_groups(templates, identities, groups, model.model_id,
                                     model.settings_hash, drop=list(drop) + list(apart),
                                     bootstrap=bootstrap, confidence=model.confidence,
                                     seed=seed, min_people=min_people)
        search = replace(search, groups=apart_fitted)
    model = replace(model, groups=fitted, search=search).with_worst_group(
        worst_group).with_group_confidence(group_confidence)
    level = ("the threshold's own confidence" if group_confidence is None else
             f"confidence {group_confidence:g} (at most the threshold's own)")
    model.document.setdefault("method", {})["groups"] = (
        f"within-group models for groups of >= {min_people} people; worst-group rule "
        + (f"on: every threshold also holds in each group, at {level}" if model.worst_group
           else "off"))
    return model, skipped


def _identity_bootstrap(m: int, bootstrap: int, seed: int) -> np.ndarray:
    """(bootstrap + 1, m) float64: row 0 all ones, then multinomial resamples."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(m, np.full(m, 1.0 / m), size=bootstrap).astype(np.float64)
    return np.vstack([np.ones((1, m)), draws])


def _impostor_totals(pairs: PairScores, W: np.ndarray) -> np.ndarray:
    """(R,) PairScores.impostor_total for each row of identity weights W (R, m)."""
    per = W * pairs.photos_per_identity
    if pairs.fused_per_identity is None:
        return (per.sum(1) ** 2 - (per ** 2).sum(1)) / 2.0
    fused = W * pairs.fused_per_identity
    return fused.sum(1) * per.sum(1) - (fused * per).sum(1)


def measured_rates(pairs: PairScores, threshold: float, W: np.ndarray) -> dict:
    """FMR and FNMR of ``pairs`` at ``threshold``: the point (row 0 of the identity
    weights W) with its 95 % interval over the other rows."""
    if threshold <= TAIL_KEEP_SCORE:
        raise InvalidInput(f"rates are measured above {TAIL_KEEP_SCORE}, got {threshold}")
    above = pairs.tail >= threshold
    fmr = (W[:, pairs.tail_a[above]] * W[:, pairs.tail_b[above]]).sum(1) / np.maximum(
        _impostor_totals(pairs, W), 1e-12)
    wg = W[:, pairs.genuine_identity]
    fnmr = (wg * (pairs.genuine < threshold)).sum(1) / np.maximum(wg.sum(1), 1e-12)

    def ci(v: np.ndarray) -> list[float]:
        return [float(q) for q in np.quantile(v[1:], [0.025, 0.975])]

    return {"impostor_pairs": pairs.impostor_pairs, "false_matches": int(above.sum()),
            "fmr": float(fmr[0]), "fmr_ci95": ci(fmr),
            "genuine_pairs": int(len(pairs.genuine)), "fnmr": float(fnmr[0]),
            "fnmr_ci95": ci(fnmr) if len(pairs.genuine) else [float("nan")] * 2}


def group_report(model, templates: np.ndarray, identities: np.ndarray,
                 groups: dict[str, str], policy=None, *, drop: Sequence[dict] = (),
                 apart: Sequence[dict] = (), skipped: dict[str, str] | None = None,
                 sizes: tuple[int, ...] = GROUP_GALLERY_SIZES, bootstrap: int = BOOTSTRAP,
                 seed: int = 0, min_people: int = MIN_GROUP_PEOPLE) -> dict:
    """Per group, at the thresholds ``model`` sets (and at the population's, without the
    worst-group rule): within-group FMR and FNMR with identity-bootstrap 95 % intervals,
    whether the group's data resolves the target, its fitted tail's estimate and bound,
    the FNMR price, and the across-group differential (NIST IR 8280: one threshold for
    everyone, rates per group). 1:1 at the policy FMR for each booking kind; 1:N at each
    of ``sizes`` (per-comparison FMR = FPIR / N, pairs with the look-alikes ``apart``).

    ``model`` holds the groups (attach_groups); "all" is the whole population."""
    from .gallery.decision import DecisionPolicy, operating_point_1to1, operating_point_1toN

    policy = policy or DecisionPolicy()
    population = model.with_worst_group(False)
    of_row = group_of_rows(identities, groups)
    members = {"all": np.ones(len(identities), bool),
               **{g: of_row == g for g in model.groups}}
    data = {}  # (member set, look-alikes apart) -> (pairs by kind, identity weights)
    for name, mask in members.items():
        for lean in (False, True):
            pairs = kind_pairs(templates[mask], identities[mask],
                               list(drop) + (list(apart) if lean else []))
            W = _identity_bootstrap(len(pairs[SINGLE].identity_names), bootstrap, seed)
            data[name, lean] = (pairs, W)

    # (mode, target, per-comparison FMR, gallery size (None for 1:1), kind)
    points: list[tuple[str, str, float, int | None, str]] = [
        ("1:1", f"FMR {policy.fmr_1to1:g}", policy.fmr_1to1, None, kind)
        for kind in (SINGLE, FUSED)]
    points += [("1:N", f"FPIR {policy.fpir_1toN:g} at N={n:,}", policy.fpir_1toN / n, n, kind)
               for n in sizes for kind in (SINGLE, FUSED)]

    def threshold(m: ScoreModel, fmr: float, n: int | None, kind: str) -> float:
        if n is None:
            return operating_point_1to1(m, fmr, policy.min_threshold,
                                        policy.confidence_1to1, kind).threshold
        return operating_point_1toN(m, policy.fpir_1toN, n, policy.min_threshold,
                                    policy.confidence_1toN).threshold

    rows = []
    for mode, target, fmr, n, kind in points:
        lean = mode == "1:N"
        confidence = policy.confidence_1to1 if mode == "1:1" else policy.confidence_1toN
        at = {"population": threshold(population, fmr, n, kind)}
        if model.worst_group:
            at["worst_group"] = threshold(model, fmr, n, kind)
        rates: dict[str, dict] = {}
        for name in members:
            pairs, W = data[name, lean]
            source = model.for_search if lean else model
            fitted = source if name == "all" else source.groups.get(name)
            entry = {}
            for label, t in at.items():
                r = measured_rates(pairs[kind], t, W)
                r["resolved"] = bool(r["impostor_pairs"] * fmr >= MIN_RESOLVED_PAIRS)
                if fitted is not None and (kind == SINGLE or kind in fitted.kinds):
                    tail = fitted.tail_at(t, kind, confidence)
                    r["fmr_model"] = tail["fmr_estimate"]
                    r["fmr_model_upper"] = tail["fmr_upper"]
                    r["beyond_floor"] = bool(fmr < tail["fmr_floor"])
                entry[label] = r
            if "worst_group" in entry:
                entry["fnmr_price"] = entry["worst_group"]["fnmr"] - entry["population"]["fnmr"]
            rates[name] = entry
        overall = rates["all"]["population"]["fmr"]
        for name in model.groups:
            p = rates[name]["population"]
            p["fmr_ratio_to_all"] = p["fmr"] / overall if overall > 0 else None
        rows.append({"mode": mode, "target": target, "comparison_fmr": fmr, "kind": kind,
                     "gallery_size": n, "confidence": confidence, "threshold": at,
                     "rates": rates, "differential": _differential(rates, model.groups)})
    people = {g: int(len(np.unique(identities[of_row == g])))
              for g in sorted(set(groups.values()))}
    return {
        "column": GROUP_COLUMN, "min_people": min_people,
        "people": people, "reported": sorted(model.groups), "not_reported": skipped or {},
        "worst_group": model.worst_group, "group_confidence": model.group_confidence,
        "pairs": "within each group only (both people of the group); label noise left out; "
                 "1:N rows also without the look-alike pairs stated apart",
        "resolved": f"the group holds >= {MIN_RESOLVED_PAIRS} expected impostor pairs at the "
                    "target rate; otherwise the measured rate is a count near zero and the "
                    "group's fitted tail (fmr_model, fmr_model_upper) is the figure",
        "points": rows,
    }


def _differential(rates: dict, groups) -> dict:
    """NIST IR 8280's view at the population threshold: the highest group FMR over the
    lowest, measured (where every group has a false match) and by each group's tail fit."""
    names = list(groups)
    if len(names) < 2:
        return {}
    measured = {g: rates[g]["population"]["fmr"] for g in names}
    model = {g: rates[g]["population"].get("fmr_model") for g in names}
    out: dict[str, Any] = {"highest_fmr": max(measured, key=lambda g: measured[g])}
    lo = min(measured.values())
    out["max_over_min_measured"] = max(measured.values()) / lo if lo > 0 else None
    if all(v is not None and v > 0 for v in model.values()):
        out["max_over_min_model"] = max(model.values()) / min(model.values())
    return out


# Identity pairs scoring in the genuine range that nothing shows to be one person
# (relatives, twins, look-alikes) are left out of the tail 1:N thresholds come from, and
# listed: with them in, 1:N thresholds rise above most genuine travellers and still do not
# separate them. The cross-validation of `matcher bench --only accuracy` chose this
# (docs/operating-points.md). 1:1 keeps them: a relative with the traveller's passport is
# the impostor a 1:1 check exists for.
LOOK_ALIKES_APART = True


def calibrate(folder: Path, pipeline: Pipeline, *, cache_dir: Path | None = None,
              bootstrap: int = BOOTSTRAP, seed: int = 0, workers: int = 2,
              look_alikes_apart: bool = LOOK_ALIKES_APART, worst_group: bool | None = None,
              group_confidence: float | None = GROUP_CONFIDENCE,
              min_group_people: int = MIN_GROUP_PEOPLE):
    """The whole ``matcher calibrate`` run: (ScoreModel, report dict).

    With a ``group`` column in labels.csv the model also holds within-group models and the
    report their rates (group_report); ``worst_group`` (default: on where groups are given)
    makes every threshold hold in the worst group too."""
    import datetime

    folder = Path(folder)
    groups = read_groups(folder)
    if worst_group and not groups:
        raise InvalidInput(f"the worst-group rule needs a '{GROUP_COLUMN}' column in "
                           f"{folder / 'labels.csv'}")
    embedded = embed_folder(folder, pipeline, cache_dir, workers)
    rows = capped_rows(embedded.identities, embedded.usable())
    pairs = score_pairs(embedded.templates[rows], embedded.identities[rows])
    by_identity: dict[str, list[str]] = {}
    for i in rows:
        by_identity.setdefault(str(embedded.identities[i]), []).append(str(embedded.files[i]))
    genuine_floor = float(np.quantile(pairs.genuine, 0.05)) if len(pairs.genuine) else 1.0
    noise = label_noise(pairs, genuine_floor, folder, by_identity)
    source = source_summary(folder, embedded, drop_identity_pairs(pairs, noise["dropped"]))
    source["label_noise_dropped"] = noise["dropped"]
    apart = noise["look_alikes"] if look_alikes_apart else []
    source["look_alikes_apart"] = apart
    document = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": pipeline.score_settings(),
        "source": source,
    }
    templates, identities = embedded.templates[rows], embedded.identities[rows]
    model = fit_population(templates, identities, pipeline.model_id, pipeline.settings_hash(),
                           dropped=noise["dropped"], apart=apart, bootstrap=bootstrap,
                           seed=seed, document=document,
                           raw={SINGLE: pairs, FUSED: fused_pairs(templates, identities)})
    report: dict[str, Any] = {"source": source, "label_noise": noise,
                              "genuine_floor_for_noise": round(genuine_floor, 4)}
    if groups:
        model, skipped = attach_groups(
            model, templates, identities, groups, drop=noise["dropped"], apart=apart,
            worst_group=worst_group is not False, group_confidence=group_confidence,
            bootstrap=bootstrap, seed=seed, min_people=min_group_people)
        report["groups"] = group_report(
            model, templates, identities, groups, drop=noise["dropped"], apart=apart,
            skipped=skipped, bootstrap=bootstrap, seed=seed, min_people=min_group_people)
        source["groups"] = {k: report["groups"][k] for k in
                            ("column", "min_people", "people", "reported", "not_reported",
                             "worst_group", "group_confidence")}
    return model, report
