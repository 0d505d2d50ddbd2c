"""A typed Python client for matcher.v1: deadlines on every call, safe retries, failover.

    with MatcherClient("127.0.0.1:50051", token=...) as client:
        answer = client.identify(image=Path("face.jpg").read_bytes())
        print(answer.decision == pb.MATCH, answer.traveller_id, answer.score)
        # up to 8 frames of one traveller, fused by the server into one probe
        answer = client.verify("T-0001", frames=[frame_1, frame_2, frame_3])
        print(answer.frames_used, [f.status for f in answer.frames])

Several servers (a writer and read replicas): pass a list of addresses, or a target gRPC
resolves to several (``dns:///matcher.internal:50051``). What a lane gets from it
(docs/service.md#failover):

* Round robin over the servers that report SERVING for lane traffic (gRPC's client-side
  health checking on ``matcher.v1.Matcher.lanes``): a server that is loading, draining
  (SIGTERM) or a replica whose snapshot is too old is skipped at once.
* A dead server: its calls fail UNAVAILABLE and gRPC retries them on another server
  (reads only: Identify, Verify, Clear, GetTraveller, GetGalleryInfo; at most 3 attempts
  within the call's deadline). Writes are never retried behind your back.
* A stalled server: a read still unanswered after twice the 95th percentile of recent
  answers is sent again to another server (matcher.hedging); keepalive pings every 2 s drop the
  stalled connection within ~4 s, and the server is used again once it answers its
  health check.
* When no server is fit for lanes (every replica stale and the writer down), reads go to
  any server that still answers: a stale answer beats none.
* ``writer=ADDRESS``: writes (Enroll, Remove, PublishSnapshot) go to that server only;
  while it is down they fail with UNAVAILABLE naming it (WriterUnavailable).

numpy is optional: without it, templates are sequences of floats and aligned faces
encoded images.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .hedging import HedgeDelay, HedgePolicy, hedged_call
from .transport import (
    CLIENT_OPTIONS,
    LANE_HEALTH_SERVICE,
    MAX_REQUEST_BYTES,
    SERVICE,
    channel_credentials,
)
from .v1 import matcher_pb2 as pb
from .v1 import matcher_pb2_grpc as pb_grpc

try:  # optional: only for aligned-face arrays and template arrays
    import numpy as np
except ImportError:  # the matcher-client distribution without numpy
    np = None  # type: ignore[assignment]  # every numpy use is behind a check for None

DEFAULT_TIMEOUT_S = 5.0
READS = ("Identify", "Verify", "Clear", "GetTraveller", "GetGalleryInfo")
WRITES = ("Enroll", "EnrollStream", "Remove", "PublishSnapshot")
LANES_DOWN_RECHECK_S = 1.0


def service_config(health_service: str | None = LANE_HEALTH_SERVICE) -> dict:
    """The channel's service config: round robin over the servers that report SERVING for
    ``health_service`` (None: no health checking), reads retried on UNAVAILABLE and
    RESOURCE_EXHAUSTED (another server may answer), writes never.

    No retryThrottling: it stops every retry once half the recent calls failed, which is
    exactly what the calls in flight on a server that just died look like; the attempts
    stay bounded (3 per attempt, matcher.hedging's max_attempts per call)."""
    config: dict = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": SERVICE, "method": m} for m in READS],
            "retryPolicy": {
                "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }],
    }
    if health_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return config


SERVICE_CONFIG = service_config()


def channel_options(health_service: str | None = LANE_HEALTH_SERVICE
                    ) -> tuple[tuple[str, object], ...]:
    """Channel arguments: the service config, retries, and the keepalive and message sizes
    of matcher.transport.CLIENT_OPTIONS (which the server's enforcement accepts)."""
    return (
        ("grpc.service_config", json.dumps(service_config(health_service))),
        ("grpc.enable_retries", 1),
        # Retries need the request kept: the default 256 KiB would commit every call
        # carrying a photo larger than that to its first server.
        ("grpc.per_rpc_retry_buffer_size", MAX_REQUEST_BYTES),
        *CLIENT_OPTIONS,
    )


CHANNEL_OPTIONS = channel_options()


class WriterUnavailable(grpc.RpcError):
    """A write could not reach the writer: UNAVAILABLE, with the writer named."""

    def __init__(self, writer: str, cause: grpc.RpcError) -> None:
        super().__init__()
        self.writer = writer
        self.cause = cause

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return (f"the writer {self.writer} is unavailable ({self.cause.details()}); reads go "
                f"on from the replicas; send the write again once the writer is back "
                f"(Enroll and Remove are idempotent)")

    def __str__(self) -> str:
        return f"UNAVAILABLE: {self.details()}"


def target_for(addresses: str | Sequence[str]) -> str:
    """One address passes through; several become an ``ipv4:a,b`` list for round robin."""
    if isinstance(addresses, str):
        return addresses
    if len(addresses) == 1:
        return addresses[0]
    return "ipv4:" + ",".join(addresses)


def make_probe(image: bytes | None = None, aligned: bytes | np.ndarray | None = None,
               template: np.ndarray | Sequence[float] | None = None,
               model_id: str = "") -> pb.Probe:
    """Exactly one of: encoded photo bytes; an aligned face ((112, 112, 3) uint8 RGB array,
    or an encoded 112x112 image); a template ((512,) float32, L2-normalised)."""
    given = [x is not None for x in (image, aligned, template)]
    if sum(given) != 1:
        raise ValueError("give exactly one of image, aligned or template")
    if image is not None:
        return pb.Probe(image=bytes(image))
    if aligned is not None:
        if np is not None and isinstance(aligned, np.ndarray):
            if aligned.dtype != np.uint8 or aligned.shape != (112, 112, 3):
                raise ValueError(f"an aligned face array must be (112, 112, 3) uint8, got: "
                                 f"shape={aligned.shape}, dtype={aligned.dtype}")
            return pb.Probe(aligned=pb.AlignedFace(data=np.ascontiguousarray(aligned).tobytes(),
                                                   format=pb.AlignedFace.RAW_RGB))
        return pb.Probe(aligned=pb.AlignedFace(data=bytes(aligned),
                                               format=pb.AlignedFace.ENCODED))
    if np is not None:
        values = np.asarray(template, dtype=np.float32).reshape(-1).tolist()
    else:
        values = [float(v) for v in template]
    return pb.Probe(template=pb.Template(values=values, model_id=model_id))


def make_frames(frames: Sequence[bytes | pb.Probe]) -> list[pb.Probe]:
    """Frames of one traveller: encoded photos (bytes) or ready Probes (aligned faces,
    templates: see make_probe). The server takes 1 to 8."""
    if isinstance(frames, (bytes, bytearray)) or not len(frames):
        raise ValueError("frames is a non-empty sequence of photos (bytes) or Probes")
    return [f if isinstance(f, pb.Probe) else make_probe(image=f) for f in frames]


def _probe_fields(image, aligned, template, frames) -> dict:
    """The request fields for one probe (``probe``) or several frames (``frames``)."""
    if frames is None:
        return {"probe": make_probe(image, aligned, template)}
    if any(x is not None for x in (image, aligned, template)):
        raise ValueError("give frames, or one of image, aligned or template; not both")
    return {"frames": make_frames(frames)}


def make_document(document: bytes | pb.Document) -> pb.Document:
    """A travel document's portrait for Verify and Clear: a DG2 exactly as read from the
    chip (bytes starting with tag 0x75, or a bare ISO/IEC 19794-5 ``FAC`` record), else
    the portrait image a chip reader already unpacked (JPEG 2000, JPEG, ...); or a ready
    Document message."""
    if isinstance(document, pb.Document):
        return document
    data = bytes(document)
    if data[:1] == b"\x75" or data.startswith(b"FAC\x00"):
        return pb.Document(dg2=data)
    return pb.Document(image=data)


def _document_fields(document: bytes | pb.Document | None) -> dict:
    return {} if document is None else {"document": make_document(document)}


def _timestamp(t: datetime | float | None):
    from google.protobuf.timestamp_pb2 import Timestamp

    if t is None:
        return None
    ts = Timestamp()
    seconds = t.timestamp() if isinstance(t, datetime) else float(t)
    ts.FromNanoseconds(int(round(seconds * 1e9)))
    return ts


class MatcherClient:
    """Blocking client; thread-safe (channels shared by every thread).

    ``writer``: the writer's address; writes go there only (else over the same round
    robin as reads, where a replica refuses them). ``hedge``: the hedging policy for
    reads (None: no hedging, one attempt plus gRPC's retries).
    """

    def __init__(self, target: str | Sequence[str], *, token: str | None = None,
                 ca: str | Path | None = None, cert: str | Path | None = None,
                 key: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 lane_id: str = "", server_name: str | None = None,
                 writer: str | None = None,
                 hedge: HedgePolicy | None = HedgePolicy()) -> None:
        address = target_for(target)
        tls = ca is not None or cert is not None
        self._credentials = channel_credentials(ca, cert, key) if tls else None
        self._server_name = server_name
        # Lane traffic: only servers fit for lanes. The plain channel: any server that
        # answers (health checks, the last-one-standing fallback, writes).
        self.channel = self._open(address, LANE_HEALTH_SERVICE)
        self._plain = self._open(address, None)
        self.stub = pb_grpc.MatcherStub(self.channel)
        self._plain_stub = pb_grpc.MatcherStub(self._plain)
        self._health = health_pb2_grpc.HealthStub(self._plain)
        self.writer = writer
        self._writer_channel = self._open(writer, None) if writer else None
        self._write_stub = (pb_grpc.MatcherStub(self._writer_channel) if writer
                            else self._plain_stub)
        self.timeout = timeout
        self.lane_id = lane_id
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.hedge = HedgeDelay(hedge) if hedge is not None else None
        # After the lane channel answered UNAVAILABLE (no server fit for lanes, e.g. every
        # replica stale and the writer down), reads go to any server that answers until
        # this time.monotonic() instant; then one read tries the lane channel again.
        self._lanes_down_until = 0.0

    def _open(self, address: str, health_service: str | None) -> grpc.Channel:
        options = list(channel_options(health_service))
        if self._server_name:  # the name in the server certificate, when dialing by IP
            options.append(("grpc.ssl_target_name_override", self._server_name))
        if self._credentials is not None:
            return grpc.secure_channel(address, self._credentials, options=options)
        return grpc.insecure_channel(address, options=options)

    def close(self) -> None:
        for channel in (self.channel, self._plain, self._writer_channel):
            if channel is not None:
                channel.close()

    def __enter__(self) -> MatcherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kw(self, timeout: float | None) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.metadata}

    def read(self, method: str, request, timeout: float | None = None):
        """Send ``request`` (a message of the read ``method``, e.g. "Identify"): on a server
        fit for lanes (any that answers when none is), hedged, retried elsewhere."""
        if method not in READS:
            raise ValueError(f"{method} is not a read; reads are {READS}")
        timeout = self.timeout if timeout is None else timeout

        def start(remaining: float, elsewhere: bool) -> grpc.Future:
            now = time.monotonic()
            if elsewhere:
                self._lanes_down_until = now + LANES_DOWN_RECHECK_S
            stub = self._plain_stub if now < self._lanes_down_until else self.stub
            return getattr(stub, method).future(request, timeout=remaining,
                                                metadata=self.metadata)

        if self.hedge is None:
            deadline = time.monotonic() + timeout
            try:
                return start(timeout, False).result()
            except grpc.RpcError as exc:
                remaining = deadline - time.monotonic()
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or remaining <= 0:
                    raise
                return start(remaining, True).result()  # the last one standing
        return hedged_call(start, timeout, self.hedge)

    def _write(self, method: str, request, timeout: float | None):
        try:
            return getattr(self._write_stub, method)(request, **self._kw(timeout))
        except grpc.RpcError as exc:
            if self.writer and exc.code() is grpc.StatusCode.UNAVAILABLE:
                raise WriterUnavailable(self.writer, exc) from None
            raise

    # -- matching -------------------------------------------------------------------
    # Each takes one probe (image, aligned or template) or ``frames``: 1 to 8 photos
    # (bytes) or Probes of one traveller, fused by the server into one probe.

    def identify(self, image: bytes | None = None, *, aligned=None, template=None,
                 frames: Sequence[bytes | pb.Probe] | None = None, top_k: int = 0,
                 all_faces: bool = False, request_id: str = "",
                 timeout: float | None = None) -> pb.MatchResponse:
        return self.read("Identify", pb.IdentifyRequest(
            **_probe_fields(image, aligned, template, frames), top_k=top_k,
            all_faces=all_faces, request_id=request_id, lane_id=self.lane_id), timeout)

    def verify(self, traveller_id: str, image: bytes | None = None, *, aligned=None,
               template=None, frames: Sequence[bytes | pb.Probe] | None = None,
               document: bytes | pb.Document | None = None,
               request_id: str = "", timeout: float | None = None) -> pb.MatchResponse:
        """Against the booking ``traveller_id``; or, with ``document`` (a DG2 or the
        portrait: see make_document) and ``traveller_id`` "", against the document."""
        return self.read("Verify", pb.VerifyRequest(
            **_probe_fields(image, aligned, template, frames), traveller_id=traveller_id,
            **_document_fields(document), request_id=request_id, lane_id=self.lane_id),
            timeout)

    def clear(self, claimed_traveller_id: str, image: bytes | None = None, *, aligned=None,
              template=None, frames: Sequence[bytes | pb.Probe] | None = None,
              document: bytes | pb.Document | None = None,
              top_k: int = 0, request_id: str = "", timeout: float | None = None
              ) -> pb.MatchResponse:
        """The e-gate flow; with ``document`` the face must match it first
        (``checks_passed`` in the answer)."""
        return self.read("Clear", pb.ClearRequest(
            **_probe_fields(image, aligned, template, frames),
            claimed_traveller_id=claimed_traveller_id, **_document_fields(document),
            top_k=top_k, request_id=request_id, lane_id=self.lane_id), timeout)

    def lane_stream(self, requests: Iterable[pb.LaneRequest], timeout: float | None = None
                    ) -> Iterator[pb.LaneResponse]:
        """Send LaneRequests on one stream; yields LaneResponses as they come (any order).
        ``timeout`` bounds the whole stream (None: no deadline)."""
        return self.stub.LaneStream(iter(requests), timeout=timeout, metadata=self.metadata)

    # -- gallery --------------------------------------------------------------------

    def enroll_request(self, traveller_id: str, photos: Sequence[bytes | pb.Probe], *,
                       valid_from: datetime | float | None = None,
                       valid_to: datetime | float | None = None,
                       accept_low_quality: bool = False, request_id: str = ""
                       ) -> pb.EnrollRequest:
        req = pb.EnrollRequest(
            traveller_id=traveller_id,
            photos=[p if isinstance(p, pb.Probe) else make_probe(image=p) for p in photos],
            accept_low_quality=accept_low_quality, request_id=request_id)
        if valid_from is not None:
            req.valid_from.CopyFrom(_timestamp(valid_from))
        if valid_to is not None:
            req.valid_to.CopyFrom(_timestamp(valid_to))
        return req

    def enroll(self, traveller_id: str, photos: Sequence[bytes | pb.Probe], *,
               valid_from: datetime | float | None = None,
               valid_to: datetime | float | None = None, accept_low_quality: bool = False,
               request_id: str = "", timeout: float | None = None) -> pb.EnrollResponse:
        """Enrol photos (encoded bytes, or Probes); returns once durable on the server."""
        return self._write("Enroll", self.enroll_request(
            traveller_id, photos, valid_from=valid_from, valid_to=valid_to,
            accept_low_quality=accept_low_quality, request_id=request_id), timeout)

    def enroll_stream(self, requests: Iterable[pb.EnrollRequest],
                      timeout: float | None = None) -> Iterator[pb.EnrollResponse]:
        """Bulk enrolment: one response per request, in order; errors per item."""
        return self._write_stub.EnrollStream(iter(requests), timeout=timeout,
                                             metadata=self.metadata)

    def remove(self, traveller_id: str, request_id: str = "",
               timeout: float | None = None) -> pb.RemoveResponse:
        return self._write("Remove", pb.RemoveRequest(traveller_id=traveller_id,
                                                      request_id=request_id), timeout)

    def get_traveller(self, traveller_id: str, timeout: float | None = None
                      ) -> pb.TravellerInfo:
        return self.read("GetTraveller", pb.GetTravellerRequest(traveller_id=traveller_id),
                          timeout)

    def gallery_info(self, timeout: float | None = None) -> pb.GalleryInfo:
        return self.read("GetGalleryInfo", pb.GetGalleryInfoRequest(), timeout)

    def publish_snapshot(self, timeout: float | None = 120.0) -> pb.PublishSnapshotResponse:
        return self._write("PublishSnapshot", pb.PublishSnapshotRequest(), timeout)

    # -- health ---------------------------------------------------------------------

    def health(self, service: str = "", timeout: float | None = None) -> int:
        """health_pb2.HealthCheckResponse.SERVING (1) or NOT_SERVING (2)."""
        return self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=self.timeout if timeout is None else timeout).status

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Block until the server reports SERVING (models and gallery loaded); waits for
        the server to come up at all, too (health Watch stream with wait_for_ready)."""
        stream = self._health.Watch(health_pb2.HealthCheckRequest(service=""),
                                    timeout=timeout, wait_for_ready=True)
        try:
            for update in stream:
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"server not SERVING after {timeout:.0f} s") from None
            raise
        finally:
            stream.cancel()
        raise ConnectionError("the server closed its health stream before SERVING")
