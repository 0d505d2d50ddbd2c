"""Audit log: the chain verifies, every kind of tampering is caught, reopening continues it."""
from __future__ import annotations

import errno
import itertools
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from matcher.cli import main as cli_main
from matcher.errors import AuditUnavailable
from matcher.service.audit import GENESIS_HASH, AuditError, AuditLog, read_records, verify_chain


def _decision(log: AuditLog, i: int) -> dict:
    return log.append("decision", lane_id="K-03", request_id=f"req-{i}", gallery_version=12,
                      model_id="buffalo_l", top_score=0.61 + i / 1000, decision="MATCH",
                      traveller_id=f"T-{i:04d}")


def _write_log(path: Path, n: int) -> list[dict]:
    with AuditLog(path) as log:
        return [_decision(log, i) for i in range(n)]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_records_chain_and_verify(tmp_path):
    path = tmp_path / "audit.jsonl"
    records = _write_log(path, 5)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(records))
    ok, count, bad = verify_chain(path)
    assert (ok, count, bad) == (True, 5, None)
    assert verify_chain(path).head_hash == records[-1]["hash"]
    stored = list(read_records(path))
    assert stored == records
    assert stored[2]["time"].endswith("Z") and stored[2]["fields"]["traveller_id"] == "T-0002"


def test_every_kind_is_accepted_and_unknown_kinds_are_not(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as log:
        log.append("enrol", traveller_id="T-1", template_id="t-1", gallery_version=3)
        log.append("remove", traveller_id="T-1", template_id="t-1")
        log.append("deletion", traveller_id="T-1", reason="passenger request")
        log.append("snapshot_swap", gallery_version=4, model_id="buffalo_l", size=1200)
        log.append("decision", decision="NO_FACE", lane_id="K-01")
        with pytest.raises(AuditError):
            log.append("tamper", lane_id="K-01")
    assert verify_chain(tmp_path / "a.jsonl").count == 5


@pytest.mark.parametrize("fields", [
    {"template": "AAAA"},
    {"embedding_values": [0.1] * 512},
    {"image_bytes": b"\xff\xd8\xff"},
    {"top_score": float("nan")},
    {"note": "x" * 1000},
    {"Bad-Name": 1},
])
def test_biometric_or_unbounded_fields_are_refused(tmp_path, fields):
    with AuditLog(tmp_path / "a.jsonl") as log:
        with pytest.raises(AuditError):
            log.append("decision", **fields)
        assert log.head() == (0, GENESIS_HASH)  # nothing was written
    assert (tmp_path / "a.jsonl").read_bytes() == b""


def test_tampering_with_one_field_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 6)
    lines = _lines(path)
    record = json.loads(lines[3])
    record["fields"]["decision"] = "NO_MATCH"
    lines[3] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert tuple(verify_chain(path)) == (False, 3, 4)


def test_tampering_with_rehash_breaks_the_next_link(tmp_path):
    from matcher.service.audit import record_hash

    path = tmp_path / "audit.jsonl"
    _write_log(path, 6)
    lines = _lines(path)
    record = json.loads(lines[2])
    record["fields"]["top_score"] = 0.99
    record["hash"] = record_hash(record)  # a forger recomputes this record's own hash
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    report = verify_chain(path)
    assert (report.ok, report.count, report.first_bad_seq) == (False, 3, 4)
    assert "prev_hash" in report.reason


def test_deleting_a_line_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 6)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    assert tuple(verify_chain(path)) == (False, 2, 3)


def test_deleting_the_first_line_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 4)
    path.write_bytes(b"".join(_lines(path)[1:]))
    assert tuple(verify_chain(path)) == (False, 0, 1)


def test_reordering_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 6)
    lines = _lines(path)
    lines[3], lines[4] = lines[4], lines[3]
    path.write_bytes(b"".join(lines))
    assert tuple(verify_chain(path)) == (False, 3, 4)


def test_reopen_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    first = _write_log(path, 3)
    with AuditLog(path) as log:
        assert log.head() == (3, first[-1]["hash"])
        nxt = _decision(log, 99)
    assert nxt["seq"] == 4 and nxt["prev_hash"] == first[-1]["hash"]
    assert tuple(verify_chain(path)) == (True, 4, None)


def test_reopen_drops_a_torn_unacknowledged_tail(tmp_path):
    path = tmp_path / "audit.jsonl"
    records = _write_log(path, 3)
    whole = path.read_bytes()
    with open(path, "ab") as f:  # what a crash in the middle of a write leaves behind
        f.write(b'{"fields":{"decision":"MA')
    assert not verify_chain(path).ok
    with AuditLog(path) as log:
        assert log.head() == (3, records[-1]["hash"])
        _decision(log, 4)
    assert path.read_bytes().startswith(whole)
    assert tuple(verify_chain(path)) == (True, 4, None)


def test_reopen_refuses_a_tampered_last_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    path.write_bytes(path.read_bytes().replace(b'"MATCH"', b'"NO_MATCH"'))
    with pytest.raises(AuditError, match="fails its hash"):
        AuditLog(path)


def _fstat_failing_for(monkeypatch, name: str) -> None:
    """os.fstat fails (EIO) for any open file called ``name``, and only for it."""
    real = os.fstat

    def fstat(fd):
        if isinstance(fd, int) and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == name:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fstat", fstat)


def test_a_file_size_that_cannot_be_read_is_an_audit_failure(tmp_path, monkeypatch):
    """The write's first step failing is AuditUnavailable like any other I/O failure (what
    --audit-failure applies to), not an UnboundLocalError; nothing is written."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    first = _decision(log, 1)
    with monkeypatch.context() as m:
        _fstat_failing_for(m, "audit.log")
        with pytest.raises(AuditUnavailable, match="cannot be written"):
            _decision(log, 2)
    assert _decision(log, 3)["prev_hash"] == first["hash"]
    log.close()
    assert tuple(verify_chain(path)) == (True, 2, None)


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_audit_failure_policy_applies_when_the_log_size_cannot_be_read(
        policy, pipeline, tmp_path, monkeypatch):
    import grpc
    from service_helpers import ServerThread

    from matcher.client import MatcherClient
    from matcher.service.server import ServerConfig
    from matcher.v1 import matcher_pb2 as pb

    config = ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data",
                          metrics_listen=None, audit_failure=policy)
    probe = np.zeros(512, np.float32)
    probe[0] = 1.0
    with ServerThread(config, pipeline) as server, MatcherClient(server.address) as client:
        _fstat_failing_for(monkeypatch, "audit.log")
        if policy == "fail_open":
            assert client.identify(template=probe).decision == pb.NO_MATCH  # unaudited
        else:
            with pytest.raises(grpc.RpcError) as refused:
                client.identify(template=probe)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        monkeypatch.undo()


def test_concurrent_appends_stay_one_valid_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    threads_n, per_thread = 8, 40
    log = AuditLog(path)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(per_thread):
                log.append("decision", lane_id=f"K-{t:02d}", request_id=f"{t}-{i}",
                           decision="NO_MATCH")
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    log.close()
    assert not errors
    assert tuple(verify_chain(path)) == (True, threads_n * per_thread, None)
    seen = {r["fields"]["request_id"] for r in read_records(path)}
    assert len(seen) == threads_n * per_thread


def test_cli_verify(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    records = _write_log(path, 4)
    assert cli_main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok: 4 records" in out and records[-1]["hash"] in out
    lines = _lines(path)
    del lines[1]
    path.write_bytes(b"".join(lines))
    assert cli_main(["audit", "verify", str(path)]) == 1
    assert "BROKEN" in capsys.readouterr().out
