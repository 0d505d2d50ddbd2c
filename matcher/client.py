"""A typed Python client for matcher.v1: deadlines on every call, safe retries, round robin.

    with MatcherClient("127.0.0.1:50051", token=...) as client:
        answer = client.identify(image=Path("face.jpg").read_bytes())
        print(answer.decision == pb.MATCH, answer.traveller_id, answer.score)
        # up to 8 frames of one traveller, fused by the server into one probe
        answer = client.verify("T-0001", frames=[frame_1, frame_2, frame_3])
        print(answer.frames_used, [f.status for f in answer.frames])

Several servers (a writer and read replicas): pass a list of addresses, or a target gRPC
resolves to several (``dns:///matcher.internal:50051``); calls are spread with gRPC's own
client-side ``round_robin`` policy, and a server that goes away is skipped.

Retries: gRPC retries only UNAVAILABLE (server starting, draining or gone) and only for
calls that change nothing (Identify, Verify, Clear, GetTraveller, GetGalleryInfo), at
most 3 attempts within the call's deadline. Writes are never retried behind your back.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .transport import SERVICE, channel_credentials
from .v1 import matcher_pb2 as pb
from .v1 import matcher_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 5.0
_READS = ("Identify", "Verify", "Clear", "GetTraveller", "GetGalleryInfo")
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": SERVICE, "method": m} for m in _READS],
        "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}
# Matches the server's keepalive enforcement (matcher.service.server): pings every 20 s are
# welcome, also on an idle LaneStream; a dead server is noticed within ~30 s.
CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 21 * 1024 * 1024),
)


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
        if isinstance(aligned, np.ndarray):
            if aligned.dtype != np.uint8 or aligned.shape != (112, 112, 3):
                raise ValueError(f"an aligned face array must be (112, 112, 3) uint8, got: "
                                 f"shape={aligned.shape}, dtype={aligned.dtype}")
            return pb.Probe(aligned=pb.AlignedFace(data=np.ascontiguousarray(aligned).tobytes(),
                                                   format=pb.AlignedFace.RAW_RGB))
        return pb.Probe(aligned=pb.AlignedFace(data=bytes(aligned),
                                               format=pb.AlignedFace.ENCODED))
    values = np.asarray(template, dtype=np.float32).reshape(-1)
    return pb.Probe(template=pb.Template(values=values.tolist(), model_id=model_id))


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


def _timestamp(t: datetime | float | None):
    from google.protobuf.timestamp_pb2 import Timestamp

    if t is None:
        return None
    ts = Timestamp()
    seconds = t.timestamp() if isinstance(t, datetime) else float(t)
    ts.FromNanoseconds(int(round(seconds * 1e9)))
    return ts


class MatcherClient:
    """Blocking client; thread-safe (one channel shared by every thread)."""

    def __init__(self, target: str | Sequence[str], *, token: str | None = None,
                 ca: str | Path | None = None, cert: str | Path | None = None,
                 key: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 lane_id: str = "", server_name: str | None = None) -> None:
        options = list(CHANNEL_OPTIONS)
        if server_name:  # the name in the server certificate, when dialing by IP
            options.append(("grpc.ssl_target_name_override", server_name))
        address = target_for(target)
        if ca is not None or cert is not None:
            self.channel = grpc.secure_channel(address, channel_credentials(ca, cert, key),
                                               options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.MatcherStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.lane_id = lane_id
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "MatcherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kw(self, timeout: float | None) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.metadata}

    # -- matching -------------------------------------------------------------------
    # Each takes one probe (image, aligned or template) or ``frames``: 1 to 8 photos
    # (bytes) or Probes of one traveller, fused by the server into one probe.

    def identify(self, image: bytes | None = None, *, aligned=None, template=None,
                 frames: Sequence[bytes | pb.Probe] | None = None, top_k: int = 0,
                 all_faces: bool = False, request_id: str = "",
                 timeout: float | None = None) -> pb.MatchResponse:
        return self.stub.Identify(pb.IdentifyRequest(
            **_probe_fields(image, aligned, template, frames), top_k=top_k,
            all_faces=all_faces, request_id=request_id, lane_id=self.lane_id),
            **self._kw(timeout))

    def verify(self, traveller_id: str, image: bytes | None = None, *, aligned=None,
               template=None, frames: Sequence[bytes | pb.Probe] | None = None,
               request_id: str = "", timeout: float | None = None) -> pb.MatchResponse:
        return self.stub.Verify(pb.VerifyRequest(
            **_probe_fields(image, aligned, template, frames), traveller_id=traveller_id,
            request_id=request_id, lane_id=self.lane_id), **self._kw(timeout))

    def clear(self, claimed_traveller_id: str, image: bytes | None = None, *, aligned=None,
              template=None, frames: Sequence[bytes | pb.Probe] | None = None,
              top_k: int = 0, request_id: str = "", timeout: float | None = None
              ) -> pb.MatchResponse:
        return self.stub.Clear(pb.ClearRequest(
            **_probe_fields(image, aligned, template, frames),
            claimed_traveller_id=claimed_traveller_id, top_k=top_k, request_id=request_id,
            lane_id=self.lane_id), **self._kw(timeout))

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
        return self.stub.Enroll(self.enroll_request(
            traveller_id, photos, valid_from=valid_from, valid_to=valid_to,
            accept_low_quality=accept_low_quality, request_id=request_id),
            **self._kw(timeout))

    def enroll_stream(self, requests: Iterable[pb.EnrollRequest],
                      timeout: float | None = None) -> Iterator[pb.EnrollResponse]:
        """Bulk enrolment: one response per request, in order; errors per item."""
        return self.stub.EnrollStream(iter(requests), timeout=timeout, metadata=self.metadata)

    def remove(self, traveller_id: str, request_id: str = "",
               timeout: float | None = None) -> pb.RemoveResponse:
        return self.stub.Remove(pb.RemoveRequest(traveller_id=traveller_id,
                                                 request_id=request_id), **self._kw(timeout))

    def get_traveller(self, traveller_id: str, timeout: float | None = None
                      ) -> pb.TravellerInfo:
        return self.stub.GetTraveller(pb.GetTravellerRequest(traveller_id=traveller_id),
                                      **self._kw(timeout))

    def gallery_info(self, timeout: float | None = None) -> pb.GalleryInfo:
        return self.stub.GetGalleryInfo(pb.GetGalleryInfoRequest(), **self._kw(timeout))

    def publish_snapshot(self, timeout: float | None = 120.0) -> pb.PublishSnapshotResponse:
        return self.stub.PublishSnapshot(pb.PublishSnapshotRequest(), **self._kw(timeout))

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
