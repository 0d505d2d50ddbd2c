"""An answer names the gallery state its decision came from: the gallery_version and the
1:N threshold (from the N travellers searched) of the very search that decided it, in the
answer and in its audit record, while enrolments and hot swaps change the gallery."""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable

import numpy as np

from matcher.gallery.primary import PrimaryGallery
from matcher.gallery.replica import ReplicaGallery
from matcher.service.audit import AuditLog, read_records
from matcher.service.engine import MatchEngine
from matcher.service.outcome import MatchCall, MatchOutcome, as_answered, match

WINDOW = (0.0, 4e9)


def _travellers(n: int) -> list[np.ndarray]:
    """n unrelated (512,) unit templates: each matches itself (score 1) and nobody else."""
    x = np.random.default_rng(28).standard_normal((n, 512)).astype(np.float32)
    return list(x / np.linalg.norm(x, axis=1, keepdims=True))


def _enrol(gallery: PrimaryGallery, i: int, template: np.ndarray) -> int:
    return gallery.enroll(f"t{i}", template[None, :], *WINDOW, [f"{i:064x}"]).gallery_version


def _identify_while(engine: MatchEngine, templates: list[np.ndarray], probes: range,
                    change: Callable[[], None], lanes: int = 4
                    ) -> list[tuple[int, MatchOutcome]]:
    """Identify probes of ``probes`` (template i is traveller t{i}'s) from ``lanes``
    concurrent callers while ``change`` runs in a thread; (probe, answer) for each."""
    answers: list[tuple[int, MatchOutcome]] = []
    ids = itertools.count()
    done = threading.Event()

    def changing() -> None:
        try:
            change()
        finally:
            done.set()

    async def lane(n: int) -> None:
        rng = np.random.default_rng(n)
        while not done.is_set():
            i = int(rng.choice(probes))
            call = MatchCall("Identify", f"r{next(ids)}", f"lane-{n}")
            answers.append((i, await match(engine, call, [templates[i]], None)))

    async def main() -> None:
        engine.start()
        try:
            thread = threading.Thread(target=changing)
            thread.start()
            await asyncio.gather(*(lane(n) for n in range(lanes)))
            thread.join()
        finally:
            await engine.stop()

    asyncio.run(main())
    return answers


def _check(answers: list[tuple[int, MatchOutcome]], engine: MatchEngine,
           searchable_at: dict[int, int], matched_from: dict[int, int], audit_path) -> None:
    """Each answer's version is one the gallery had; its threshold is the 1:N threshold
    for that version's N; it matched its traveller if and only if that version held it;
    and its audit record says the same."""
    records = {r["fields"]["request_id"]: r["fields"] for r in read_records(audit_path)
               if r["kind"] == "decision"}
    wrong = []
    for i, out in answers:
        version = out.gallery_version
        threshold = engine.decider.point_1toN(gallery_size=searchable_at[version]).threshold
        should_match = i in matched_from and matched_from[i] <= version
        record = records[out.call.request_id]
        if (out.verdict.threshold != threshold
                or (out.verdict.traveller_id == f"t{i}") != should_match
                or record["gallery_version"] != version
                or record["threshold"] != as_answered(threshold)):
            wrong.append((i, version, out.verdict.outcome, out.verdict.threshold, threshold))
    assert not wrong, f"{len(wrong)} of {len(answers)} answers name a state they did not " \
                      f"search, e.g. (probe, version, outcome, reported, used): {wrong[:3]}"


def test_an_answer_names_the_version_and_threshold_it_searched_while_travellers_enrol(
        pipeline, tmp_path):
    templates = _travellers(250)
    base = 10
    gallery = PrimaryGallery.open(tmp_path / "gallery", pipeline.model_id)
    matched_from = {i: _enrol(gallery, i, templates[i]) for i in range(base)}
    searchable_at = {gallery.version: base}
    audit = AuditLog(tmp_path / "audit.log")
    engine = MatchEngine(pipeline, gallery, audit=audit)

    def enrol_the_rest() -> None:
        for i in range(base, len(templates)):
            version = _enrol(gallery, i, templates[i])
            matched_from[i] = version
            searchable_at[version] = i + 1  # one traveller more with each version

    try:
        answers = _identify_while(engine, templates, range(len(templates)), enrol_the_rest)
    finally:
        gallery.close()
        audit.close()
    assert len({out.gallery_version for _, out in answers}) > 10  # it raced the enrolments
    _check(answers, engine, searchable_at, matched_from, tmp_path / "audit.log")


def test_an_answer_names_the_version_and_threshold_it_searched_across_hot_swaps(
        pipeline, tmp_path):
    templates = _travellers(30)
    data = tmp_path / "writer"
    with PrimaryGallery.open(data, pipeline.model_id) as writer:
        for i in range(10):
            _enrol(writer, i, templates[i])
        writer.rebuild()  # a snapshot holds the index as last built
        small = writer.export_snapshot()
        small_version = writer.version
        for i in range(10, 30):
            _enrol(writer, i, templates[i])
        writer.rebuild()
        large = writer.export_snapshot()
        large_version = writer.version
    replica = ReplicaGallery.open(data / "snapshots", pipeline.model_id)
    audit = AuditLog(tmp_path / "audit.log")
    engine = MatchEngine(pipeline, replica, audit=audit)

    def swap_back_and_forth() -> None:
        for _ in range(100):
            replica.load_snapshot(small)
            replica.load_snapshot(large)

    try:
        # travellers of the larger snapshot only: matched in it, never in the smaller
        answers = _identify_while(engine, templates, range(10, 30), swap_back_and_forth)
    finally:
        audit.close()
    assert {out.gallery_version for _, out in answers} == {small_version, large_version}
    _check(answers, engine, {small_version: 10, large_version: 30},
           {i: large_version for i in range(10, 30)}, tmp_path / "audit.log")
