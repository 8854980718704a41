"""Who may talk to the server: TLS credentials, API keys, and the warning for
an address reachable from other machines.

One `Security` describes a server's settings, checked at start-up so that a
missing, unreadable or mismatched file fails once, naming the file, before
anything listens. The gRPC front end takes `ApiKeyInterceptor` and
`Security.grpc_credentials`; the HTTP API takes `Security.check_bearer` and
`Security.uvicorn_ssl`. Clients (`specserve generate`, the benchmark) open
their channels with `client_channel`.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Iterable

import grpc

API_KEY_ENV = "SPECSERVE_API_KEY"
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # open without a key: load balancers probe it
UNAUTHENTICATED_MESSAGE = "a valid API key is required: send 'authorization: Bearer <key>'"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path!r}: {exc.strerror or exc}") from None


def load_api_keys(keys: Iterable[str] = (), key_file: str | None = None,
                  env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The accepted keys: ``keys``, the lines of ``key_file`` (blank lines and
    ``#`` comments skipped), and $SPECSERVE_API_KEY."""
    found = [k.strip() for k in keys]
    if key_file is not None:
        text = _read(key_file, "API key file").decode("utf-8", "replace")
        found += [line.strip() for line in text.splitlines()
                  if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise ValueError(f"the API key file {key_file!r} holds no key")
    env_key = (os.environ if env is None else env).get(API_KEY_ENV, "").strip()
    if env_key:
        found.append(env_key)
    if any(not k or any(c.isspace() for c in k) for k in found):
        raise ValueError("an API key must be non-empty and hold no whitespace")
    return tuple(dict.fromkeys(found))


def bearer_ok(header: str | None, keys: tuple[str, ...]) -> bool:
    """Whether ``header`` is 'Bearer <one of keys>'; every key is compared in
    constant time, so the time taken does not tell how much of a key matched."""
    if not header or not header[:7].lower() == "bearer ":
        return False
    given = header[7:].strip().encode()
    return any([hmac.compare_digest(given, k.encode()) for k in keys])


@dataclass(frozen=True)
class Security:
    """A server's TLS files and API keys; `check` validates the files."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients need a certificate it signed
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    reflection: bool = True

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> None:
        """Raise ValueError naming the file when a TLS setting cannot work."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and not self.tls:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is "
                             "TLS with client certificates)")
        if not self.tls:
            return
        _read(self.tls_cert, "TLS certificate")
        _read(self.tls_key, "TLS key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except ssl.SSLError as exc:
            raise ValueError(f"the TLS certificate {self.tls_cert!r} and key {self.tls_key!r} "
                             f"cannot be used together ({exc.reason or exc}): are they PEM "
                             "files of one key pair?") from None
        if self.tls_client_ca is not None:
            _read(self.tls_client_ca, "TLS client CA")
            try:
                context.load_verify_locations(self.tls_client_ca)
            except ssl.SSLError as exc:
                raise ValueError(f"the TLS client CA {self.tls_client_ca!r} is not a PEM "
                                 f"certificate ({exc.reason or exc})") from None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.tls_client_ca, "TLS client CA") if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))],
            root_certificates=ca, require_client_auth=ca is not None)

    def uvicorn_ssl(self) -> dict[str, Any]:
        """uvicorn.Config's TLS arguments (none without TLS)."""
        if not self.tls:
            return {}
        kwargs: dict[str, Any] = dict(ssl_certfile=self.tls_cert, ssl_keyfile=self.tls_key)
        if self.tls_client_ca is not None:
            kwargs.update(ssl_ca_certs=self.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return kwargs

    def check_bearer(self, header: str | None) -> bool:
        """Whether a request with this Authorization header may pass (always, with no keys)."""
        return not self.api_keys or bearer_ok(header, self.api_keys)

    def exposure_warning(self, host: str) -> str | None:
        """What is missing when ``host`` is reachable from other machines; None
        on loopback or with both TLS and a key."""
        missing = [what for what, have in (("TLS (--tls-cert/--tls-key)", self.tls),
                                           ("an API key (--api-key)", bool(self.api_keys)))
                   if not have]
        if not missing or is_loopback(host):
            return None
        return (f"listening on {host}, reachable from other machines, without "
                f"{' and without '.join(missing)}: anyone who can reach this port can use the "
                "server" + ("" if self.tls else " and read its traffic"))


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health must carry ``authorization: Bearer <key>``; others
    end with UNAUTHENTICATED (reflection included: it lists the services)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_ok(metadata.get("authorization"), self._keys):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call with UNAUTHENTICATED."""
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# -- clients ------------------------------------------------------------------------------
class _BearerMetadata(grpc.AuthMetadataPlugin):
    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, _context: Any, callback: Any) -> None:
        callback((("authorization", f"Bearer {self._key}"),), None)


def client_channel(address: str, *, tls_ca: str | None = None, api_key: str | None = None,
                   tls_cert: str | None = None, tls_key: str | None = None,
                   aio: bool = False, options: list | None = None) -> Any:
    """A gRPC channel to a server: TLS when ``tls_ca`` is given (with a client
    certificate for mutual TLS), the key sent with every call."""
    module = grpc.aio if aio else grpc
    if tls_ca is None:
        if tls_cert is not None:
            raise ValueError("a client certificate needs --tls-ca (it is sent over TLS only)")
        if aio:
            return grpc.aio.insecure_channel(
                address, options=options,
                interceptors=[_AioInsecureBearer(api_key)] if api_key else None)
        channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, _InsecureBearer(api_key)) if api_key else channel
    creds = grpc.ssl_channel_credentials(
        _read(tls_ca, "TLS CA"), _read(tls_key, "TLS client key") if tls_key else None,
        _read(tls_cert, "TLS client certificate") if tls_cert else None)
    if api_key:
        creds = grpc.composite_channel_credentials(
            creds, grpc.metadata_call_credentials(_BearerMetadata(api_key)))
    return module.secure_channel(address, creds, options=options)


def _with_key(details: Any, key: str) -> Any:
    """``details`` with the key added to its metadata (a namedtuple, sync or aio)."""
    pairs = list(details.metadata or ()) + [("authorization", f"Bearer {key}")]
    return details._replace(metadata=pairs)


class _InsecureBearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the key to a plaintext channel's calls (gRPC sends call credentials
    over TLS only)."""

    def __init__(self, key: str) -> None:
        self._key = key

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_key(client_call_details, self._key), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_key(client_call_details, self._key), request)


class _AioInsecureBearer(grpc.aio.UnaryUnaryClientInterceptor,
                         grpc.aio.UnaryStreamClientInterceptor):
    """`_InsecureBearer` for a `grpc.aio` channel."""

    def __init__(self, key: str) -> None:
        self._key = key

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_key(client_call_details, self._key), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_key(client_call_details, self._key), request)
