"""The search index: every kind agrees with exact numpy search; filters, removals, delta."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from synthetic import NOW, unit

from matcher.errors import InvalidInput
from matcher.gallery.index import BuiltIndex, IndexConfig, SearchIndex, rescore


def clusters(n_ids: int, per_id: int, seed: int, noise: float = 1.0):
    """Identity centres + noisy templates: genuine cosine about 0.5-0.9, impostor about 0."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_ids, 512)))
    def sample(k: int) -> np.ndarray:
        s = rng.uniform(0.3, noise, (n_ids, k, 1))
        return unit(centres[:, None, :] + s * unit(rng.standard_normal((n_ids, k, 512))))
    return centres, sample


def build(kind: str, n_ids: int = 600, per_id: int = 2, sq8: bool = False, seed: int = 0):
    _, sample = clusters(n_ids, per_id, seed)
    gallery = sample(per_id).reshape(-1, 512)
    owner = np.repeat(np.arange(n_ids, dtype=np.int32), per_id)
    ids = [f"T{i:05d}" for i in range(n_ids)]
    cfg = IndexConfig(index_kind=kind, sq8=sq8, ivf_nprobe=16)
    ix = SearchIndex.build(gallery, owner, np.arange(len(gallery)), ids,
                           np.full(n_ids, NOW - 1), np.full(n_ids, NOW + 3600), 1, cfg)
    return ix, gallery, owner, sample(1)[:, 0, :], ids


def exact_top1(probes, gallery, owner, ids):
    s = probes @ gallery.T
    return [ids[owner[j]] for j in s.argmax(1)]


@pytest.mark.parametrize("kind,sq8", [("flat", False), ("binary", False), ("hnsw", False),
                                      ("hnsw", True), ("ivf", False), ("ivf", True)])
def test_every_kind_finds_the_exact_top1(kind, sq8):
    ix, gallery, owner, probes, ids = build(kind, sq8=sq8)
    assert ix.kind == kind
    got = [c[0].traveller_id for c in ix.search(probes, 3, NOW)]
    want = exact_top1(probes, gallery, owner, ids)
    agree = np.mean([g == w for g, w in zip(got, want, strict=True)])
    assert agree >= (1.0 if kind == "flat" else 0.98), agree
    assert np.mean([g == f"T{i:05d}" for i, g in enumerate(got)]) >= 0.98


@pytest.mark.parametrize("kind,sq8", [("binary", False), ("hnsw", True)])
def test_scores_are_exact_best_template_per_traveller(kind, sq8):
    ix, gallery, owner, probes, ids = build(kind, sq8=sq8)
    res = ix.search(probes[:20], 5, NOW)
    for p, cands in zip(probes[:20], res, strict=True):
        assert len({c.traveller_id for c in cands}) == len(cands) == 5
        assert all(a.score >= b.score for a, b in itertools.pairwise(cands))
        for c in cands[:1]:
            slot = ids.index(c.traveller_id)
            best = (gallery[owner == slot] @ p).max()
            assert c.score == pytest.approx(float(best), abs=1e-5)


def test_rescore_matches_numpy_and_marks_missing():
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((50, 512)))
    xq = unit(rng.standard_normal((4, 512)))
    pos = rng.integers(0, 50, (4, 6))
    pos[1, 3] = -1
    got = rescore(xq, pos, vectors)
    want = np.einsum("ncd,nd->nc", vectors[pos], xq)
    np.testing.assert_allclose(got[pos >= 0], want[pos >= 0], rtol=1e-5, atol=1e-6)
    assert got[1, 3] == -np.inf


@pytest.mark.parametrize("kind", ["flat", "binary", "hnsw"])
def test_removed_and_out_of_window_travellers_are_not_returned(kind):
    ix, gallery, owner, probes, ids = build(kind)
    assert ix.search(probes[:1], 1, NOW)[0][0].traveller_id == "T00000"
    assert ix.remove("T00000") and not ix.remove("T00000")
    assert "T00000" not in {c.traveller_id for c in ix.search(probes[:1], 10, NOW)[0]}
    # the booking window is checked at search time: before and after it, no result
    assert ix.search(probes[1:2], 5, NOW - 10)[0] == []
    assert ix.search(probes[1:2], 5, NOW + 3600)[0] == []
    assert ix.search(probes[1:2], 1, NOW + 3599)[0][0].traveller_id == "T00001"


def test_overfetch_finds_live_travellers_behind_many_dead_ones():
    ix, gallery, owner, probes, ids = build("flat", n_ids=200, per_id=1)
    # kill everyone but T00199: the nearest templates of every probe are dead
    for tid in ids[:-1]:
        ix.remove(tid)
    for cands in ix.search(probes[:5], 3, NOW):
        assert [c.traveller_id for c in cands] == ["T00199"]


def test_delta_upsert_replaces_a_travellers_templates():
    ix, gallery, owner, probes, ids = build("hnsw", n_ids=300, per_id=1)
    rng = np.random.default_rng(9)
    newcomer = unit(rng.standard_normal((2, 512)))
    ix.upsert("NEW", NOW - 1, NOW + 10, newcomer, [1000, 1001])
    assert ix.delta_template_count == 2 and ix.travellers == 301
    assert ix.search(newcomer[1:], 1, NOW)[0][0].traveller_id == "NEW"
    # re-enrolled with a different photo: the old templates no longer match it
    other = unit(rng.standard_normal((1, 512)))
    ix.upsert("NEW", NOW - 1, NOW + 10, other, [1002])
    top = ix.search(newcomer[1:], 1, NOW)[0][0]
    assert top.traveller_id != "NEW" and top.score < 0.3
    assert ix.search(other, 1, NOW)[0][0].traveller_id == "NEW"
    # re-enrolling a built traveller moves it to the delta with its new window
    ix.upsert("T00005", NOW + 100, NOW + 200, gallery[5:6], [5])
    assert ix.search(probes[5:6], 1, NOW)[0][0].traveller_id != "T00005"
    assert ix.search(probes[5:6], 1, NOW + 150)[0][0].traveller_id == "T00005"


def test_fused_photo_counts_follow_the_traveller_and_snapshots_keep_the_built_ones():
    """A traveller's fused photo count (which 1:1 threshold applies) lives with its slot:
    re-enrolment changes it, removal forgets it, and a snapshot of the index still stores
    the counts the built part was made with."""
    ix, gallery, owner, probes, ids = build("flat", n_ids=4, per_id=1)
    ix = SearchIndex.build(gallery, owner, np.arange(4), ids, np.full(4, NOW - 1),
                           np.full(4, NOW + 3600), 1, ix.config, photos=np.array([1, 2, 3, 1]))
    assert [ix.photos(t) for t in ids] == [1, 2, 3, 1]
    assert (ix.travellers, ix.stored_templates, ix.entries) == (4, 7, 4)
    ix.upsert(ids[0], NOW - 1, NOW + 10, gallery[:1], [10], photos=2)   # a second photo
    ix.upsert("NEW", NOW - 1, NOW + 10, gallery[:1], [11], photos=3)
    assert ix.photos(ids[0]) == 2 and ix.photos("NEW") == 3
    # The stored templates follow the travellers; the entries keep the dead row too.
    assert (ix.travellers, ix.stored_templates, ix.entries) == (5, 11, 6)
    assert ix.remove(ids[1]) and ix.remove("NEW")
    assert ix.photos(ids[1]) == 1 and ix.photos("NEW") == 1     # not their old counts
    assert (ix.travellers, ix.stored_templates, ix.entries) == (3, 6, 6)
    assert ix.built_photos().tolist() == [1, 2, 3, 1]           # as the built part has them


def test_small_and_empty_indexes():
    empty = SearchIndex.build(np.empty((0, 512), np.float32), np.empty(0, np.int32),
                              np.empty(0, np.int64), [], np.empty(0), np.empty(0), 0,
                              IndexConfig())
    assert empty.search(unit(np.ones((1, 512))), 5, NOW) == [[]]
    ix, *_ , probes, _ = build("ivf", n_ids=20, per_id=1)  # too small for IVF -> flat
    assert ix.kind == "flat"
    assert len(ix.search(probes[:1], 50, NOW)[0]) == 20


def test_auto_kind_follows_size_and_bad_kind_is_refused():
    cfg = IndexConfig(flat_max_templates=1000)
    assert cfg.kind_for(1000) == "flat" and cfg.kind_for(1001) == "binary"
    assert IndexConfig(index_kind="ivf").kind_for(10) == "ivf"
    assert IndexConfig(target_recall=1.0).kind_for(10**7) == "flat"  # exact only
    with pytest.raises(InvalidInput, match="index_kind"):
        IndexConfig(index_kind="annoy")
    with pytest.raises(InvalidInput, match="multiple of 64"):
        IndexConfig(binary_bits=100)


def test_built_index_keeps_its_vectors_alive():
    ix, gallery, *_ = build("hnsw", n_ids=100, per_id=1)
    np.testing.assert_array_equal(ix.built.vectors, gallery)
    assert isinstance(ix.built, BuiltIndex)


def test_binary_codes_shard_the_scan_without_changing_results():
    from matcher.gallery.index import BinaryCodes

    rng = np.random.default_rng(4)
    proj = BinaryCodes.projection_for(512, 1)
    codes = rng.integers(0, 256, (200_000, 64), dtype=np.uint8)
    one, two = BinaryCodes(proj, codes, 1), BinaryCodes(proj, codes, 2)
    assert len(two._parts) == 2
    q = unit(rng.standard_normal((8, 512)))
    d1, i1 = one.search(q, 10)
    d2, i2 = two.search(q, 10)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(np.sort(i1, 1), np.sort(i2, 1))


def test_hamming_distance_tracks_the_angle():
    from matcher.gallery.index import BinaryCodes

    rng = np.random.default_rng(5)
    proj = BinaryCodes.projection_for(512, 1)
    x = unit(rng.standard_normal((200, 512)))
    y = unit(x + 0.8 * unit(rng.standard_normal((200, 512))))
    ham = np.unpackbits(BinaryCodes.encode(x, proj) ^ BinaryCodes.encode(y, proj),
                        axis=1).sum(1)
    theta = np.arccos(np.clip((x * y).sum(1), -1, 1))
    # each bit differs with probability theta / pi
    assert abs(np.mean(ham / 512 - theta / np.pi)) < 0.01
