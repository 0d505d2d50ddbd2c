"""Who may call what: bearer tokens per role and the interceptor that checks them.

Roles and the methods they may call (health checking and reflection need no token):

==========  =====================================================================
lane        Identify, Verify, Clear, LaneStream, GetGalleryInfo
enroller    Enroll, EnrollStream, Remove, GetTraveller, GetGalleryInfo
admin       every method, including PublishSnapshot
==========  =====================================================================

Tokens live in a file, one ``role:token`` per line (``#`` starts a comment), several tokens
per role allowed so they can be rotated. A presented token is compared with every known
token using ``hmac.compare_digest``, so the time taken says nothing about how much of it
was right. Tokens are never logged.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..errors import AuthConfigError
from ..transport import SERVICE, is_loopback, split_host_port

log = logging.getLogger(__name__)

ROLES: dict[str, frozenset[str]] = {
    "lane": frozenset({"Identify", "Verify", "Clear", "LaneStream", "GetGalleryInfo"}),
    "enroller": frozenset({"Enroll", "EnrollStream", "Remove", "GetTraveller",
                           "GetGalleryInfo"}),
    "admin": frozenset({"Identify", "Verify", "Clear", "LaneStream", "Enroll", "EnrollStream",
                        "Remove", "GetTraveller", "GetGalleryInfo", "PublishSnapshot"}),
}
# Load balancers and grpcurl must reach these without a token.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class TokenBook:
    """(role, token) pairs; ``role_of`` finds a token's role in constant time per entry."""

    entries: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_file(cls, path: str | Path) -> TokenBook:
        entries = []
        for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            role, sep, token = (part.strip() for part in line.partition(":"))
            if not sep or role not in ROLES:
                raise AuthConfigError(f"{path}:{number}: expected 'role:token' with role one "
                                      f"of {sorted(ROLES)}")
            if len(token) < MIN_TOKEN_CHARS:
                raise AuthConfigError(f"{path}:{number}: a token must have at least "
                                      f"{MIN_TOKEN_CHARS} characters")
            entries.append((role, token.encode()))
        if not entries:
            raise AuthConfigError(f"{path} holds no tokens")
        return cls(tuple(entries))

    def role_of(self, token: str) -> str | None:
        presented = token.encode()
        found = None
        for role, known in self.entries:  # no early exit: every entry is compared
            if hmac.compare_digest(presented, known) and found is None:
                found = role
        return found


def allowed(role: str, method: str) -> bool:
    return method in ROLES.get(role, frozenset())


def _split_method(full: str) -> tuple[str, str]:
    """'/matcher.v1.Matcher/Identify' -> ('matcher.v1.Matcher', 'Identify')."""
    _, service, method = (full.split("/") + ["", ""])[:3]
    return service, method


def _bearer(metadata: tuple | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
                   ) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that only aborts."""
    async def unary(request, context):
        await context.abort(code, details)

    async def streaming(request_iterator, context):
        await context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED when the role may not call."""

    def __init__(self, tokens: TokenBook) -> None:
        self.tokens = tokens

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, method = _split_method(handler_call_details.method)
        if handler is None or service in OPEN_SERVICES:
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        role = self.tokens.role_of(token) if token else None
        if role is None:
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                  "missing or unknown bearer token (metadata "
                                  "'authorization: Bearer <token>')")
        if service != SERVICE or not allowed(role, method):
            return _abort_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                  f"role '{role}' may not call {method}")
        return handler


def check_exposure(listen: str, tls: bool, tokens: TokenBook | None) -> None:
    """Refuse an unsafe setup; warn loudly about an insecure one on loopback."""
    host, _ = split_host_port(listen)
    if is_loopback(host):
        if not tls:
            log.warning("INSECURE: serving without TLS on %s; allowed only because it is a "
                        "loopback address", listen)
        if tokens is None:
            log.warning("INSECURE: no token file; every local caller has the admin role")
        return
    if not tls:
        raise AuthConfigError(f"refusing to serve on non-loopback {listen} without TLS; "
                              "pass --tls-cert and --tls-key")
    if tokens is None:
        raise AuthConfigError(f"refusing to serve on non-loopback {listen} without tokens; "
                              "pass --tokens FILE")
