"""SIGKILL a real server during concurrent enrolments, removals and snapshot publishing.

Each cycle: start ``matcher serve`` on the same data folder, run writer threads through the
real gRPC client, kill -9 the server at a random moment, restart it, and check that:

- every acknowledged enrolment is there, complete (its template still verifies at ~1.0);
- every acknowledged removal is gone, from the store and from 1:N search;
- a change in flight at the kill is either fully there or not there at all;
- no traveller we never sent exists, and the store has no half rows;
- SQLite's integrity_check passes, the newest snapshot verifies, the audit chain verifies
  and holds a record for every acknowledged change.

After each kill, every traveller ever sent is checked in the store file, and those the last
cycle touched through the restarted server; after the last kill, every one through the
server (checking all of them through the server after every kill grows with the square of
the kills). 3 cycles in CI, 25 with --soak (--soak-kills N). The random seed is printed so
a failure can be replayed.
"""
from __future__ import annotations

import functools
import hashlib
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from _server import ServerProcess

from matcher.gallery.integrity import integrity_check
from matcher.gallery.snapshot import list_snapshots, verify_snapshot
from matcher.gallery.store import Store
from matcher.service.audit import read_records, verify_chain
from matcher.v1 import matcher_pb2 as pb

WRITERS = 4
MAX_OPS_PER_WRITER = 5000          # bound on each writer's loop, whatever the timing
KILL_AFTER_S = (0.3, 1.5)          # the kill lands somewhere in this window...
MIN_ACKED_PER_CYCLE = 10           # ...and not before this many changes were acknowledged


def template_for(traveller_id: str) -> np.ndarray:
    """(512,) float32 unit vector, a deterministic function of the id."""
    seed = int.from_bytes(hashlib.sha256(traveller_id.encode()).digest()[:8], "little")
    x = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
    return x / np.linalg.norm(x)


def _probe(traveller_id: str) -> pb.Probe:
    return pb.Probe(template=pb.Template(values=template_for(traveller_id).tolist()))


@dataclass
class Op:
    kind: str            # "enrol" | "remove" | "publish"
    traveller_id: str
    request_id: str
    state: str = "sent"  # sent -> acked | failed (before the kill) | in_flight (at the kill)
    detail: str = ""


@dataclass
class Ledger:
    ops: list[Op] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)
    acked: int = 0

    def add(self, op: Op) -> Op:
        with self.lock:
            self.ops.append(op)
        return op

    def ack(self, op: Op) -> None:
        with self.lock:
            op.state = "acked"
            self.acked += 1
            self.lock.notify_all()

    def wait_acked(self, n: int, timeout: float) -> bool:
        """Until ``n`` changes in all have been acknowledged (False on timeout)."""
        with self.lock:
            return self.lock.wait_for(lambda: self.acked >= n, timeout)


def _writer(server: ServerProcess, cycle: int, w: int, ledger: Ledger, killed: threading.Event,
            rng: random.Random, alive_ids: list[str]) -> None:
    """Enrol new travellers, remove some of this writer's own, publish now and then."""
    with server.client(timeout=20.0) as client:
        for i in range(MAX_OPS_PER_WRITER):
            if killed.is_set():
                return
            roll = rng.random()
            if w == 0 and roll < 0.04:
                op = ledger.add(Op("publish", "", f"c{cycle}-w{w}-{i}-pub"))
                call = client.publish_snapshot
            elif roll < 0.3 and alive_ids:
                tid = alive_ids.pop(rng.randrange(len(alive_ids)))
                op = ledger.add(Op("remove", tid, f"c{cycle}-w{w}-{i}-rm"))
                call = functools.partial(client.remove, op.traveller_id,
                                         request_id=op.request_id)
            else:
                tid = f"k{cycle}-w{w}-{i}"
                op = ledger.add(Op("enrol", tid, f"c{cycle}-w{w}-{i}-en"))
                call = functools.partial(client.enroll, op.traveller_id,
                                         [_probe(op.traveller_id)], valid_from=0.0,
                                         valid_to=4e9, request_id=op.request_id)
            try:
                call()
            except grpc.RpcError as exc:
                # After the kill every call fails; before it, none may.
                op.state = "in_flight" if killed.is_set() or not server.alive() else "failed"
                op.detail = f"{exc.code().name}: {exc.details()}"
                return
            ledger.ack(op)
            if op.kind == "enrol":
                alive_ids.append(op.traveller_id)


def _expected(ledger: Ledger) -> tuple[dict[str, str], set[str]]:
    """traveller_id -> 'present' | 'absent' | 'either', and every id ever sent."""
    expect: dict[str, str] = {}
    for op in ledger.ops:
        if op.kind == "publish":
            continue
        if op.state == "acked":
            expect[op.traveller_id] = "present" if op.kind == "enrol" else "absent"
        elif op.state == "in_flight":
            expect[op.traveller_id] = "either"
    return expect, {op.traveller_id for op in ledger.ops if op.kind != "publish"}


def _check_store_file(db: Path) -> None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        orphans = conn.execute("SELECT COUNT(*) FROM templates WHERE traveller_id NOT IN "
                               "(SELECT traveller_id FROM travellers)").fetchone()[0]
        empty = conn.execute("SELECT COUNT(*) FROM travellers t WHERE NOT EXISTS (SELECT 1 "
                             "FROM templates m WHERE m.traveller_id = t.traveller_id)"
                             ).fetchone()[0]
        assert (orphans, empty) == (0, 0), "half-applied rows in the store"
    finally:
        conn.close()


def _lost(expect: dict[str, str], tid: str, present: bool) -> str | None:
    """Why ``tid`` being ``present`` (or not) breaks the ledger, or None."""
    want = expect.get(tid, "absent")  # sent but never acked nor in flight: failed
    if present and want == "absent":
        return f"{tid} should be gone (acknowledged removal lost, or never acknowledged)"
    if not present and want == "present":
        return f"acknowledged enrolment {tid} is lost"
    return None


def _check_store_contents(db: Path, ledger: Ledger) -> set[str]:
    """Every traveller ever sent, against the store file: the travellers present."""
    expect, sent = _expected(ledger)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = dict(conn.execute("SELECT traveller_id, COUNT(*) FROM templates "
                                 "GROUP BY traveller_id"))
    finally:
        conn.close()
    never_sent = sorted(set(rows) - sent)
    assert not never_sent, f"the store holds travellers never sent: {never_sent[:5]}"
    half = {tid: n for tid, n in rows.items() if n != 1}
    assert not half, f"travellers half there: {list(half.items())[:5]}"
    lost = [why for tid in sorted(sent) if (why := _lost(expect, tid, tid in rows))]
    assert not lost, f"{len(lost)} acknowledged changes lost: {lost[:5]}"
    return set(rows)


def _check_after_restart(server: ServerProcess, ledger: Ledger,
                         ids: set[str] | None = None) -> tuple[dict[str, int], set[str]]:
    """Through the restarted server: ``ids`` (default every traveller ever sent) are there
    whole or gone as the ledger says; the gallery holds exactly what the store file does.
    Returns figures and the travellers present."""
    expect, sent = _expected(ledger)
    in_store = _check_store_contents(server.data_dir / "gallery.sqlite3", ledger)
    present: set[str] = set()
    checked = sorted(sent if ids is None else ids & sent)
    with server.client(timeout=30.0) as client:
        for tid in checked:
            try:
                info = client.get_traveller(tid)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, (tid, exc.code())
                assert (tid not in in_store and not _lost(expect, tid, False)), \
                    f"acknowledged enrolment {tid} is lost"
                continue
            assert not _lost(expect, tid, True), _lost(expect, tid, True)
            assert tid in in_store, f"{tid} is served but not in the store file"
            assert info.templates == 1, f"{tid} is half there: {info.templates} templates"
            answer = client.verify(tid, template=template_for(tid))
            assert answer.decision == pb.MATCH and answer.score > 0.999, tid
            present.add(tid)
        info = client.gallery_info()
        assert info.travellers == len(in_store), "the gallery and the store file disagree"
        gone = [t for t, w in expect.items() if w == "absent"]
        for tid in gone[-50:]:  # removals are gone from 1:N search too (the newest ones)
            answer = client.identify(template=template_for(tid), top_k=3)
            assert tid not in {c.traveller_id for c in answer.candidates}
    return {"present": len(in_store), "checked_by_rpc": len(checked),
            "absent_checked": len(gone)}, in_store


def _in_flight_outcomes(ledger: Ledger, present: set[str]) -> dict[str, int]:
    """How the changes in flight at a kill ended: applied whole or not at all."""
    out = {"enrol_applied": 0, "enrol_not_applied": 0, "remove_applied": 0,
           "remove_not_applied": 0, "publish": 0}
    for op in ledger.ops:
        if op.state != "in_flight":
            continue
        if op.kind == "publish":
            out["publish"] += 1
        else:
            applied = (op.traveller_id in present) == (op.kind == "enrol")
            out[f"{op.kind}_{'applied' if applied else 'not_applied'}"] += 1
    return out


def _check_audit(audit: Path, ledger: Ledger) -> None:
    report = verify_chain(audit)
    assert report.ok, f"audit chain broken at record {report.first_bad_seq}: {report.reason}"
    audited = {(r["kind"], r["fields"].get("request_id")) for r in read_records(audit)}
    for op in ledger.ops:
        if op.state == "acked" and op.kind in ("enrol", "remove"):
            assert (op.kind, op.request_id) in audited, f"acknowledged {op.kind} not audited"


def _check_snapshot(data: Path, model_id: str, store_id: str | None) -> bool:
    snapshots = list_snapshots(data / "snapshots")
    if snapshots:
        verify_snapshot(snapshots[0], model_id, store_id)
    return bool(snapshots)


def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path, budget, tally):
    cycles = budget.kills(3)
    seed = random.randrange(2**32)
    print(f"crash-safety seed {seed}")
    rng = random.Random(seed)
    data, log = tmp_path / "data", tmp_path / "server.log"
    ledger = Ledger()
    server = ServerProcess(data, log, ["--metrics-listen", "off", "--watch-interval", "0.5"],
                           verbose=False)
    model_id = store_id = None
    acked = in_flight = 0
    touched: set[str] = set()  # travellers the last cycle enrolled or removed
    try:
        for cycle in range(cycles):
            server.start()
            if cycle:
                checked, _ = _check_after_restart(server, ledger, touched)
                _check_store_file(data / "gallery.sqlite3")
                _check_audit(data / "audit.log", ledger)
                _check_snapshot(data, model_id, store_id)
                tally.add("crash.verified_present", checked["present"])
            with server.client() as client:
                model_id = client.gallery_info().model_id
            killed = threading.Event()
            own_ids: list[list[str]] = [[] for _ in range(WRITERS)]
            writers = [threading.Thread(target=_writer, args=(
                server, cycle, w, ledger, killed, random.Random(rng.random()), own_ids[w]))
                for w in range(WRITERS)]
            acked_before = ledger.acked
            ops_before = len(ledger.ops)
            for t in writers:
                t.start()
            # The kill lands at a random moment, but only once this cycle has acknowledged
            # some changes: on a busy machine the writers may take longer to get going.
            time.sleep(rng.uniform(*KILL_AFTER_S))
            assert ledger.wait_acked(acked_before + MIN_ACKED_PER_CYCLE, 120), \
                f"fewer than {MIN_ACKED_PER_CYCLE} changes acknowledged in two minutes"
            killed.set()
            server.kill()
            for t in writers:
                t.join(60)
                assert not t.is_alive(), "a writer did not stop after the kill"
            failed = [op for op in ledger.ops if op.state == "failed"]
            assert not failed, f"calls failed before the kill: {failed[:3]}"
            tally.add("crash.kills")
            touched = {op.traveller_id for op in ledger.ops[ops_before:] if op.kind != "publish"}
            # Open the store once offline for its id (a snapshot names the store it came from).
            with Store(data / "gallery.sqlite3", model_id) as store:
                store_id = store.store_id
        server.start()
        # Every traveller ever sent, through the server.
        checked, present = _check_after_restart(server, ledger)
        _check_store_file(data / "gallery.sqlite3")
        _check_audit(data / "audit.log", ledger)
        snap = _check_snapshot(data, model_id, store_id)
        server.stop()
        with Store(data / "gallery.sqlite3", model_id) as store:
            assert integrity_check(store) == "ok"
    finally:
        server.kill()
    acked = sum(op.state == "acked" for op in ledger.ops)
    in_flight = sum(op.state == "in_flight" for op in ledger.ops)
    tally.figure("crash.kills_survived", cycles)
    tally.figure("crash.acked_changes", acked)
    tally.figure("crash.in_flight_at_kill", in_flight)
    tally.figure("crash.in_flight_outcomes", _in_flight_outcomes(ledger, present))
    tally.figure("crash.acked_changes_lost", 0)  # reached only if every check passed
    tally.figure("crash.travellers_present_at_end", checked["present"])
    tally.figure("crash.seed", seed)
    assert acked >= cycles * MIN_ACKED_PER_CYCLE, f"only {acked} changes acknowledged"
    print(f"crash safety: {cycles} kills, {acked} acknowledged changes, {in_flight} in flight "
          f"at a kill, {checked['present']} travellers present, snapshot checked: {snap}")
