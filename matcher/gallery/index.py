"""FAISS search over templates, grouped by traveller, with on-time removals and windows.

A ``SearchIndex`` is an immutable FAISS index built from the store at one gallery_version,
plus an append-only exact "delta" of templates enrolled since, plus a traveller table
(id, booking window, active flag) that every candidate is filtered through at search time.
Writers (one at a time) publish a new ``_View`` reference after each change; searches take
that reference once, so they never lock and never see a half-applied change.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import GalleryError, InvalidInput
from ..templates import EMBEDDING_DIM, Candidate

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "binary", "hnsw", "ivf")
D = EMBEDDING_DIM
# An approximate index cannot be asked for its whole content; past this many candidates per
# probe the filter gives up and the gallery should be rebuilt (too many dead entries).
MAX_APPROX_FETCH = 4096


@dataclass(frozen=True)
class IndexConfig:
    """How templates are indexed; the figures behind the defaults are in docs/gallery.md#index.

    Kinds: ``flat`` exact inner product; ``binary`` 512-bit sign-of-random-projection codes
    scanned by Hamming distance, top ``rescore`` candidates re-scored exactly; ``hnsw`` and
    ``ivf`` (optionally 8-bit), re-scored the same way. ``auto`` picks flat up to
    ``flat_max_templates`` and binary above: impostor templates are near-orthogonal, which
    gives graph/cluster search no gradient toward the match.
    """

    index_kind: str = "auto"
    # recall@1 vs exact that auto must meet (binary codes qualify below 1, see
    # docs/gallery.md#figures); 1.0 means exact only.
    target_recall: float = 0.999
    flat_max_templates: int = 10_000
    binary_bits: int = 512
    binary_seed: int = 20261125
    search_threads: int = 2     # binary: database shards scanned in parallel per query
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0          # 0: about 4 * sqrt(n)
    ivf_nprobe: int = 32
    sq8: bool = False           # 8-bit codes in hnsw/ivf; float32 kept for re-scoring
    rescore: int = 64           # candidates per probe taken from an approximate index
    overfetch: int = 4          # templates fetched per wanted traveller before filtering
    delta_max_templates: int = 20_000  # enrolments since the last build before a rebuild is due

    def __post_init__(self) -> None:
        if self.index_kind not in INDEX_KINDS:
            raise InvalidInput(f"index_kind must be one of {INDEX_KINDS}, got {self.index_kind!r}")
        for name in ("flat_max_templates", "binary_bits", "search_threads", "hnsw_m",
                     "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe", "rescore",
                     "overfetch", "delta_max_templates"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"index setting {name} must be >= 1")
        if self.binary_bits % 64:
            raise InvalidInput("binary_bits must be a multiple of 64")
        if not 0.0 < self.target_recall <= 1.0:
            raise InvalidInput("target_recall must be in (0, 1]")

    def kind_for(self, n_templates: int) -> str:
        if self.index_kind != "auto":
            return self.index_kind
        if self.target_recall >= 1.0 or n_templates <= self.flat_max_templates:
            return "flat"
        return "binary"


def _flat_view(flat: faiss.IndexFlat) -> np.ndarray:
    """(ntotal, d) float32 view of an IndexFlat's own storage (no second copy)."""
    if flat.ntotal == 0:
        return np.empty((0, D), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * D).reshape(flat.ntotal, D)


def _ivf_nlist(n: int, config: IndexConfig) -> int:
    nlist = config.ivf_nlist or int(4 * math.sqrt(n))
    # k-means needs some points per centroid to be meaningful.
    return max(1, min(nlist, n // 39))


class BinaryCodes:
    """Sign-of-random-projection codes (SimHash) in FAISS binary indexes.

    For unit vectors at angle theta, each bit differs with probability theta / pi, so the
    Hamming distance ranks candidates by angle; the exact float32 re-score fixes the order.
    The database is split into ``shards`` scanned by parallel threads, so one probe uses
    every core. projection (512, bits) float32; codes (n, bits / 8) uint8.
    """

    def __init__(self, projection: np.ndarray, codes: np.ndarray, shards: int) -> None:
        self.projection = projection
        self.codes = codes
        bits = projection.shape[1]
        n = len(codes)
        # Below ~100k codes per shard the thread hand-off costs more than the scan saves.
        shards = max(1, min(shards, n // 100_000))
        self.shards = shards
        self._parts = []
        if shards == 1:
            self.index = faiss.IndexBinaryFlat(bits)
            self.index.add(codes)
        else:
            self.index = faiss.IndexBinaryShards(bits, True, True)  # threaded, successive ids
            bounds = np.linspace(0, n, shards + 1).astype(int)
            for a, b in zip(bounds[:-1], bounds[1:]):
                part = faiss.IndexBinaryFlat(bits)
                part.add(codes[a:b])
                self._parts.append(part)  # the shard index does not own its parts
                self.index.add_shard(part)

    @staticmethod
    def projection_for(bits: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((D, bits)).astype(np.float32)

    @staticmethod
    def encode(x: np.ndarray, projection: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        out = np.empty((len(x), projection.shape[1] // 8), np.uint8)
        for a in range(0, len(x), chunk):
            out[a:a + chunk] = np.packbits(x[a:a + chunk] @ projection > 0, axis=1)
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(self.encode(xq, self.projection), k)


class BuiltIndex:
    """A FAISS index over positions 0..n-1 and the float32 templates behind it.

    Immutable once built: concurrent searches are safe. Scores returned are exact inner
    products (approximate kinds re-score their candidates from ``vectors``).
    vectors (n, 512) float32; owner (n,) int32 traveller slot; template_ids (n,) int64.
    """

    def __init__(self, kind: str, index, vectors: np.ndarray, owner: np.ndarray,
                 template_ids: np.ndarray, params: dict[str, int | bool]) -> None:
        self.kind = kind
        self.index = index
        self.vectors = vectors
        self.owner = owner
        self.template_ids = template_ids
        self.params = params
        # flat, HNSW-flat and IVF-flat compute exact inner products on the float32 vectors;
        # binary codes and 8-bit codes need a second, exact pass.
        self.exact_scores = kind != "binary" and not params.get("sq8", False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def approximate(self) -> bool:
        return self.kind != "flat"

    @property
    def bytes_per_template(self) -> float:
        """Resident bytes per template: index codes/graph plus the float32 re-score copy."""
        if self.ntotal == 0:
            return 0.0
        if self.kind == "binary":
            codes = self.index.codes.nbytes
        else:
            codes = faiss.serialize_index(self.index).nbytes
        shares_vectors = self.kind == "flat" or (self.kind == "hnsw" and self.exact_scores)
        extra = 0 if shares_vectors else self.vectors.nbytes
        return (codes + extra + self.owner.nbytes + self.template_ids.nbytes) / self.ntotal

    @classmethod
    def build(cls, vectors: np.ndarray, owner: np.ndarray, template_ids: np.ndarray,
              config: IndexConfig) -> BuiltIndex:
        n = len(vectors)
        kind = config.kind_for(n)
        if kind != "flat" and (n == 0 or (kind == "ivf" and _ivf_nlist(n, config) < 2)):
            # Nothing to train an approximate index on; exact is exact and instant here.
            log.info("%d templates are too few for a %s index: building a flat one", n, kind)
            kind = "flat"
        started = time.perf_counter()
        params: dict[str, int | bool] = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(D)
            index.add(vectors)
            vectors = _flat_view(index)
        elif kind == "binary":
            params = {"bits": config.binary_bits, "seed": config.binary_seed,
                      "shards": config.search_threads, "rescore": config.rescore}
            projection = BinaryCodes.projection_for(config.binary_bits, config.binary_seed)
            index = BinaryCodes(projection, BinaryCodes.encode(vectors, projection),
                                config.search_threads)
        elif kind == "hnsw":
            params = {"m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction,
                      "ef_search": config.hnsw_ef_search, "sq8": config.sq8,
                      "rescore": config.rescore}
            if config.sq8:
                index = faiss.IndexHNSWSQ(D, faiss.ScalarQuantizer.QT_8bit, config.hnsw_m,
                                          faiss.METRIC_INNER_PRODUCT)
                index.train(_training_sample(vectors, 100_000))
            else:
                index = faiss.IndexHNSWFlat(D, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.hnsw_ef_construction
            index.add(vectors)
            if not config.sq8:
                vectors = _flat_view(faiss.downcast_index(index.storage))
        else:
            nlist = _ivf_nlist(n, config)
            params = {"nlist": nlist, "nprobe": config.ivf_nprobe, "sq8": config.sq8,
                      "rescore": config.rescore}
            quantizer = faiss.IndexFlatIP(D)
            if config.sq8:
                index = faiss.IndexIVFScalarQuantizer(quantizer, D, nlist,
                                                      faiss.ScalarQuantizer.QT_8bit,
                                                      faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(_training_sample(vectors, 64 * nlist))
            index.add(vectors)
        log.info("built %s index over %d templates in %.1f s", kind, n,
                 time.perf_counter() - started)
        return cls(kind, index, vectors, owner, template_ids, params)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 512) probes -> scores (n, k) float32 descending, positions (n, k) (-1: none)."""
        k = min(k, self.ntotal)
        if k == 0:
            return np.empty((len(xq), 0), np.float32), np.empty((len(xq), 0), np.int64)
        if self.kind == "flat":
            return self.index.search(xq, k)
        fetch = min(max(k, int(self.params.get("rescore", 0))), self.ntotal)
        if self.kind == "binary":
            _, positions = self.index.search(xq, fetch)
            scores = None
        else:
            if self.kind == "hnsw":
                sp = faiss.SearchParametersHNSW(
                    efSearch=max(int(self.params["ef_search"]), fetch))
            else:
                sp = faiss.SearchParametersIVF(nprobe=int(self.params["nprobe"]))
            scores, positions = self.index.search(xq, fetch, params=sp)
        if not self.exact_scores:
            scores = rescore(xq, positions, self.vectors)
        if fetch > k or not self.exact_scores:
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(scores, order, axis=1)
            positions = np.take_along_axis(positions, order, axis=1)
        return scores, positions

    # -- persistence (snapshot.py owns the manifest and the atomic write) -------------

    def write_files(self, folder: Path) -> list[str]:
        """Write the index and its arrays into ``folder``; returns the file names written."""
        np.save(folder / "positions.npy", np.stack([self.owner.astype(np.int64),
                                                    self.template_ids]))
        names = ["positions.npy"]
        if self.kind == "binary":
            np.save(folder / "projection.npy", self.index.projection)
            np.save(folder / "codes.npy", self.index.codes)
            names += ["projection.npy", "codes.npy"]
        else:
            faiss.write_index(self.index, str(folder / "index.faiss"))
            names.append("index.faiss")
        if not self.exact_scores or self.kind == "ivf":
            # Binary codes, 8-bit codes and IVF lists cannot give the float32 templates back.
            np.save(folder / "vectors.npy", self.vectors)
            names.append("vectors.npy")
        return names

    @classmethod
    def read_files(cls, folder: Path, kind: str, params: dict[str, int | bool]) -> BuiltIndex:
        positions = np.load(folder / "positions.npy")
        if kind == "binary":
            projection = np.load(folder / "projection.npy")
            codes = np.load(folder / "codes.npy")
            if projection.shape != (D, int(params["bits"])) or codes.shape[1:] != (
                    int(params["bits"]) // 8,):
                raise GalleryError("snapshot binary codes do not match their parameters")
            index = BinaryCodes(projection, codes, int(params["shards"]))
        else:
            # read_index already returns the concrete class and owns it; a downcast_index()
            # proxy would not own it, so we never rebind ``index`` to one.
            index = faiss.read_index(str(folder / "index.faiss"))
        if positions.shape != (2, index.ntotal):
            raise GalleryError(f"snapshot positions have shape {positions.shape}, expected "
                               f"(2, {index.ntotal})")
        owner = positions[0].astype(np.int32)
        template_ids = np.ascontiguousarray(positions[1])
        if kind == "flat":
            vectors = _flat_view(index)
        elif kind == "hnsw" and not params.get("sq8", False):
            vectors = _flat_view(faiss.downcast_index(index.storage))
        else:
            vectors = np.load(folder / "vectors.npy")
        if vectors.shape != (index.ntotal, D) or vectors.dtype != np.float32:
            raise GalleryError("snapshot vectors do not match its index")
        return cls(kind, index, vectors, owner, template_ids, params)


def _training_sample(vectors: np.ndarray, size: int) -> np.ndarray:
    if len(vectors) <= size:
        return vectors
    rng = np.random.default_rng(0)
    return vectors[np.sort(rng.choice(len(vectors), size, replace=False))]


def rescore(xq: np.ndarray, positions: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact inner products of each probe with its candidates.

    xq (n, 512) float32; positions (n, c) int64 (-1 = no candidate); -> (n, c) float32,
    -inf where there is no candidate.
    """
    valid = positions >= 0
    gathered = vectors[np.where(valid, positions, 0)]          # (n, c, 512)
    scores = np.einsum("ncd,nd->nc", gathered, xq, dtype=np.float32)
    scores[~valid] = -np.inf
    return scores


# -- the mutable part: delta segment and traveller table ---------------------------------

@dataclass(frozen=True)
class _Delta:
    """Templates enrolled since the build; rows [0, count) of buffers with spare capacity."""

    vectors: np.ndarray
    owner: np.ndarray
    template_ids: np.ndarray
    count: int


@dataclass(frozen=True)
class _Table:
    """Traveller slots; a removed or re-enrolled traveller's old slot stays inactive forever."""

    ids: list[str]
    valid_from: np.ndarray
    valid_to: np.ndarray
    active: np.ndarray
    count: int


@dataclass(frozen=True)
class _View:
    built: BuiltIndex
    delta: _Delta
    table: _Table


def _grow(a: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(a):
        return a
    grown = np.empty((max(needed, 2 * len(a), 1024),) + a.shape[1:], a.dtype)
    grown[:len(a)] = a
    return grown


class SearchIndex:
    """One writer at a time (the Gallery's lock); any number of concurrent searches."""

    def __init__(self, built: BuiltIndex, traveller_ids: list[str], valid_from: np.ndarray,
                 valid_to: np.ndarray, built_version: int, config: IndexConfig,
                 photos: np.ndarray | None = None) -> None:
        t = len(traveller_ids)
        # Booking photos fused into each traveller's template (a 1:1 threshold depends on it).
        self._photos: dict[str, int] = dict(zip(
            traveller_ids, (np.ones(t, np.int64) if photos is None else photos).tolist()))
        self.config = config
        self.built_version = built_version
        self.applied_version = built_version
        self._built_travellers = t
        table = _Table(list(traveller_ids), _grow(np.asarray(valid_from, np.float64), t),
                       _grow(np.asarray(valid_to, np.float64), t),
                       _grow(np.ones(t, bool), t), t)
        delta = _Delta(np.empty((0, D), np.float32), np.empty(0, np.int32),
                       np.empty(0, np.int64), 0)
        self._slots: dict[str, int] = {tid: i for i, tid in enumerate(traveller_ids)}
        self._built_photos = dict(self._photos)
        self._view = _View(built, delta, table)
        # Counts the writer's changes to the traveller table, after each one is in place.
        self._table_changes = 0
        # (table changes, lo, hi, count): ``count`` travellers are searchable at every now
        # in [lo, hi). One tuple, replaced whole, so concurrent readers need no lock.
        self._searchable_span: tuple[int, float, float, int] = (-1, 0.0, 0.0, 0)

    @classmethod
    def build(cls, vectors: np.ndarray, owner: np.ndarray, template_ids: np.ndarray,
              traveller_ids: list[str], valid_from: np.ndarray, valid_to: np.ndarray,
              built_version: int, config: IndexConfig,
              photos: np.ndarray | None = None) -> SearchIndex:
        built = BuiltIndex.build(np.ascontiguousarray(vectors, np.float32), owner,
                                 template_ids, config)
        return cls(built, traveller_ids, valid_from, valid_to, built_version, config, photos)

    # -- facts --------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self._view.built.kind

    @property
    def built(self) -> BuiltIndex:
        return self._view.built

    @property
    def travellers(self) -> int:
        """Travellers currently searchable (ignoring booking windows)."""
        return len(self._slots)

    def searchable(self, now: float) -> int:
        """Travellers a search at ``now`` looks at: active, booking window open.

        Asked for on every search batch, so the count is kept with the span of time it
        holds for (up to the nearest booking-window edge) and counted again only once
        ``now`` leaves that span or the table changes: always the exact count."""
        changes, lo, hi, count = self._searchable_span
        if changes == self._table_changes and lo <= now < hi:
            return count
        # Read before the table: a change made meanwhile moves the counter past this key.
        changes = self._table_changes
        t = self._view.table
        n = t.count
        active, vf, vt = t.active[:n], t.valid_from[:n], t.valid_to[:n]
        opened, closed = vf <= now, vt <= now
        count = int(np.count_nonzero(active & opened & (now < vt)))
        # The count moves only when now crosses an active traveller's valid_from or valid_to.
        lo = max(np.max(vf, where=active & opened, initial=-math.inf),
                 np.max(vt, where=active & closed, initial=-math.inf))
        hi = min(np.min(vf, where=active & ~opened, initial=math.inf),
                 np.min(vt, where=active & ~closed, initial=math.inf))
        self._searchable_span = (changes, float(lo), float(hi), count)
        return count

    @property
    def templates(self) -> int:
        """Templates held, including those of removed travellers not yet rebuilt away."""
        v = self._view
        return v.built.ntotal + v.delta.count

    @property
    def delta_templates(self) -> int:
        return self._view.delta.count

    @property
    def needs_rebuild(self) -> bool:
        return self.delta_templates >= self.config.delta_max_templates

    def built_table(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The traveller table as it was at build time (what a snapshot stores)."""
        t, n = self._view.table, self._built_travellers
        return t.ids[:n], t.valid_from[:n].copy(), t.valid_to[:n].copy()

    def built_photos(self) -> np.ndarray:
        """Booking photos behind each traveller of ``built_table`` (what a snapshot stores)."""
        ids = self._view.table.ids[:self._built_travellers]
        return np.array([self._built_photos.get(tid, 1) for tid in ids], np.int64)

    def photos(self, traveller_id: str) -> int:
        """Booking photos fused into the traveller's template (1 if unknown)."""
        return self._photos.get(traveller_id, 1)

    # -- writer side (caller holds the gallery's write lock) --------------------------

    def upsert(self, traveller_id: str, valid_from: float, valid_to: float,
               templates: np.ndarray, template_ids: Sequence[int], photos: int = 1) -> None:
        """Make the traveller searchable with exactly these templates (k, 512) float32,
        made from ``photos`` booking photos."""
        self._photos[traveller_id] = photos
        v = self._view
        tb, dl = v.table, v.delta
        slot = tb.count
        vf = _grow(tb.valid_from, slot + 1)
        vt = _grow(tb.valid_to, slot + 1)
        active = _grow(tb.active, slot + 1)
        vf[slot], vt[slot], active[slot] = valid_from, valid_to, True
        tb.ids.append(traveller_id)
        m, k = dl.count, len(templates)
        dv = _grow(dl.vectors, m + k)
        do = _grow(dl.owner, m + k)
        dt = _grow(dl.template_ids, m + k)
        dv[m:m + k] = templates
        do[m:m + k] = slot
        dt[m:m + k] = np.asarray(template_ids, np.int64)
        # Publish the new slot first, then retire the old one: a concurrent search sees the
        # traveller at every moment (possibly twice, which the per-traveller merge absorbs).
        self._view = _View(v.built, _Delta(dv, do, dt, m + k),
                           _Table(tb.ids, vf, vt, active, slot + 1))
        old = self._slots.get(traveller_id)
        if old is not None:
            active[old] = False
        self._slots[traveller_id] = slot
        self._table_changes += 1

    def remove(self, traveller_id: str) -> bool:
        slot = self._slots.pop(traveller_id, None)
        if slot is None:
            return False
        self._view.table.active[slot] = False
        self._table_changes += 1
        return True

    # -- reader side --------------------------------------------------------------

    def search(self, probes: np.ndarray, k: int, now: float) -> list[list[Candidate]]:
        """Top-k travellers per probe among those active and within their window at ``now``.

        probes (n, 512) float32 L2-normalised -> n lists of at most k Candidates, best first.
        """
        v = self._view
        total = v.built.ntotal + v.delta.count
        results: list[list[Candidate]] = [[] for _ in range(len(probes))]
        if total == 0 or k < 1:
            return results
        limit = min(total, MAX_APPROX_FETCH) if v.built.approximate else total
        fetch = min(limit, k * self.config.overfetch + 8)
        pending = np.arange(len(probes))
        while len(pending):
            scores, slots = self._candidates(v, probes[pending], fetch)
            short = []
            for row, p in enumerate(pending):
                results[p] = _merge(scores[row], slots[row], v.table, k, now)
                if len(results[p]) < k:
                    short.append(p)
            if not short or fetch >= limit:
                if short and limit < total:
                    # Many dead or out-of-window entries: a rebuild drops them.
                    log.debug("found fewer than %d live travellers among %d candidates",
                              k, limit)
                break
            pending = np.asarray(short, np.int64)
            fetch = min(limit, fetch * 4)
        return results

    @staticmethod
    def _candidates(v: _View, xq: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n, c) and traveller slots (n, c) (-1: none) from the built index + delta."""
        scores, positions = v.built.search(xq, fetch)
        slots = np.where(positions >= 0, v.built.owner[np.maximum(positions, 0)], -1)
        m = v.delta.count
        if m:
            ds = xq @ v.delta.vectors[:m].T
            if m > fetch:
                top = np.argpartition(-ds, fetch - 1, axis=1)[:, :fetch]
                ds = np.take_along_axis(ds, top, axis=1)
            else:
                top = np.broadcast_to(np.arange(m), ds.shape)
            scores = np.concatenate([scores, ds], axis=1)
            slots = np.concatenate([slots, v.delta.owner[:m][top]], axis=1)
        return scores, slots


def _merge(scores: np.ndarray, slots: np.ndarray, table: _Table, k: int, now: float
           ) -> list[Candidate]:
    """Best score per live traveller, top k, from one probe's template candidates."""
    ok = slots >= 0
    s = np.where(ok, slots, 0)
    ok &= table.active[s] & (table.valid_from[s] <= now) & (now < table.valid_to[s])
    order = np.argsort(-scores[ok], kind="stable")
    out: list[Candidate] = []
    seen: set[str] = set()
    for score, slot in zip(scores[ok][order], slots[ok][order]):
        tid = table.ids[slot]
        if tid in seen:
            continue
        seen.add(tid)
        out.append(Candidate(tid, float(score)))
        if len(out) == k:
            break
    return out
