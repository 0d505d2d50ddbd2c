"""Genuine and impostor scores of labelled templates, for each comparison kind the
service makes: one capture against one booking photo, and against a fused booking."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..gallery.scoremodel import FUSED, SINGLE
from ..templates import EMBEDDING_DIM, fuse_templates

if TYPE_CHECKING:
    from .embedding import Embedded

# Each person contributes at most this many photos to pair statistics, so one person with
# hundreds of photos cannot outweigh a thousand people with two.
MAX_PHOTOS_PER_PERSON = 10
# Impostor pairs scoring above this are kept one by one (for the tail fit and its
# bootstrap); the bulk below is only counted.
TAIL_KEEP_SCORE = 0.15
BLOCK = 2048


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


