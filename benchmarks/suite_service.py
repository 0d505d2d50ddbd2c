"""The service under lane load: latency percentiles and throughput per worker layout, a
large gallery, and the FaceAnalysis + FAISS baseline side by side.

Every point is a real ``matcher serve`` process on a loopback port driven by the lane
simulator (matcher.lane: each lane sends a photo, waits for the answer, sends the next),
so the figures include gRPC, decoding, the micro-batcher, the audit log's fsync and the
lane simulator's own CPU use on the same 2 cores.

1. Layouts: max_batch x batch workers x ONNX Runtime intra-op threads, at 1 / 8 / 32
   lanes (full: also 40), on a gallery of the shared photos' 6 people; probes are the 22
   single-face photos (320x240 up to 2333x1434).
2. Large gallery: a synthetic gallery (quick 20k templates, full 1M) built through the
   index API and published as a snapshot, served by a read replica with the default
   layout; the real people are enrolled in it, so answers can be checked.
3. Baseline: InsightFace FaceAnalysis (detector at 640x640, all faces embedded) + a FAISS
   IndexFlatIP over the same templates, called directly from the same number of threads
   (no RPC at all: the baseline is given its best case).
4. Paced: the most lanes, each starting a request every 2.5 s (a traveller stepping up)
   instead of back to back, on the small and the large gallery: the latency a lane sees
   at a realistic load rather than at saturation.

Every contender runs at every lane count in each round, in a rotating order (quick: 2
rounds of 1.5 s per point; full: 3 rounds of 6 s), so background load on the shared
machine hits them alike; figures are min/median/max over rounds.

Environment: MATCHER_BENCH_SERVICE_SECONDS (seconds per point), MATCHER_BENCH_SERVICE_SIZE
(large gallery size), MATCHER_BENCH_SERVICE_ROUNDS, MATCHER_BENCH_SERVICE_LAYOUTS
(comma-separated names like b8-w2-t1-2ms).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._faces import FaceAnalysisPeer, load_photos
from .harness import Report

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layout:
    """max_batch, batch workers (threads), ORT intra-op threads, max wait in ms."""

    max_batch: int
    workers: int
    ort_threads: int
    max_wait_ms: float = 2.0

    @property
    def name(self) -> str:
        return (f"b{self.max_batch}-w{self.workers}-t{self.ort_threads}"
                f"-{self.max_wait_ms:g}ms")

    def args(self) -> list[str]:
        return ["--max-batch", str(self.max_batch), "--workers", str(self.workers),
                "--threads", str(self.ort_threads), "--max-wait-ms", str(self.max_wait_ms)]


def parse_layout(text: str) -> Layout:
    """'b8-w2-t1-2ms' -> Layout(8, 2, 1, 2.0)."""
    b, w, t, wait = text.strip().split("-")
    return Layout(int(b[1:]), int(w[1:]), int(t[1:]), float(wait.removesuffix("ms")))


QUICK_LAYOUTS = (Layout(1, 1, 2, 0), Layout(8, 1, 2, 2), Layout(1, 2, 1, 0),
                 Layout(8, 2, 1, 0), Layout(8, 2, 1, 2))
FULL_LAYOUTS = (Layout(1, 1, 1, 0), Layout(1, 1, 2, 0), Layout(1, 2, 1, 0),
                Layout(8, 1, 1, 2), Layout(8, 1, 2, 0), Layout(8, 1, 2, 2),
                Layout(8, 2, 1, 0), Layout(8, 2, 1, 2), Layout(8, 2, 2, 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(data_dir: Path, extra: list[str]) -> Iterator[str]:
    """A ``matcher serve`` subprocess; yields its address once SERVING, then SIGTERMs it."""
    from matcher.client import MatcherClient

    port = _free_port()
    address = f"127.0.0.1:{port}"
    log_file = open(data_dir.parent / f"server-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "matcher.cli", "serve", "--listen", address, "--data",
         str(data_dir), "--metrics-listen", "off", *extra],
        cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        with MatcherClient(address) as client:
            client.wait_serving(timeout=600)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def _single_face_probes() -> tuple[list[bytes], list[str], dict[str, bytes]]:
    """(probe bytes, their identity, identity -> the photo enrolled for it)."""
    photos = [p for p in load_photos() if p.faces == 1]
    enrol: dict[str, bytes] = {}
    for p in sorted(photos, key=lambda p: p.file):
        enrol.setdefault(p.identities[0], p.data)
    return [p.data for p in photos], [p.identities[0] for p in photos], enrol


def _record(report: Report, prefix: str, runs: list, summary_key: bool = False) -> None:
    """Percentiles and throughput of each round, summarised over rounds by the harness."""
    for q in (50, 95, 99):
        report.figure(f"{prefix}_p{q}_ms", [r.percentile(q) for r in runs], "ms",
                      summary=summary_key and q != 95)
    report.figure(f"{prefix}_throughput", [r.throughput for r in runs], "answers/s",
                  summary=summary_key)


def _start_layout_servers(stack: contextlib.ExitStack, root: Path, layouts,
                          enrol: dict[str, bytes], probes: list[bytes]) -> dict[str, Callable]:
    """One server per layout, each with the 6 people enrolled; name -> lane runner."""
    from matcher.client import MatcherClient
    from matcher.lane import run_lanes

    runners = {}
    for layout in layouts:
        address = stack.enter_context(served(root / layout.name, layout.args()))
        with MatcherClient(address, timeout=60) as client:
            for identity, photo in enrol.items():
                client.enroll(identity, [photo], valid_from=0, valid_to=4_102_444_800)
        run_lanes(address, probes, 2, requests_per_lane=4)  # warm-up: ORT's first runs
        runners[layout.name] = functools.partial(_lanes_over_grpc, address, probes)
    return runners


def _lanes_over_grpc(address: str, probes: list[bytes], lanes: int, seconds: float):
    from matcher.lane import run_lanes

    return run_lanes(address, probes, lanes, duration_s=seconds, timeout=60)


def _start_large_gallery(stack: contextlib.ExitStack, report: Report, root: Path, size: int,
                         layout: Layout, probes: list[bytes], identities: list[str],
                         enrol: dict[str, bytes]) -> tuple[Callable, np.ndarray, list[str]]:
    """``size`` synthetic templates + the 6 real people, built through the index API,
    published as a snapshot and served by a read replica with ``layout``."""
    from matcher.client import MatcherClient
    from matcher.face.pipeline import Pipeline, largest_face
    from matcher.gallery.index import IndexConfig, SearchIndex
    from matcher.gallery.snapshot import write_snapshot

    pipeline = Pipeline(threads=2)
    real = np.stack([largest_face(pipeline.analyse_bytes(enrol[i])).template for i in enrol])
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    synthetic = rng.standard_normal((size, 512), dtype=np.float32)
    synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
    vectors = np.concatenate([real, synthetic])
    del synthetic
    ids = list(enrol) + [f"S{i:08d}" for i in range(size)]
    n = len(ids)
    # The gallery's own choice of index for this size (IndexConfig "auto").
    config = IndexConfig()
    index = SearchIndex.build(vectors, np.arange(n, dtype=np.int32),
                              np.arange(n, dtype=np.int64), ids, np.zeros(n),
                              np.full(n, 4_102_444_800.0), 1, config)
    snapshots = root / "large" / "snapshots"
    write_snapshot(snapshots, index, pipeline.model_id, "benchmark-store")
    report.figure("large_gallery_build_s", time.perf_counter() - started, "s")
    del index
    address = stack.enter_context(served(root / "large" / "replica",
                                         ["--replica-of", str(snapshots), *layout.args()]))
    with MatcherClient(address, timeout=120) as client:
        info = client.gallery_info()
        report.param(large_gallery_templates=int(info.templates),
                     large_gallery_index=info.index_kind)
        answers = [client.identify(p) for p in probes]
    # Rank-1 is what the index must get right; whether top-1 clears the 1:N threshold at
    # this size is the operating point's business (docs/operating-points.md).
    correct = sum(bool(a.candidates) and a.candidates[0].traveller_id == who
                  for a, who in zip(answers, identities, strict=True))
    report.check(f"large gallery ({n} templates): every probe ranked first",
                 correct == len(probes), f"{correct}/{len(probes)}")
    report.figure("large_gallery_match_share",
                  sum(a.traveller_id == who for a, who in zip(answers, identities, strict=True))
                  / len(probes), "share",
                  note="MATCH decisions at the service's 1:N threshold for this size")
    return functools.partial(_lanes_over_grpc, address, probes), vectors, ids


def _start_baseline(stack: contextlib.ExitStack, report: Report, vectors: np.ndarray,
                    ids: list[str], probes: list[bytes], identities: list[str]) -> Callable:
    """FaceAnalysis + FAISS flat search, called from ``lanes`` threads with no RPC."""
    import faiss

    from matcher.face.decode import decode_image

    peer = FaceAnalysisPeer()
    stack.callback(peer.close)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    images = [decode_image(p) for p in probes]

    def answer(j: int) -> str:
        faces = peer.get(images[j])
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        _, found = index.search(face.normed_embedding[None, :].astype(np.float32), 5)
        return ids[int(found[0, 0])]

    correct = sum(answer(j) == who for j, who in enumerate(identities))
    report.check("baseline identifies every probe", correct == len(probes),
                 f"{correct}/{len(probes)}")

    def run_threads(lanes: int, seconds: float):
        from matcher.lane import LaneReport

        r = LaneReport(lanes, 0.0)
        lock = threading.Lock()
        end = time.monotonic() + seconds

        def lane(number: int) -> None:
            sent, mine = 0, []
            while time.monotonic() < end:
                t = time.perf_counter()
                answer((number + sent) % len(images))
                mine.append((time.perf_counter() - t) * 1e3)
                sent += 1
            with lock:
                r.latencies_ms.extend(mine)

        threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        r.seconds = time.perf_counter() - began
        return r

    return run_threads


PACED_INTERVAL_S = 2.5  # one traveller per lane every 2.5 s


def _paced(report: Report, contenders: dict[str, Callable], default: str, lanes: int,
           seconds: float) -> dict[str, object]:
    """Latency a lane sees when every lane starts a request every PACED_INTERVAL_S
    (lanes / interval requests per second offered), on the small and the large gallery."""
    from matcher.lane import run_lanes

    duration = max(seconds, 3 * PACED_INTERVAL_S)
    out = {}
    for name, prefix in ((default, "paced"), ("large gallery", "paced_large")):
        address, probes = contenders[name].args
        r = run_lanes(address, probes, lanes, duration_s=duration, timeout=60,
                      interval_s=PACED_INTERVAL_S)
        out[name] = r
        report.figure(f"{prefix}_lanes{lanes}_offered", lanes / PACED_INTERVAL_S, "requests/s")
        for q in (50, 95, 99):
            report.figure(f"{prefix}_lanes{lanes}_p{q}_ms", r.percentile(q), "ms",
                          summary=q != 95)
        report.check(f"paced {name} lanes={lanes}: no request failed but by shedding",
                     _unshed(r.errors) == 0, str(dict(r.errors)))
    return out


# A busy machine may make the service shed load or miss a deadline; that is the designed
# answer (benchmarks report it), not a failure. Anything else is.
SHEDDING = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")


def _unshed(errors) -> int:
    return sum(v for k, v in errors.items() if k not in SHEDDING)


def _plot(report: Report, runs: dict[str, dict[int, list]], lane_counts,
          paced: dict[str, object]) -> None:
    fig, axes = report.plot(1, 2, figsize=(13, 5))
    cdf, thr = axes[0]
    top = max(lane_counts)
    styles = {"large gallery": "k--", "FaceAnalysis+FAISS": "r:"}
    for name, by_lanes in runs.items():
        style = styles.get(name, "-")
        lat = np.sort(np.concatenate([r.latencies_ms for r in by_lanes[top]]))
        cdf.plot(lat, np.arange(1, len(lat) + 1) / len(lat), style, label=name)
        thr.plot(lane_counts, [np.median([r.throughput for r in by_lanes[n]])
                               for n in lane_counts], style, marker="o", label=name)
    for name, r in paced.items():
        lat = np.sort(r.latencies_ms)
        cdf.plot(lat, np.arange(1, len(lat) + 1) / len(lat), "-.", lw=2,
                 label=f"{name}, paced: {top} lanes x 1 per {PACED_INTERVAL_S:g} s")
    for q in (0.5, 0.95, 0.99):
        cdf.axhline(q, color="grey", lw=0.5)
    cdf.set_xscale("log")
    cdf.set_xlabel(f"latency at {top} lanes, ms (log; all rounds)")
    cdf.set_ylabel("fraction of answers")
    cdf.legend(fontsize=7)
    cdf.set_title("latency CDF (layout: max_batch, workers, ORT threads, max wait)", fontsize=9)
    thr.set_xlabel("concurrent lanes")
    thr.set_ylabel("answers / s (median over rounds)")
    thr.legend(fontsize=7)
    thr.set_title("throughput", fontsize=9)


def run(report: Report, quick: bool) -> None:
    from matcher.service.batching import BatchConfig
    from matcher.service.server import ServerConfig

    seconds = float(os.environ.get("MATCHER_BENCH_SERVICE_SECONDS", 1.5 if quick else 6.0))
    size = int(os.environ.get("MATCHER_BENCH_SERVICE_SIZE", 20_000 if quick else 1_000_000))
    rounds = int(os.environ.get("MATCHER_BENCH_SERVICE_ROUNDS", 2 if quick else 3))
    lane_counts = (1, 8, 32) if quick else (1, 8, 32, 40)
    layouts = QUICK_LAYOUTS if quick else FULL_LAYOUTS
    if os.environ.get("MATCHER_BENCH_SERVICE_LAYOUTS"):
        layouts = tuple(parse_layout(x) for x in
                        os.environ["MATCHER_BENCH_SERVICE_LAYOUTS"].split(","))
    batch = BatchConfig()
    default = Layout(batch.max_batch, batch.workers, ServerConfig.ort_threads,
                     batch.max_wait_s * 1e3)
    if default not in layouts:
        layouts = (*layouts, default)
    report.param(seconds_per_point=seconds, rounds=rounds, lanes=list(lane_counts),
                 layouts=[layout.name for layout in layouts], default_layout=default.name,
                 large_gallery_size=size)
    probes, identities, enrol = _single_face_probes()
    with tempfile.TemporaryDirectory(prefix="bench_service_") as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        contenders = _start_layout_servers(stack, root, layouts, enrol, probes)
        contenders["large gallery"], vectors, ids = _start_large_gallery(
            stack, report, root, size, default, probes, identities, enrol)
        contenders["FaceAnalysis+FAISS"] = _start_baseline(stack, report, vectors, ids,
                                                           probes, identities)
        del vectors
        # Rounds interleave every contender at each lane count (in a rotating order), so
        # a burst of load from elsewhere on the machine hits all of them alike.
        names = list(contenders)
        runs = {name: {n: [] for n in lane_counts} for name in names}
        for round_ in range(rounds):
            for lanes in lane_counts:
                shift = (round_ + lanes) % len(names)
                for name in names[shift:] + names[:shift]:
                    r = contenders[name](lanes, seconds)
                    runs[name][lanes].append(r)
                    log.info("service %s lanes=%d round %d: %s", name, lanes, round_,
                             r.summary())
        paced = _paced(report, contenders, default.name, max(lane_counts), seconds)
    for name, by_lanes in runs.items():
        prefix = {"large gallery": "large", "FaceAnalysis+FAISS": "baseline"}.get(name, name)
        for lanes, rs in by_lanes.items():
            _record(report, f"{prefix}_lanes{lanes}", rs,
                    summary_key=lanes == max(lane_counts) and name in
                    (default.name, "large gallery", "FaceAnalysis+FAISS"))
            failed = sum(r.failed for r in rs)
            answered = sum(r.answered for r in rs)
            matched = sum(r.decisions.get("MATCH", 0) for r in rs)
            errors = functools.reduce(lambda a, b: a + b.errors, rs, collections.Counter())
            report.check(f"{name} lanes={lanes}: no request failed but by shedding",
                         _unshed(errors) == 0, f"{failed} failed of {answered + failed}: "
                         f"{dict(errors)}")
            if name == default.name:  # the small gallery: every probe is a MATCH there
                report.check(f"{name} lanes={lanes}: every probe matched",
                             matched == answered > 0, f"{matched}/{answered}")
            else:
                report.figure(f"{prefix}_lanes{lanes}_match_share",
                              matched / max(answered, 1), "share")
    top = max(lane_counts)
    for lanes in lane_counts:
        # Like for like: the same templates, the same probes, the same rounds.
        ours = [r.throughput for r in runs["large gallery"][lanes]]
        theirs = [r.throughput for r in runs["FaceAnalysis+FAISS"][lanes]]
        report.figure(f"throughput_ratio_service_vs_baseline_lanes{lanes}",
                      [a / max(b, 1e-9) for a, b in zip(ours, theirs, strict=True)], "x",
                      summary=lanes == top,
                      note=f"{size} synthetic + 6 real templates; service over gRPC (default "
                           "layout, gallery's own index) vs FaceAnalysis + FAISS flat "
                           "in-process, same round")
    _plot(report, runs, lane_counts, paced)
