"""PrimaryGallery: background rebuild, concurrent writers and readers, refresh, inputs."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from synthetic import MODEL, NOW, WINDOW, enrol_each, sha, templates, unit

from matcher.errors import GalleryError, InvalidInput, UnknownTraveller
from matcher.gallery.index import IndexConfig
from matcher.gallery.primary import GalleryConfig, PrimaryGallery


def test_background_rebuild_folds_the_delta_into_the_index(tmp_path):
    cfg = GalleryConfig(IndexConfig(index_kind="binary", delta_max_templates=8))
    x = unit(np.random.default_rng(0).standard_normal((10, 512)))
    with PrimaryGallery.open(tmp_path, MODEL, cfg) as g:
        for i in range(10):
            g.enroll(f"T{i}", x[i], *WINDOW, [sha(i)])
        g._rebuilding.join()
        stats = g.stats()
        assert stats["index_built_version"] >= 8 and stats["index_kind"] == "binary"
        assert stats["delta_templates"] < 8
        assert [c[0].traveller_id for c in g.search(x, 1, NOW)] == [f"T{i}" for i in range(10)]


def test_concurrent_enrolments_and_searches(tmp_path):
    x = unit(np.random.default_rng(1).standard_normal((60, 512)))
    errors: list[BaseException] = []
    with PrimaryGallery.open(tmp_path, MODEL) as g:
        def writer(offset: int) -> None:
            try:
                for i in range(offset, 60, 3):
                    g.enroll(f"T{i}", x[i], *WINDOW, [sha(i)])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def reader() -> None:
            try:
                for _ in range(50):
                    for cands in g.search(x, 2, NOW):
                        assert len({c.traveller_id for c in cands}) == len(cands)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(o,)) for o in range(3)]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert g.version == 60 and g.size == 60
        assert [c[0].traveller_id for c in g.search(x, 1, NOW)] == [f"T{i}" for i in range(60)]


def test_refresh_picks_up_another_writers_changes(tmp_path):
    x = unit(np.random.default_rng(2).standard_normal((2, 512)))
    with (PrimaryGallery.open(tmp_path, MODEL) as service,
          PrimaryGallery.open(tmp_path, MODEL) as job):
        job.enroll("A", x[0], *WINDOW, [sha(0)])
        assert service.search(x[:1], 1, NOW)[0] == []
        assert service.refresh() == 1
        assert service.search(x[:1], 1, NOW)[0][0].traveller_id == "A"
        job.remove("A")
        service.refresh()
        assert service.search(x[:1], 1, NOW)[0] == []


def test_search_and_score_inputs(tmp_path):
    x = unit(np.random.default_rng(3).standard_normal((1, 512)))
    with PrimaryGallery.open(tmp_path, MODEL) as g:
        g.enroll("A", x, *WINDOW, [sha(0)])
        with pytest.raises(InvalidInput, match="float32"):
            g.search(x.astype(np.float64))
        with pytest.raises(InvalidInput, match="shape"):
            g.search(np.ones((1, 128), np.float32))
        with pytest.raises(InvalidInput, match="L2"):
            g.search(x * 3)
        with pytest.raises(InvalidInput, match="k must"):
            g.search(x, k=0)
        with pytest.raises(InvalidInput, match="exactly one"):
            g.score_traveller("A", np.concatenate([x, x]))
        with pytest.raises(UnknownTraveller):
            g.score_traveller("B", x[0])
        claim = g.score_traveller("A", x[0], NOW)
        assert claim.score == pytest.approx(1.0, abs=1e-5) and claim.within_window
        assert not g.score_traveller("A", x[0], WINDOW[1]).within_window
        assert g.search(np.empty((0, 512), np.float32)) == []
    with pytest.raises(GalleryError, match="closed"):
        g.enroll("B", x, *WINDOW, [sha(1)])


def test_searchable_count_is_exact_as_the_clock_and_the_gallery_move(tmp_path):
    """The count a 1:N search is calibrated for is kept between search batches; it must
    still move at every booking-window edge (whole second or not) and with every change."""
    windows = [(NOW - 10, NOW + 10), (NOW + 0.5, NOW + 20), (NOW - 5, NOW + 1.25),
               (NOW + 30, NOW + 40)]
    x = templates(4, seed=9)

    def expected(now: float) -> int:
        return sum(vf <= now < vt for vf, vt in windows)

    with PrimaryGallery.open(tmp_path, MODEL) as g:
        enrol_each(g, x, windows)
        assert [g.searchable(NOW + dt) for dt in (0, 0.25, 0.5, 1, 1.25, 2)] == \
            [2, 2, 3, 3, 2, 2]
        # forwards, backwards and the same instant again, across every edge
        times = [NOW + dt for dt in np.arange(-20, 50, 0.25)]
        for now in times + times[::-1] + times:
            assert g.searchable(now) == expected(now), now - NOW
        assert g.searchable(NOW) == 2  # the count at NOW is kept...
        g.remove("T0")
        windows[0] = (NOW, NOW)  # never open
        assert g.searchable(NOW) == expected(NOW) == 1  # ...and dropped by each change
        g.enroll("T3", x[3], NOW - 1, NOW + 1, [sha(3)])  # its window moves to now
        windows[3] = (NOW - 1, NOW + 1)
        assert g.searchable(NOW) == expected(NOW) == 2
        assert g.searchable(NOW + 30) == expected(NOW + 30) == 0
