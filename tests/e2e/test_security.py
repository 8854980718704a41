"""Security end to end: TLS and mutual TLS on gRPC and HTTP, API keys (gRPC
UNAUTHENTICATED, HTTP 401 through the openai client), health open, reflection
off, the warning for an exposed address, `specserve generate` against a
secured server, bad files refused naming the file, and a Ray started by the
executor listening on loopback only. Fake engines: no model loads. The
certificates are made here, by a throwaway CA."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl

import urllib.error
import urllib.request

import grpc
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specserve.config import EngineConfig
from specserve.engine import cli
from specserve.engine.grpc_convert import pb, pb_grpc
from specserve.engine.security import (Security, bearer_ok, client_channel, is_loopback,
                                       load_api_keys)
from specserve.engine.server import BackgroundServer
from tests.fake_engine import FakeEngine, FakeTokenizer, expected_tokens

KEY = "sk-test-right"
MODEL = "specserve-default"


# -- a throwaway CA ---------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
           server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert: x509.Certificate | None = None, key=None) -> str:
    data = cert.public_bytes(serialization.Encoding.PEM) if cert is not None else key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files: ca, server cert/key (localhost, 127.0.0.1), client cert/key, other_key."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("specserve test CA", ca_key, _name("specserve test CA"), ca_key, ca=True)
    files = {"ca": _write(d / "ca.pem", ca)}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[who + "_cert"] = _write(d / f"{who}.pem", _issue(who, key, ca.subject, ca_key,
                                                               server=who == "server"))
        files[who + "_key"] = _write(d / f"{who}.key", key=key)
    files["other_key"] = _write(d / "other.key", key=ec.generate_private_key(ec.SECP256R1()))
    return files


def _start(security: Security, host: str = "127.0.0.1", http: bool = False) -> BackgroundServer:
    return BackgroundServer(EngineConfig.from_kwargs(), host=host, port=0, engine_factory=FakeEngine,
                            http_port=0 if http else None, security=security).start()


def _generate(channel, prompt: str = "hi", **kwargs) -> str:
    req = pb.GenerateRequest(text=prompt, sampling_params=pb.SamplingParams(max_tokens=4))
    return "".join(r.text for r in pb_grpc.GenerationStub(channel).Generate(req, timeout=10,
                                                                             **kwargs))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _reflect(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    [resp] = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
    return [s.name for s in resp.list_services_response.service]


# -- TLS and a key ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(pki):
    srv = _start(Security(tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                          api_keys=(KEY, "sk-second")), http=True)
    yield srv
    srv.stop()


def test_tls_with_the_right_key_serves(secured, pki):
    with client_channel(secured.address, tls_ca=pki["ca"], api_key=KEY) as ch:
        assert _generate(ch) == FakeTokenizer().decode(expected_tokens([0, 0], 4))
        assert pb_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(),
                                                       timeout=10).target == "fake-target"
    with client_channel(secured.address, tls_ca=pki["ca"], api_key="sk-second") as ch:
        assert _generate(ch)


def test_a_plaintext_client_is_refused(secured):
    with client_channel(secured.address, api_key=KEY) as ch:
        assert _code(lambda: _generate(ch)) == grpc.StatusCode.UNAVAILABLE


def test_a_missing_or_wrong_key_is_unauthenticated_and_health_stays_open(secured, pki):
    for key in (None, "sk-wrong", KEY + "x"):
        with client_channel(secured.address, tls_ca=pki["ca"], api_key=key) as ch:
            with pytest.raises(grpc.RpcError) as err:
                _generate(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API key" in err.value.details() and "sk-" not in err.value.details()
            assert _code(lambda: pb_grpc.GenerationStub(ch).Tokenize(
                pb.TokenizeRequest(text="a"), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: _reflect(ch)) == grpc.StatusCode.UNAUTHENTICATED
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    with client_channel(secured.address, tls_ca=pki["ca"], api_key=KEY) as ch:
        assert "specserve.v1.Generation" in _reflect(ch)


def _openai(srv: BackgroundServer, ca: str, key: str) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca))
    return openai.OpenAI(base_url=f"https://127.0.0.1:{srv.server.http_port}/v1", api_key=key,
                         max_retries=0, http_client=http)


def test_http_over_tls_needs_the_key_but_health_does_not(secured, pki):
    for key in ("sk-wrong", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as err:
            _openai(secured, pki["ca"], key).completions.create(model=MODEL, prompt="hi",
                                                                 max_tokens=4)
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key" and "sk-" not in err.value.message
    got = _openai(secured, pki["ca"], KEY).completions.create(model=MODEL, prompt="hi",
                                                               max_tokens=4)
    assert got.choices[0].text == FakeTokenizer().decode(expected_tokens([0, 0], 4))
    assert [m.id for m in _openai(secured, pki["ca"], KEY).models.list()] == [MODEL]
    base = f"https://127.0.0.1:{secured.server.http_port}"
    context = ssl.create_default_context(cafile=pki["ca"])
    assert _get(base + "/health", context) == 200
    assert _get(base + "/v1/models", context) == 401  # no key at all
    assert _get(base + "/metrics", context) == 401
    assert _get(base + "/metrics", context, {"Authorization": f"Bearer {KEY}"}) == 200
    with pytest.raises(OSError):  # plaintext HTTP to the TLS port
        _get(f"http://127.0.0.1:{secured.server.http_port}/health")


def _get(url: str, context: ssl.SSLContext | None = None, headers: dict | None = None) -> int:
    """The status of a GET."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=5, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_specserve_generate_and_info_reach_the_secured_server(secured, pki, capsys,
                                                              monkeypatch):
    port = secured.address.rsplit(":", 1)[1]
    rc = cli.main(["generate", "hello", "--port", port, "--max-tokens", "5", "--tls-ca",
                   pki["ca"], "--api-key", KEY])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert out == FakeTokenizer().decode(expected_tokens(FakeTokenizer().encode("hello"), 5)) + "\n"
    assert cli.main(["info", "--port", port, "--tls-ca", pki["ca"], "--api-key", "sk-no"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("SPECSERVE_API_KEY", KEY)
    assert cli.main(["info", "--port", port, "--tls-ca", pki["ca"]]) == 0
    assert "fake-target" in capsys.readouterr().out


def test_the_throughput_benchmark_reaches_the_secured_server(secured, pki, monkeypatch):
    import asyncio

    from benchmarks import throughput

    endpoints = (secured.address, f"https://127.0.0.1:{secured.server.http_port}")
    monkeypatch.setattr(throughput, "CLIENT_SECURITY", {"tls_ca": pki["ca"], "api_key": "sk-no"})
    for endpoint in endpoints:
        info, error = asyncio.run(throughput.probe_server(endpoint, 10))
        assert info is None and ("UNAUTHENTICATED" in error or "401" in error)
    throughput.CLIENT_SECURITY["api_key"] = KEY
    for endpoint in endpoints:
        info, error = asyncio.run(throughput.probe_server(endpoint, 10))
        assert error == "" and info.target in ("fake-target", MODEL)


# -- mutual TLS -------------------------------------------------------------------------------
def test_mutual_tls_refuses_a_client_without_a_certificate(pki):
    srv = _start(Security(tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                          tls_client_ca=pki["ca"]), http=True)
    try:
        with client_channel(srv.address, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                            tls_key=pki["client_key"]) as ch:
            assert _generate(ch)
        with client_channel(srv.address, tls_ca=pki["ca"]) as ch:
            assert _code(lambda: _generate(ch)) == grpc.StatusCode.UNAVAILABLE
        url = f"https://127.0.0.1:{srv.server.http_port}/health"
        context = ssl.create_default_context(cafile=pki["ca"])
        with pytest.raises(OSError):
            _get(url, context)
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
        assert _get(url, context) == 200
    finally:
        srv.stop()


# -- reflection off, an exposed address -------------------------------------------------------
def test_reflection_off_and_the_warning_on_an_exposed_address(caplog):
    with caplog.at_level(logging.WARNING, logger="specserve.engine.server"):
        srv = _start(Security(reflection=False), host="0.0.0.0")
    try:
        warnings = [r.getMessage() for r in caplog.records if "reachable from other" in
                    r.getMessage()]
        assert len(warnings) == 1
        assert "without TLS" in warnings[0] and "without an API key" in warnings[0]
        with grpc.insecure_channel(f"127.0.0.1:{srv.server.port}") as ch:
            assert _generate(ch)
            assert _code(lambda: _reflect(ch)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop()


def test_the_warning_names_only_what_is_missing():
    keyed = Security(api_keys=(KEY,))
    assert "without TLS" in keyed.exposure_warning("0.0.0.0")
    assert "API key" not in keyed.exposure_warning("::")
    assert keyed.exposure_warning("127.0.0.1") is None
    assert keyed.exposure_warning("localhost") is None
    assert Security().exposure_warning("::1") is None
    assert not is_loopback("192.168.1.10") and is_loopback("[::1]")


# -- keys and files ---------------------------------------------------------------------------
def test_api_keys_from_flags_file_and_environment(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-a\n\n  sk-b  \n")
    assert load_api_keys(["sk-c"], str(keys), env={"SPECSERVE_API_KEY": "sk-d"}) == (
        "sk-c", "sk-a", "sk-b", "sk-d")
    assert load_api_keys([], None, env={}) == ()
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.*holds no key"):
        load_api_keys([], str(tmp_path / "empty"), env={})
    with pytest.raises(ValueError, match="cannot read the API key file .*missing"):
        load_api_keys([], str(tmp_path / "missing"), env={})
    with pytest.raises(ValueError, match="whitespace"):
        load_api_keys(["sk a"], None, env={})
    assert bearer_ok("Bearer sk-a", ("sk-a",)) and bearer_ok("bearer sk-a", ("x", "sk-a"))
    assert not bearer_ok("sk-a", ("sk-a",)) and not bearer_ok("Bearer sk-", ("sk-a",))
    assert not bearer_ok(None, ("sk-a",))


def test_bad_tls_files_are_refused_naming_the_file(pki, tmp_path, capsys):
    missing = str(tmp_path / "nope.pem")
    cases = [
        (Security(tls_cert=missing, tls_key=pki["server_key"]), "TLS certificate.*nope.pem"),
        (Security(tls_cert=pki["server_cert"], tls_key=pki["other_key"]), "other.key"),
        (Security(tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                  tls_client_ca=pki["server_key"]), "client CA .*server.key"),
        (Security(tls_cert=pki["server_cert"]), "go together"),
        (Security(tls_client_ca=pki["ca"]), "needs --tls-cert"),
    ]
    for security, message in cases:
        with pytest.raises(ValueError, match=message):
            security.check()
    with pytest.raises(SystemExit, match="specserve serve: .*nope.pem"):
        cli.main(["serve", "--tls-cert", missing, "--tls-key", pki["server_key"]])


# -- Ray on loopback --------------------------------------------------------------------------
def test_a_local_ray_is_started_on_loopback_and_a_cluster_is_joined_as_given(monkeypatch):
    ray_executor = pytest.importorskip("specserve.workers.ray_executor")
    from ray._private import ray_constants

    seen = []

    def fake_init(**kwargs):
        seen.append((kwargs, ray_constants.ENABLE_RAY_CLUSTER))

    monkeypatch.setattr(ray_executor.ray, "init", fake_init)
    monkeypatch.setattr(ray_executor.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_executor, "_ray_users", 0)
    monkeypatch.setattr(ray_executor, "_ray_owner", None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    for address in (None, "10.0.0.5:6379"):
        config = EngineConfig.from_kwargs(model="unused", executor="ray", device="cpu",
                                          ray_address=address)
        ray_executor._acquire_ray(config)
        monkeypatch.setattr(ray_executor, "_ray_owner", None)
    (local, local_cluster_mode), (joined, joined_cluster_mode) = seen
    assert local["_node_ip_address"] == "127.0.0.1" and local["include_dashboard"] is False
    assert local_cluster_mode is False
    assert "_node_ip_address" not in joined and joined["address"] == "10.0.0.5:6379"
    assert joined_cluster_mode == before and ray_constants.ENABLE_RAY_CLUSTER == before


def test_no_port_of_a_local_ray_listens_beyond_loopback():
    ray_executor = pytest.importorskip("specserve.workers.ray_executor")
    psutil = pytest.importorskip("psutil")
    ray = ray_executor.ray
    assert not ray.is_initialized()
    config = EngineConfig.from_kwargs(model="unused", executor="ray", device="cpu")
    ray_executor._acquire_ray(config)
    try:
        node = ray._private.worker._global_node
        pids = {p.pid for p in psutil.Process().children(recursive=True)}
        pids |= {node.all_processes[k][0].process.pid for k in node.all_processes}
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids}
        assert listening, "no Ray process found listening"
        exposed = [(ip, port) for ip, port in listening
                   if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback]
        assert exposed == []
    finally:
        ray_executor._release_ray()
