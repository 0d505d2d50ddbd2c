"""One whole server run, as deployed (``matcher serve`` with mutual TLS and role tokens),
then a search of everything it produced for biometric data.

The run: enrol travellers from real photos and from a client-made template, match them
(unary and LaneStream), send broken and hostile requests, call every RPC with every role,
publish a snapshot, delete a traveller, publish again, scrape /metrics, shut down.

Checks:
- access: every role x every RPC over mTLS gives exactly the contract's answer; no token,
  a wrong token, plaintext and an unknown client certificate are refused;
- deletion: the traveller is gone from the store (and its file bytes), the live index and
  the next snapshot, and the audit log holds the removal;
- privacy: the server log (DEBUG level), the audit log, the metrics text and every error
  message hold none of the enrolled templates (raw float32 slices, base64, hex, printed
  floats) nor any slice of the photos sent, nor a token.
"""
from __future__ import annotations

import functools
import sqlite3
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from _leaks import byte_forms, find_leaks, template_forms
from _pki import make_pki
from _server import METRICS_ANY_PORT, ServerProcess
from service_helpers import CALLS  # one minimal call per RPC, shared with tests/test_auth.py

from matcher.client import MatcherClient
from matcher.gallery.snapshot import list_snapshots
from matcher.service.audit import read_records, verify_chain
from matcher.service.auth import ROLES
from matcher.v1 import matcher_pb2 as pb

TOKENS = {"lane": "lane-privacy-token-5b1f0c", "enroller": "enroller-privacy-token-9e2d",
          "admin": "admin-privacy-token-41aa07"}
PHOTOS = {"T-P1": "obama_1.jpg", "T-P2": "biden_1.jpg", "T-P3": "kit_harington_1.jpg"}
REMOVED = "T-P2"
DENIED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


class Run:
    """Everything one server run produced, for the checks."""

    def __init__(self) -> None:
        self.details: list[str] = []          # every error message a client received
        self.access: dict[tuple[str, str], grpc.StatusCode] = {}
        self.refused: dict[str, grpc.StatusCode] = {}
        self.templates: dict[str, bytes] = {}  # traveller -> stored template bytes
        self.photos: dict[str, bytes] = {}
        self.metrics = b""
        self.log = b""
        self.audit: list[dict] = []
        self.audit_raw = b""
        self.audit_path: Path | None = None
        self.snapshots: list[Path] = []
        self.store_bytes = b""
        self.after_removal: dict[str, object] = {}

    def code_of(self, call) -> grpc.StatusCode:
        try:
            call()
        except grpc.RpcError as exc:
            self.details.append(exc.details() or "")
            return exc.code()
        return grpc.StatusCode.OK


def _stored_templates(db: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {tid: bytes(blob) for tid, blob in
                conn.execute("SELECT traveller_id, template FROM templates")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, faces_dir, pipeline) -> Run:
    folder = tmp_path_factory.mktemp("privacy")
    pki = make_pki(folder / "pki")
    tokens = folder / "tokens.txt"
    tokens.write_text("".join(f"{role}:{token}\n" for role, token in TOKENS.items()))
    data = folder / "data"
    tls = {"ca": pki.ca.cert_path, "cert": pki.client.cert_path, "key": pki.client.key_path}
    server = ServerProcess(data, folder / "server.log", [
        "--tls-cert", str(pki.server.cert_path), "--tls-key", str(pki.server.key_path),
        "--tls-client-ca", str(pki.ca.cert_path), "--tokens", str(tokens),
        *METRICS_ANY_PORT],
        client_kw={**tls, "token": TOKENS["admin"]}, verbose=True)
    r = Run()
    # A template made by the client, enrolled as is: its exact bytes are known up front.
    own = pipeline.analyse_bytes((faces_dir / "rose_leslie_1.jpg").read_bytes())[0].template

    def client(role: str | None, **kw) -> MatcherClient:
        return MatcherClient(server.address, token=TOKENS.get(role) if role else None,
                             timeout=30.0, **{**tls, **kw})

    with server:
        with client("enroller") as enroller, client("lane", lane_id="K-PRIV") as lane, \
                client("admin") as admin:
            for tid, file in PHOTOS.items():
                r.photos[tid] = (faces_dir / file).read_bytes()
                enroller.enroll(tid, [r.photos[tid]], valid_from=0.0, valid_to=4e9)
            enroller.enroll("T-P4", [pb.Probe(template=pb.Template(values=own.tolist()))],
                            valid_from=0.0, valid_to=4e9)
            probe = (faces_dir / "obama_2.jpg").read_bytes()
            r.photos["probe"] = probe
            assert lane.identify(probe).traveller_id == "T-P1"
            assert lane.verify("T-P1", probe).decision == pb.MATCH
            assert lane.clear("T-P3", probe).traveller_id == "T-P1"
            answers = list(lane.lane_stream([pb.LaneRequest(identify=pb.IdentifyRequest(
                probe=pb.Probe(image=probe), request_id="s1"))], timeout=60))
            assert answers[0].result.traveller_id == "T-P1"
            # Hostile and broken requests: their messages are searched below.
            broken = r.photos["T-P1"][: len(r.photos["T-P1"]) // 2]
            doubled = (own * 2).tolist()
            for call in (lambda: lane.identify(broken),
                         lambda: lane.identify(template=np.asarray(doubled, np.float32)),
                         lambda: lane.verify("T-nobody", probe),
                         lambda: lane.identify(aligned=r.photos["T-P3"]),
                         lambda: enroller.enroll("T-bad", [broken])):
                assert r.code_of(call) in (grpc.StatusCode.INVALID_ARGUMENT,
                                           grpc.StatusCode.NOT_FOUND)
            r.templates = _stored_templates(data / "gallery.sqlite3")
            assert set(r.templates) == {*PHOTOS, "T-P4"}
            assert r.templates["T-P4"] == np.asarray(own, "<f4").tobytes()

            # Access: every role x every RPC, then no token and a wrong one.
            for role in TOKENS:
                with client(role) as c:
                    options = {"metadata": c.metadata, "timeout": 60}
                    for method, call in CALLS.items():
                        r.access[(role, method)] = r.code_of(
                            functools.partial(call, c.stub, options))
            for name, token in (("none", None), ("wrong", TOKENS["admin"][:-1] + "x")):
                with MatcherClient(server.address, token=token, timeout=30.0, **tls) as c:
                    r.refused[f"token:{name}"] = r.code_of(lambda: c.gallery_info())
            for name, kw in (("unknown client cert", {"cert": pki.rogue_client.cert_path,
                                                       "key": pki.rogue_client.key_path}),
                             ("expired client cert", {"cert": pki.expired_client.cert_path,
                                                      "key": pki.expired_client.key_path}),
                             ("no client cert", {"cert": None, "key": None})):
                with client("admin", **kw) as c:
                    r.refused[name] = r.code_of(lambda: c.gallery_info(timeout=60))
            with MatcherClient(server.address, token=TOKENS["admin"], timeout=60.0) as plain:
                r.refused["plaintext"] = r.code_of(lambda: plain.gallery_info())

            # Deletion: snapshot with everyone, remove, snapshot again.
            admin.publish_snapshot()
            enroller.remove(REMOVED, request_id="privacy-remove")
            r.after_removal["get"] = r.code_of(lambda: enroller.get_traveller(REMOVED))
            r.after_removal["verify"] = r.code_of(lambda: lane.verify(REMOVED, r.photos[REMOVED]))
            removed_template = np.frombuffer(r.templates[REMOVED], "<f4")
            found = lane.identify(template=removed_template, top_k=5).candidates
            r.after_removal["identify_candidates"] = [c.traveller_id for c in found]
            admin.publish_snapshot()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                        timeout=10) as resp:
                r.metrics = resp.read()
    # After a graceful stop SQLite has checkpointed the WAL into the main file.
    r.log = server.log_path.read_bytes()
    r.audit_path = data / "audit.log"
    r.audit_raw = r.audit_path.read_bytes()
    r.audit = list(read_records(data / "audit.log"))
    r.snapshots = list_snapshots(data / "snapshots")
    r.store_bytes = b"".join(p.read_bytes() for p in sorted(data.glob("gallery.sqlite3*")))
    return r


# -- access -------------------------------------------------------------------------------

def test_every_role_gets_exactly_its_methods_over_mtls(run):
    for (role, method), code in run.access.items():
        if method in ROLES[role]:
            assert code not in DENIED, (role, method, code)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method, code)
    assert len(run.access) == len(TOKENS) * len(CALLS)


def test_missing_wrong_tokens_plaintext_and_unknown_certificates_are_refused(run):
    assert run.refused["token:none"] == grpc.StatusCode.UNAUTHENTICATED
    assert run.refused["token:wrong"] == grpc.StatusCode.UNAUTHENTICATED
    for name in ("unknown client cert", "expired client cert", "no client cert", "plaintext"):
        assert run.refused[name] == grpc.StatusCode.UNAVAILABLE, name


# -- deletion -----------------------------------------------------------------------------

def test_deleted_traveller_is_gone_from_store_index_and_next_snapshot(run):
    assert run.after_removal["get"] == grpc.StatusCode.NOT_FOUND
    assert run.after_removal["verify"] == grpc.StatusCode.NOT_FOUND
    assert REMOVED not in run.after_removal["identify_candidates"]
    forms = template_forms(np.frombuffer(run.templates[REMOVED], "<f4"), REMOVED)
    raw = [f for f in forms if " raw slice " in f[0]]
    assert not find_leaks(run.store_bytes, raw), "the deleted template is still in the store file"
    newest, older = run.snapshots[0], run.snapshots[1]
    newest_bytes = b"".join(p.read_bytes() for p in sorted(newest.iterdir()))
    older_bytes = b"".join(p.read_bytes() for p in sorted(older.iterdir()))
    assert not find_leaks(newest_bytes, raw) and REMOVED.encode() not in newest_bytes
    # The snapshot made before the removal does hold it: the search can find what it
    # looks for (older snapshots are pruned by count; see docs/security.md).
    assert find_leaks(older_bytes, raw) and REMOVED.encode() in older_bytes


def test_deletion_is_in_the_audit_log(run):
    removals = [r for r in run.audit if r["kind"] in ("remove", "deletion")
                and r["fields"].get("traveller_id") == REMOVED]
    assert removals and removals[0]["fields"].get("request_id") == "privacy-remove"
    assert {"enrol", "decision", "remove"} <= {r["kind"] for r in run.audit}
    assert verify_chain(run.audit_path).ok


# -- privacy ------------------------------------------------------------------------------

def _outputs(run) -> dict[str, bytes]:
    return {"server log": run.log, "audit log": run.audit_raw, "metrics": run.metrics,
            "error messages": "\n".join(run.details).encode()}


def test_no_template_in_logs_metrics_audit_or_errors(run, tally):
    forms = [f for tid, blob in run.templates.items()
             for f in template_forms(np.frombuffer(blob, "<f4"), tid)]
    for name, text in _outputs(run).items():
        assert not find_leaks(text, forms), f"template data found in the {name}"
    tally.add("privacy.template_forms_searched", len(forms))
    tally.figure("privacy.bytes_searched", sum(len(t) for t in _outputs(run).values()))


def test_no_photo_bytes_or_tokens_in_logs_metrics_audit_or_errors(run, tally):
    forms = [f for name, photo in run.photos.items() for f in byte_forms(photo, name, count=12)]
    forms += [(f"token {role}", token.encode()) for role, token in TOKENS.items()]
    for name, text in _outputs(run).items():
        assert not find_leaks(text, forms), f"photo bytes or a token found in the {name}"
    assert b"T-P" not in run.metrics, "a traveller id became a metric label"
    assert len(run.log) > 10_000, "the server log is suspiciously short for a DEBUG run"
    tally.add("privacy.photo_forms_searched", len(forms))


def test_the_search_finds_each_form_when_it_is_there(run):
    """The checker itself: every form of a template or photo is found if planted."""
    blob = next(iter(run.templates.values()))
    template = np.frombuffer(blob, "<f4")
    for name, needle in template_forms(template, "t") + byte_forms(run.photos["probe"], "p"):
        haystack = run.log[:5000] + b" noise " + needle + b" more noise"
        assert find_leaks(haystack, [(name, needle)]) == [name]
    # And the printed forms really are how Python and numpy print the values.
    printed = (repr([float(v) for v in template[:8]]) + str(template[:8])).encode()
    assert find_leaks(printed, template_forms(template, "t"))


def test_f7_server_encrypts_templates_when_a_key_is_configured(tmp_path):
    """Finding F7 (fixed): `matcher serve` stored templates in plain even with a key set."""
    from matcher.gallery.codecs import generate_key

    server = ServerProcess(tmp_path / "data", tmp_path / "server.log",
                           ["--metrics-listen", "off"], verbose=False,
                           env={"MATCHER_TEMPLATE_KEY": generate_key()})
    x = np.random.default_rng(7).standard_normal(512).astype(np.float32)
    x /= np.linalg.norm(x)
    with server:
        with server.client() as client:
            client.enroll("T-ENC", [pb.Probe(template=pb.Template(values=x.tolist()))])
        conn = sqlite3.connect(f"file:{tmp_path / 'data' / 'gallery.sqlite3'}?mode=ro", uri=True)
        codec, blob = conn.execute("SELECT codec, template FROM templates").fetchone()
        conn.close()
    assert codec == "aesgcm-v1"
    assert x.astype("<f4").tobytes()[:64] not in bytes(blob)
    with server:  # restarted with the same key, the encrypted template still matches
        with server.client() as client:
            answer = client.verify("T-ENC", template=x)
    assert answer.decision == pb.MATCH and answer.score > 0.999
