"""How client and server reach each other: the service name, addresses, TLS credentials,
message sizes and keepalive.

Shared by the client and the server side, so the client never imports the server, and
the two sides' limits and keepalive settings are written down once, side by side.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from .errors import AuthConfigError

SERVICE = "matcher.v1.Matcher"
DEFAULT_LISTEN = "127.0.0.1:50051"
# The health-check name a server reports SERVING under only while it is fit for lane
# traffic: loaded, not draining, and (a replica) its snapshot not older than the
# configured age. SERVICE (and "") stay SERVING while a stale replica still answers, so a
# client can fall back to it when no server is fit (docs/service.md#failover).
LANE_HEALTH_SERVICE = "matcher.v1.Matcher.lanes"

# Keepalive, agreed by both sides. The client pings every KEEPALIVE_TIME_MS, also on an
# idle connection, and drops a connection whose server has not answered a ping within
# KEEPALIVE_TIMEOUT_MS: a stalled server (stopped process, paused VM) is noticed within
# about 4 s, its calls go to another server (reads are retried) and it is not picked
# again until it answers its health check. The server accepts pings this often.
KEEPALIVE_TIME_MS = 2_000
KEEPALIVE_TIMEOUT_MS = 2_000
MIN_PING_INTERVAL_MS = 1_000
# The server pings an idle connection this often and drops it if no answer comes in time.
SERVER_KEEPALIVE_TIME_MS = 30_000
SERVER_KEEPALIVE_TIMEOUT_MS = 10_000
# Pings more often than MIN_PING_INTERVAL_MS this many times in a row: the server sends
# GOAWAY (too_many_pings).
MAX_PING_STRIKES = 2

# Caps on what a request carries (docs/service.md#message-sizes):
# - a photo (probe, frame, booking photo, document) at most MAX_PHOTO_BYTES, checked by
#   the decoder (face/decode.DecodeLimits.max_bytes, held equal by a test), INVALID_ARGUMENT
#   naming the cap and the photo;
# - the photos of one request together at most MAX_REQUEST_PHOTO_BYTES: an Enroll of 16
#   booking photos or an Identify of 8 frames is several photos, but a 20 MB each of them
#   would hold 320 MB per call; the servicer checks it, INVALID_ARGUMENT naming the cap;
# - the message at most MAX_REQUEST_BYTES (those photos plus framing), refused by gRPC
#   before it is buffered (RESOURCE_EXHAUSTED, gRPC's message names the byte limit).
# Answers are small.
MAX_PHOTO_BYTES = 20 * 1024 * 1024
MAX_REQUEST_PHOTO_BYTES = 64 * 1024 * 1024
MAX_REQUEST_BYTES = MAX_REQUEST_PHOTO_BYTES + 1024 * 1024
MAX_RESPONSE_BYTES = 4 * 1024 * 1024

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
    ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # (The name of this argument in the gRPC core; a misspelt one is silently ignored and
    # the default, 5 minutes, would answer a client's keepalive with GOAWAY too_many_pings.)
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    # Two servers on one port would split traffic silently; fail the bind instead.
    ("grpc.so_reuseport", 0),
)

# The client's half: keepalive the server's enforcement (SERVER_OPTIONS) accepts, also on
# an idle LaneStream, and the same message sizes seen from the other end.
CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # The gRPC core waits this long for any ping's answer (keepalive's included);
    # its default is a minute, which would leave a stalled server in rotation.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted server is back in rotation within 2 s (default backoff: up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise AuthConfigError(f"listen address must be HOST:PORT, got {address!r}")
    return host, int(port)


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:
    """TLS from PEM files; with ``client_ca``, mutual TLS: clients must present a
    certificate signed by that CA."""
    try:
        pair = (Path(key).read_bytes(), Path(cert).read_bytes())
        ca = Path(client_ca).read_bytes() if client_ca else None
    except OSError as exc:
        raise AuthConfigError(f"cannot read TLS file: {exc}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """Client side: trust ``ca`` (system roots if None); ``cert`` + ``key`` for mTLS."""
    if (cert is None) != (key is None):
        raise AuthConfigError("a client certificate needs its key, and a key its certificate")
    try:
        return grpc.ssl_channel_credentials(
            Path(ca).read_bytes() if ca else None,
            Path(key).read_bytes() if key else None,
            Path(cert).read_bytes() if cert else None)
    except OSError as exc:
        raise AuthConfigError(f"cannot read TLS file: {exc}") from None
