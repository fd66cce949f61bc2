"""The outbound HTTP policy: every refusal happens before any connection, allowlists let
chosen destinations through, redirects are re-checked, size and time are capped, and the
connection goes only to the address that was checked (no DNS rebinding)."""

import datetime
import gzip
import http.server
import ipaddress
import pickle
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core import outbound
from core.config import get_settings
from core.outbound import (
    Allowlist,
    OutboundError,
    OutboundRefused,
    blocked_reason,
    fetch,
)

# --------------------------------------------------------------------------- a recording server


class Recorder:
    """A local HTTP(S) server that records every connection it accepts and every request."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                recorder.requests.append(
                    {
                        "method": self.command,
                        "path": parts.path,
                        "query": parse_qs(parts.query),
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                query = parse_qs(parts.query)
                route = parts.path
                if route == "/redirect":
                    self.send_response(int(query.get("status", ["302"])[0]))
                    self.send_header("Location", query["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif route == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif route == "/big":
                    data = b"x" * 200_000
                    self.send_response(200)
                    if "chunked" in query:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for i in range(0, len(data), 10_000):
                            piece = data[i : i + 10_000]
                            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                elif route == "/bomb":
                    # 50 kB on the wire, 5 MB once decoded.
                    data = gzip.compress(b"\0" * 5_000_000)
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif route == "/slow":
                    time.sleep(3)
                    self._ok(b"late")
                elif route == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "40")
                    self.end_headers()
                    try:
                        for _ in range(40):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:
                        pass
                else:
                    self._ok(b'{"ok": true}', "application/json")

            def _ok(self, data: bytes, ctype: str = "text/plain") -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _handle
            do_POST = _handle
            do_PUT = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                recorder.connections += 1
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_side=True)
                return sock, addr

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        self.connections = 0
        self.requests.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def other() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.stop()


@pytest.fixture
def srv(server: Recorder, other: Recorder) -> Recorder:
    server.reset()
    other.reset()
    return server


@pytest.fixture
def no_send(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails loudly if any HTTP request is even attempted."""
    attempts: list[str] = []

    async def async_send(self: httpx.AsyncClient, request: httpx.Request, **_: Any) -> Any:
        attempts.append(str(request.url))
        raise AssertionError(f"a request was attempted: {request.url}")

    def sync_send(self: httpx.Client, request: httpx.Request, **_: Any) -> Any:
        attempts.append(str(request.url))
        raise AssertionError(f"a request was attempted: {request.url}")

    monkeypatch.setattr(httpx.AsyncClient, "send", async_send)
    monkeypatch.setattr(httpx.Client, "send", sync_send)
    return attempts


def fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[list[str]]]) -> list[str]:
    """Resolve names from `table` (successive answers per name); returns the lookups made."""
    lookups: list[str] = []
    real = outbound._getaddrinfo

    def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        if host in table:
            answers = table[host]
            return answers.pop(0) if len(answers) > 1 else answers[0]
        return real(host, port)

    monkeypatch.setattr(outbound, "_getaddrinfo", resolve)
    return lookups


async def both(method: str, url: str, **kwargs: Any) -> list[Any]:
    """The result or the exception of one fetch, as a list to loop over."""
    try:
        return [await fetch(method, url, **kwargs)]
    except Exception as err:
        return [err]


# --------------------------------------------------------------------------- the address policy

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%2", "link-local"),
    ("fd00:ec2::254", "metadata"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::7f00:1", "IPv4-compatible"),
    ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 around 169.254.169.254
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "172.32.0.1",
    "100.128.0.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize(("address", "kind"), BLOCKED)
def test_blocked_addresses(address: str, kind: str) -> None:
    reason = blocked_reason(ipaddress.ip_address(address))
    assert reason is not None and kind in reason


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_allowlist_parsing() -> None:
    allow = Allowlist.parse(" 127.0.0.1 , 10.0.0.0/8, [::1], Hooks.Internal., *.corp.example ,")
    assert allow.allows_ip(ipaddress.ip_address("127.0.0.1"))
    assert allow.allows_ip(ipaddress.ip_address("10.9.8.7"))
    assert allow.allows_ip(ipaddress.ip_address("::ffff:10.9.8.7"))  # the mapped form too
    assert allow.allows_ip(ipaddress.ip_address("::1"))
    assert not allow.allows_ip(ipaddress.ip_address("127.0.0.2"))
    assert allow.allows_host("hooks.internal") and allow.allows_host("HOOKS.internal.")
    assert allow.allows_host("a.b.corp.example") and not allow.allows_host("corp.example")
    assert Allowlist.parse(["192.168.0.0/16"]).allows_ip(ipaddress.ip_address("192.168.3.4"))
    with pytest.raises(ValueError, match=r"CHAINLOOM_OUTBOUND_ALLOWLIST entry '10\.0\.0\.0/33'"):
        Allowlist.parse("10.0.0.0/33")


# --------------------------------------------------------------------------- refusals


REFUSED_HOSTS = [
    ("127.0.0.1", "127.0.0.1 is a loopback address"),
    ("localhost", "localhost resolves to 127.0.0.1, a loopback address"),
    ("2130706433", "2130706433 (read as 127.0.0.1) is a loopback address"),
    ("0177.0.0.1", "0177.0.0.1 (read as 127.0.0.1) is a loopback address"),
    ("0x7f.1", "0x7f.1 (read as 127.0.0.1) is a loopback address"),
    ("0.0.0.0", "0.0.0.0 is an unspecified"),
    ("[::1]", "::1 is a loopback address"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1 is a loopback address (it embeds IPv4 127.0.0.1)"),
    ("[::ffff:7f00:1]", "loopback address"),
    ("10.0.0.1", "10.0.0.1 is a private address"),
    ("172.16.5.4", "172.16.5.4 is a private address"),
    ("192.168.0.10", "192.168.0.10 is a private address"),
    ("169.254.10.10", "169.254.10.10 is a link-local address"),
    ("169.254.169.254", "169.254.169.254 is the cloud metadata address"),
    ("100.64.1.1", "100.64.1.1 is a shared (carrier-grade NAT) address"),
    ("[fc00::1]", "fc00::1 is a private (unique local) address"),
    ("[fd00::abcd]", "fd00::abcd is a private (unique local) address"),
    ("[fe80::1]", "fe80::1 is a link-local address"),
]


@pytest.mark.parametrize(("host", "expected"), REFUSED_HOSTS)
async def test_refused_before_any_connection(
    srv: Recorder, no_send: list[str], host: str, expected: str
) -> None:
    url = f"http://{host}:{srv.port}/ok"
    for result in await both("GET", url, allowlist=""):
        assert isinstance(result, OutboundRefused), result
        assert result.message.startswith("refused: ")
        assert expected in result.message
        assert "add it to CHAINLOOM_OUTBOUND_ALLOWLIST to allow it" in result.message
    # Nothing reached the local server, and no request was even attempted elsewhere.
    assert srv.connections == 0 and srv.requests == []
    assert no_send == []


async def test_a_name_resolving_to_a_private_address_is_refused(
    srv: Recorder, no_send: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"intranet.example": [["10.20.30.40"]]})
    for result in await both("GET", "http://intranet.example/", allowlist=""):
        assert isinstance(result, OutboundRefused)
        assert result.message == (
            "refused: intranet.example resolves to 10.20.30.40, a private address; "
            "add it to CHAINLOOM_OUTBOUND_ALLOWLIST to allow it"
        )
        assert result.host == "intranet.example" and result.address == "10.20.30.40"
    assert no_send == []


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/x", "gopher://example.com/", "http:///nohost"],
)
async def test_other_schemes_and_broken_urls_are_refused(no_send: list[str], url: str) -> None:
    for result in await both("GET", url, allowlist=""):
        assert isinstance(result, OutboundRefused), result
    assert no_send == []


# --------------------------------------------------------------------------- allowlisting


@pytest.mark.parametrize(
    ("allow", "host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.0/8", "127.0.0.1"),
        ("10.0.0.0/8,127.0.0.1/32", "127.0.0.1"),
        ("localhost", "localhost"),
        ("127.0.0.1", "2130706433"),
    ],
)
async def test_allowlisted_destinations_go_through(srv: Recorder, allow: str, host: str) -> None:
    for result in await both(
        "POST",
        f"http://{host}:{srv.port}/echo",
        json={"a": 1},
        params={"q": "x y"},
        headers={"X-Test": "1"},
        allowlist=allow,
    ):
        assert not isinstance(result, Exception), result
        assert result.status == 200 and result.json() == {"ok": True}
        assert result.headers["content-type"] == "application/json"
        assert result.url == f"http://{host}:{srv.port}/echo?q=x+y"
    assert len(srv.requests) == 1
    seen = srv.requests[0]
    assert seen["method"] == "POST" and seen["body"] == b'{"a": 1}'
    assert seen["query"] == {"q": ["x y"]}
    assert seen["headers"]["host"] == f"{host}:{srv.port}"
    assert seen["headers"]["x-test"] == "1"
    assert seen["headers"]["content-type"] == "application/json"


async def test_wildcard_host_allowlist(srv: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"api.hooks.test": [["127.0.0.1"]]})
    resp = await fetch("GET", f"http://api.hooks.test:{srv.port}/", allowlist="*.hooks.test")
    assert resp.status == 200
    with pytest.raises(OutboundRefused):
        await fetch("GET", f"http://api.hooks.test:{srv.port}/", allowlist="*.other.test")


async def test_default_allowlist_comes_from_the_environment(
    srv: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAINLOOM_OUTBOUND_ALLOWLIST", "127.0.0.1")
    get_settings.cache_clear()
    try:
        assert (await fetch("GET", f"http://127.0.0.1:{srv.port}/")).status == 200
        monkeypatch.setenv("CHAINLOOM_OUTBOUND_ALLOWLIST", "")
        get_settings.cache_clear()
        with pytest.raises(OutboundRefused):
            await fetch("GET", f"http://127.0.0.1:{srv.port}/")
    finally:
        get_settings.cache_clear()


# --------------------------------------------------------------------------- DNS rebinding


async def test_connects_only_to_the_checked_address(
    srv: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # First answer passes the check; any later lookup would say "metadata server". The
    # request must use the first answer and never look the name up again.
    lookups = fake_dns(
        monkeypatch, {"rebind.test": [["127.0.0.1"], ["169.254.169.254"], ["169.254.169.254"]]}
    )
    resp = await fetch("GET", f"http://rebind.test:{srv.port}/x", allowlist="127.0.0.1")
    assert resp.status == 200 and resp.url == f"http://rebind.test:{srv.port}/x"
    assert lookups == ["rebind.test"]
    assert srv.connections == 1
    assert srv.requests[0]["headers"]["host"] == f"rebind.test:{srv.port}"


async def test_a_mixed_answer_uses_only_the_allowed_address(
    srv: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"mixed.test": [["10.0.0.9", "127.0.0.1"]]})
    resp = await fetch("GET", f"http://mixed.test:{srv.port}/", allowlist="127.0.0.1")
    assert resp.status == 200 and srv.connections == 1


def _tls_pair(name: str, directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for `name`, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_tls_uses_the_name_for_sni_and_certificate_while_connecting_to_the_ip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server_ctx, client_ctx = _tls_pair("hooks.test", Path(tempfile.mkdtemp()))
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    rec = Recorder(tls=server_ctx)
    try:
        monkeypatch.setattr(outbound, "_ssl_context", lambda: client_ctx)
        fake_dns(monkeypatch, {"hooks.test": [["127.0.0.1"]]})
        resp = await fetch("GET", f"https://hooks.test:{rec.port}/", allowlist="127.0.0.1")
        assert resp.status == 200
        assert sni == ["hooks.test"]
        assert rec.requests[0]["headers"]["host"] == f"hooks.test:{rec.port}"
        # The certificate is checked against the name: another name fails verification.
        fake_dns(monkeypatch, {"other.test": [["127.0.0.1"]]})
        with pytest.raises(OutboundError, match="cannot reach"):
            await fetch("GET", f"https://other.test:{rec.port}/", allowlist="127.0.0.1")
    finally:
        rec.stop()


# --------------------------------------------------------------------------- redirects


async def test_redirect_to_a_blocked_address_is_refused(srv: Recorder) -> None:
    target = "http://169.254.169.254/latest/meta-data/"
    url = f"http://127.0.0.1:{srv.port}/redirect?to={target}"
    for result in await both("GET", url, allowlist="127.0.0.1"):
        assert isinstance(result, OutboundRefused), result
        assert "169.254.169.254 is the cloud metadata address" in result.message
    # Only the first hop reached a server.
    assert [r["path"] for r in srv.requests] == ["/redirect"]


async def test_redirect_to_a_name_resolving_privately_is_refused(
    srv: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"sneaky.test": [["10.1.1.1"]]})
    url = f"http://127.0.0.1:{srv.port}/redirect?to=http://sneaky.test/"
    with pytest.raises(OutboundRefused, match=r"sneaky\.test resolves to 10\.1\.1\.1"):
        await fetch("GET", url, allowlist="127.0.0.1")


async def test_redirects_followed_and_secrets_kept_to_their_origin(
    srv: Recorder, other: Recorder
) -> None:
    cross = f"http://127.0.0.1:{other.port}/landing"
    url = f"http://127.0.0.1:{srv.port}/redirect?status=307&to={cross}"
    resp = await fetch(
        "POST",
        url,
        json={"n": 1},
        headers={"X-Service-Token": "s3cret", "Accept": "application/json"},
        allowlist="127.0.0.1",
    )
    assert resp.status == 200 and resp.url == cross
    landed = other.requests[0]
    assert landed["method"] == "POST" and landed["body"] == b'{"n": 1}'  # 307 keeps both
    assert "x-service-token" not in landed["headers"]  # another origin: the secret stays
    assert landed["headers"]["accept"] == "application/json"

    # Same origin: headers kept; 303 turns a POST into a GET without a body.
    srv.reset()
    same = f"http://127.0.0.1:{srv.port}/redirect?status=303&to=/final"
    resp = await fetch(
        "POST", same, json={"n": 1}, headers={"X-Service-Token": "s3cret"}, allowlist="127.0.0.1"
    )
    final = srv.requests[-1]
    assert final["path"] == "/final" and final["method"] == "GET" and final["body"] == b""
    assert final["headers"]["x-service-token"] == "s3cret"


async def test_too_many_redirects(srv: Recorder) -> None:
    url = f"http://127.0.0.1:{srv.port}/loop"
    for result in await both("GET", url, allowlist="127.0.0.1", max_redirects=3):
        assert isinstance(result, OutboundError) and not result.transient
        assert "too many redirects" in str(result)
    assert len(srv.requests) == 4  # 1 + 3 redirects


# --------------------------------------------------------------------------- size and time


@pytest.mark.parametrize("path", ["/big", "/big?chunked=1", "/bomb"])
async def test_response_size_is_capped(srv: Recorder, path: str) -> None:
    url = f"http://127.0.0.1:{srv.port}{path}"
    for result in await both("GET", url, allowlist="127.0.0.1", max_bytes=50_000):
        assert isinstance(result, OutboundError), result
        assert "over the limit" in str(result) or "larger than the limit" in str(result)
        assert result.transient is False
    ok = await fetch("GET", url, allowlist="127.0.0.1", max_bytes=10_000_000)
    assert len(ok.body) in (200_000, 5_000_000)


async def test_time_is_capped(srv: Recorder) -> None:
    url = f"http://127.0.0.1:{srv.port}/slow"
    started = time.monotonic()
    for result in await both("GET", url, allowlist="127.0.0.1", timeout=0.5):
        assert isinstance(result, OutboundError) and result.transient, result
    assert time.monotonic() - started < 2.5  # two calls of ~0.5 s, not two of 3 s


async def test_a_dripping_server_cannot_outlast_the_deadline(srv: Recorder) -> None:
    url = f"http://127.0.0.1:{srv.port}/drip"
    started = time.monotonic()
    for result in await both("GET", url, allowlist="127.0.0.1", timeout=1.0):
        assert isinstance(result, OutboundError), result
    assert time.monotonic() - started < 3.5  # each gives up at ~1 s of a 4 s body


async def test_unreachable_port_is_a_transient_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for result in await both("GET", f"http://127.0.0.1:{port}/", allowlist="127.0.0.1"):
        assert isinstance(result, OutboundError) and result.transient
        assert "cannot reach" in str(result)


# --------------------------------------------------------------------------- for other processes


def test_results_and_errors_cross_process_boundaries() -> None:
    refused = pickle.loads(
        pickle.dumps(OutboundRefused("refused: x", host="h", address="10.0.0.1"))
    )
    assert isinstance(refused, OutboundRefused)
    assert (refused.message, refused.host, refused.address) == ("refused: x", "h", "10.0.0.1")
    error = pickle.loads(pickle.dumps(OutboundError("too big", transient=False)))
    assert error.message == "too big" and error.transient is False
    resp = outbound.OutboundResponse(200, {"content-type": "text/plain"}, b"hi", "http://x/")
    assert pickle.loads(pickle.dumps(resp)) == resp and resp.text == "hi"
