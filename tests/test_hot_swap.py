"""Snapshots published while lanes are calling are swapped in without failing a request."""
from __future__ import annotations

import itertools
import logging
import threading
import time

import numpy as np
import pytest
from service_helpers import ServerThread, enrolment_plan, server_config

from matcher.client import MatcherClient
from matcher.gallery.primary import PrimaryGallery
from matcher.lane import run_lanes
from matcher.service.audit import read_records

pytestmark = pytest.mark.slow


def _random_template(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(512).astype(np.float32)
    return v / np.linalg.norm(v)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_snapshot_swaps_during_a_lane_simulation_fail_no_request(tmp_path, pipeline,
                                                                  faces_dir):
    data_dir = tmp_path / "writer"
    plan = enrolment_plan(faces_dir)
    probes = [(faces_dir / f).read_bytes() for f in ("obama_1.jpg", "biden_2.jpg",
                                                      "kit_harington_2.jpg", "rose_leslie_2.jpg")]
    with ServerThread(server_config(data_dir, watch_interval_s=0.1), pipeline) as srv, \
            MatcherClient(srv.address, timeout=30) as client:
        for identity, file in plan.items():
            client.enroll(identity, [(faces_dir / file).read_bytes()])

        stop = threading.Event()
        result = {}
        answers = itertools.count()  # next() is atomic under the GIL
        progress = [0]

        def on_answer(decision: str) -> None:
            progress[0] = next(answers) + 1

        def more_answers(n: int = 8) -> None:
            target = progress[0] + n
            wait_for(lambda: progress[0] >= target, what=f"{n} more answers")

        lanes = threading.Thread(target=lambda: result.setdefault("report", run_lanes(
            srv.address, probes, lanes=4, stop=stop, timeout=30, on_answer=on_answer)))
        lanes.start()
        more_answers()
        try:
            # The "overnight job": another process's handle on the same store enrols,
            # rebuilds and publishes; the server's watcher must pick each snapshot up.
            rng = np.random.default_rng(7)
            booked = [_random_template(rng) for _ in range(3)]
            swapped = []
            with PrimaryGallery.open(data_dir, pipeline.model_id) as job:
                for round_ in range(3):
                    job.enroll(f"booked-{round_}", booked[round_][None, :], 0.0, 4e9,
                               [f"{round_:064x}"])
                    job.rebuild()
                    name = job.export_snapshot().name
                    wait_for(lambda name=name: client.gallery_info().snapshot == name,
                             what=name)
                    swapped.append(name)
                    more_answers()
                    # And the service's own publish, which also swaps its index.
                    published = client.publish_snapshot()
                    assert published.gallery_version == job.store.gallery_version
                    swapped.append(published.snapshot)
                    more_answers()
        finally:
            stop.set()
            lanes.join(60)
        report = result["report"]
        assert report.failed == 0, report.errors
        assert report.answered >= 8 * (1 + len(swapped))
        assert report.decisions == {"MATCH": report.answered}
        info = client.gallery_info()
        assert info.travellers == len(plan) + 3 and info.snapshot == swapped[-1]
        last = client.identify(template=booked[2])
        assert last.traveller_id == "booked-2" and last.score == pytest.approx(1.0, abs=1e-5)
    swaps = [r for r in read_records(data_dir / "audit.log") if r["kind"] == "snapshot_swap"]
    assert [s["fields"]["snapshot"] for s in swaps] == swapped[0::2]


class _Refusals(logging.Handler):
    """Sets ``seen`` when the snapshot watcher logs that it refused ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.ERROR)
        self.name_refused = name
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(f"not swapping to snapshot {self.name_refused}:"):
            self.seen.set()


def test_a_corrupt_snapshot_is_refused_and_the_old_gallery_keeps_serving(tmp_path, pipeline,
                                                                         faces_dir):
    data_dir = tmp_path / "writer"
    with ServerThread(server_config(data_dir, watch_interval_s=0.1), pipeline) as srv, \
            MatcherClient(srv.address, timeout=30) as client:
        client.enroll("obama", [(faces_dir / "obama_1.jpg").read_bytes()])
        good = client.publish_snapshot().snapshot
        with PrimaryGallery.open(data_dir, pipeline.model_id) as job:
            biden = pipeline.analyse_bytes((faces_dir / "biden_1.jpg").read_bytes())[0]
            job.enroll("biden", biden.template[None, :], 0.0, 4e9, ["b" * 64])
            job.rebuild()
            # Written and damaged outside the watched folder, then renamed in whole: the
            # watcher can only ever see the damaged snapshot.
            bad = job.export_snapshot(tmp_path / "staging")
        index_file = bad / "index.faiss"
        index_file.write_bytes(index_file.read_bytes()[:-10] + b"x" * 10)
        refusals = _Refusals(bad.name)
        watcher_log = logging.getLogger("matcher.gallery.replica")
        watcher_log.addHandler(refusals)
        try:
            bad.rename(data_dir / "snapshots" / bad.name)
            assert refusals.seen.wait(60), "the watcher never looked at the damaged snapshot"
        finally:
            watcher_log.removeHandler(refusals)
        info = client.gallery_info()
        assert info.snapshot == good
        resp = client.identify((faces_dir / "obama_2.jpg").read_bytes())
        assert resp.traveller_id == "obama"
