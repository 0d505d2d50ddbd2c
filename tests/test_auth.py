"""Access control: tokens per role over mutual TLS on a real server, and the exposure rules."""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import CALLS, ServerThread, server_config

from matcher.client import MatcherClient
from matcher.errors import AuthConfigError
from matcher.service.auth import ROLES, TokenBook, check_exposure
from matcher.service.server import ServerConfig
from matcher.v1 import matcher_pb2 as pb

TOKENS = {"lane": "lane-token-0123456789abcdef", "enroller": "enroller-token-0123456789ab",
          "admin": "admin-token-0123456789abcdef"}


def _pki_module():
    # The reliability suite's throwaway PKI (made at test time with `cryptography`).
    path = Path(__file__).parent / "reliability" / "_pki.py"
    spec = importlib.util.spec_from_file_location("matcher_test_pki", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _pki_module().make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("# role:token\n" + "".join(f"{r}:{t}\n" for r, t in TOKENS.items()))
    return path


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pipeline, pki, token_file):
    config = server_config(tmp_path_factory.mktemp("auth"), tls_cert=pki.server.cert_path,
                           tls_key=pki.server.key_path, tls_client_ca=pki.ca.cert_path,
                           tokens_file=token_file)
    with ServerThread(config, pipeline) as srv:
        unit = np.zeros(512, np.float32)
        unit[3] = 1.0
        with _client(srv, pki, "admin") as admin:  # something to publish
            admin.enroll("someone", [pb.Probe(template=pb.Template(values=unit.tolist()))])
        yield srv


def _client(srv, pki, role: str | None, *, cert=True) -> MatcherClient:
    return MatcherClient(srv.address, token=TOKENS.get(role) if role else None,
                         ca=pki.ca.cert_path, cert=pki.client.cert_path if cert else None,
                         key=pki.client.key_path if cert else None, timeout=20.0)


def _outcome(client: MatcherClient, method: str) -> grpc.StatusCode:
    try:
        CALLS[method](client.stub, {"metadata": client.metadata, "timeout": 60})
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_of_the_service_is_assigned_to_roles():
    methods = set(pb.DESCRIPTOR.services_by_name["Matcher"].methods_by_name)
    assert methods == set(CALLS) == set(ROLES["admin"])
    assert ROLES["lane"] >= {"Identify", "Verify", "Clear", "LaneStream"}
    assert ROLES["enroller"] >= {"Enroll", "EnrollStream", "Remove"}
    assert not ROLES["lane"] & {"Enroll", "EnrollStream", "Remove", "PublishSnapshot"}
    assert not ROLES["enroller"] & {"Identify", "Verify", "Clear", "LaneStream",
                                    "PublishSnapshot"}


@pytest.mark.parametrize("role", sorted(TOKENS))
def test_each_role_may_call_exactly_its_methods(mtls_server, pki, role):
    with _client(mtls_server, pki, role) as client:
        for method in sorted(CALLS):
            outcome = _outcome(client, method)
            if method in ROLES[role]:
                assert outcome not in (grpc.StatusCode.PERMISSION_DENIED,
                                       grpc.StatusCode.UNAUTHENTICATED), (role, method, outcome)
            else:
                assert outcome == grpc.StatusCode.PERMISSION_DENIED, (role, method, outcome)


def test_missing_wrong_or_malformed_tokens_are_unauthenticated(mtls_server, pki):
    with _client(mtls_server, pki, None) as anonymous:
        for method in CALLS:
            assert _outcome(anonymous, method) == grpc.StatusCode.UNAUTHENTICATED, method
    with _client(mtls_server, pki, None) as client:
        for metadata in ((("authorization", "Bearer " + TOKENS["admin"][:-1] + "X"),),
                         (("authorization", "Basic " + TOKENS["admin"]),),
                         (("authorization", TOKENS["admin"]),)):
            with pytest.raises(grpc.RpcError) as info:
                client.stub.GetGalleryInfo(pb.GetGalleryInfoRequest(), metadata=metadata,
                                           timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKENS["admin"] not in info.value.details()


def test_health_and_reflection_need_no_token(mtls_server, pki):
    with _client(mtls_server, pki, None) as client:
        assert client.health() == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        answers = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20))
        assert "matcher.v1.Matcher" in {s.name for s in
                                        answers[0].list_services_response.service}


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(mtls_server, pki):
    def health_code(channel: grpc.Channel) -> grpc.StatusCode:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=60)
        except grpc.RpcError as exc:
            return exc.code()
        finally:
            channel.close()
        return grpc.StatusCode.OK

    addr = mtls_server.address
    creds = {
        "trusted": grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert),
        "no client cert": grpc.ssl_channel_credentials(pki.ca.cert),
        "rogue CA": grpc.ssl_channel_credentials(pki.ca.cert, pki.rogue_client.key,
                                                 pki.rogue_client.cert),
        "expired": grpc.ssl_channel_credentials(pki.ca.cert, pki.expired_client.key,
                                                pki.expired_client.cert),
    }
    outcomes = {name: health_code(grpc.secure_channel(addr, c)) for name, c in creds.items()}
    outcomes["plaintext"] = health_code(grpc.insecure_channel(addr))
    assert outcomes["trusted"] == grpc.StatusCode.OK
    for name in ("no client cert", "rogue CA", "expired", "plaintext"):
        assert outcomes[name] == grpc.StatusCode.UNAVAILABLE, name


def test_server_only_tls_with_a_lane_token(tmp_path, pipeline, pki, token_file):
    config = server_config(tmp_path, tls_cert=pki.server.cert_path,
                           tls_key=pki.server.key_path, tokens_file=token_file)
    with ServerThread(config, pipeline) as srv:
        with MatcherClient(srv.address, token=TOKENS["lane"], ca=pki.ca.cert_path,
                           timeout=20) as lane:
            assert lane.gallery_info().role == "writer"
            assert _outcome(lane, "Enroll") == grpc.StatusCode.PERMISSION_DENIED
        with MatcherClient(srv.address, token=TOKENS["lane"], ca=pki.rogue_ca.cert_path,
                           timeout=60) as fooled:
            assert _outcome(fooled, "GetGalleryInfo") == grpc.StatusCode.UNAVAILABLE


# -- configuration rules ------------------------------------------------------------------

def test_token_file_parsing(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# comment\nlane: aaaaaaaaaaaaaaaaaaaa  \n\nadmin:bbbbbbbbbbbbbbbbbbbb # x\n"
                    "lane:cccccccccccccccccccc\n")
    book = TokenBook.from_file(good)
    assert book.role_of("aaaaaaaaaaaaaaaaaaaa") == "lane"
    assert book.role_of("cccccccccccccccccccc") == "lane"
    assert book.role_of("bbbbbbbbbbbbbbbbbbbb") == "admin"
    assert book.role_of("bbbbbbbbbbbbbbbbbbb") is None and book.role_of("") is None
    for text, problem in (("root:aaaaaaaaaaaaaaaaaaaa\n", "role"),
                          ("lane aaaaaaaaaaaaaaaaaaaa\n", "role:token"),
                          ("lane:short\n", "at least"), ("# nothing\n", "no tokens")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(AuthConfigError, match=problem):
            TokenBook.from_file(bad)


def test_exposure_rules(caplog):
    book = TokenBook((("admin", b"x" * 20),))
    with pytest.raises(AuthConfigError, match="without TLS"):
        check_exposure("0.0.0.0:50051", tls=False, tokens=book)
    with pytest.raises(AuthConfigError, match="without tokens"):
        check_exposure("10.1.2.3:50051", tls=True, tokens=None)
    check_exposure("10.1.2.3:50051", tls=True, tokens=book)
    with caplog.at_level(logging.WARNING, logger="matcher.service.auth"):
        check_exposure("127.0.0.1:50051", tls=False, tokens=None)
    assert "INSECURE" in caplog.text and "loopback" in caplog.text
    with pytest.raises(AuthConfigError):
        ServerConfig(tls_cert=Path("x.crt"))          # a certificate without its key
    with pytest.raises(AuthConfigError):
        ServerConfig(role="replica")                  # a replica without a snapshot folder
