"""How client and server reach each other: the service name, addresses, TLS credentials.

Shared by the client and the server side, so the client never imports the server.
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
