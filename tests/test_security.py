"""Security: no request makes a front end reach an internal address, and no checkpoint file runs code.

Image URLs (utils/media.py): an "internal" server on loopback (127.0.0.1 and ::1) records every connection
and must record none for any refused spelling of a non-public address; a spy on anyio.connect_tcp, where
every TCP connection of the fetcher starts, must record none either, so 169.254.169.254 or 10.x are
refused without a connection attempt. Names that stand for public hosts (images.example, ...) resolve
through a stubbed resolver to global addresses, and the spy leads connections to those addresses to a
loopback "public" test server. The refusals are checked through load_image (CLI, batch script), the CLI
itself, the API server (in-process app, HTTP 400) and the web demo (its handlers and gradio's API).
Checkpoints: a .pt whose unpickling would create a marker file, through every loader entry point, and
`latest` / shard names that lead out of the checkpoint directory. The API key: only `GET /health` is public.
"""
import base64
import datetime
import http.server
import io
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading

import anyio
import pytest
import torch
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import cli_demo
import merge_model
import web_demo
from conftest import GOLDEN_DIR, ROOT, free_port, inference_args
from models.errors import CheckpointError, ImageError
from openai_demo import openai_api
from openai_demo.server import create_app
from scripts import convert_checkpoint
from utils.engine import engine_for
from utils.engine_args import EngineArgs
from utils import media
from utils.media import MediaPolicy, media_policy, non_public_kind, numeric_ipv4
from utils.pipeline import load_pipeline
from utils.vision import load_image

MODEL = "cogvlm-tiny"
API_KEY = "security-test-key"
PUBLIC_IPS = {"images.example": "93.184.215.14", "other.example": "93.184.215.15"}  # global addresses
SAT = os.path.join(GOLDEN_DIR, "checkpoint")
HF = os.path.join(ROOT, "tests", "golden", "tiny-small-hf")
SHARD = os.path.join("1", "mp_rank_00_model_states.pt")


# Servers: the internal one (must see nothing) and the stand-in for public hosts ----------------------

class RecordingServer(http.server.ThreadingHTTPServer):
    """Records every accepted connection and every request (path, Host header)."""
    daemon_threads = True

    def __init__(self, address, family=socket.AF_INET, ssl_context=None):
        self.address_family = family
        self.connections, self.requests, self.locations = [], [], {}
        super().__init__(address, Routes)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address):
        self.connections.append(client_address)
        super().process_request(request, client_address)


class Routes(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Host")))
        if self.path.startswith("/hops/"):  # /hops/N: N redirects, then the image
            hops = int(self.path.rsplit("/", 1)[1])
            self._answer(302, location=f"/hops/{hops - 1}" if hops > 1 else "/image.png")
        elif self.path in self.server.locations:
            self._answer(302, location=self.server.locations[self.path])
        elif self.path == "/image.png":
            self._answer(200, open(os.path.join(GOLDEN_DIR, "image.png"), "rb").read())
        else:
            self._answer(200, b"internal secret")

    def _answer(self, status, body=b"", location=None):
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def internal():
    """The internal server on 127.0.0.1:P and, where the machine has IPv6 loopback, [::1]:P."""
    servers = [RecordingServer(("127.0.0.1", 0))]
    try:
        servers.append(RecordingServer(("::1", servers[0].port), family=socket.AF_INET6))
    except OSError:
        pass
    yield servers
    for server in servers:
        server.shutdown()


def internal_connections(internal):
    return [address for server in internal for address in server.connections]


@pytest.fixture(scope="module")
def public():
    server = RecordingServer(("127.0.0.1", 0))
    yield server
    server.shutdown()


class Network:
    """A resolver stub for the test names (`answers`: name -> list of address lists, one per lookup, the last
    one repeated) and a spy on every TCP connection the fetcher starts; connections to the public test
    addresses go to `target_port` on loopback."""

    def __init__(self, real_getaddrinfo, real_connect, target_port):
        self.real_getaddrinfo, self.real_connect, self.target_port = real_getaddrinfo, real_connect, target_port
        self.answers = {name: [[ip]] for name, ip in PUBLIC_IPS.items()}
        self.lookups, self.connects = [], []

    def getaddrinfo(self, host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self.real_getaddrinfo(host, port, *args, **kwargs)
        self.lookups.append(name)
        answers = self.answers[name]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)) if ":" in ip else
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in addresses]

    async def connect_tcp(self, remote_host, remote_port, **kwargs):
        self.connects.append((str(remote_host), remote_port))
        if str(remote_host) in PUBLIC_IPS.values():
            remote_host, remote_port = "127.0.0.1", self.target_port
        return await self.real_connect(remote_host, remote_port, **kwargs)


@pytest.fixture
def network(monkeypatch, public):
    stub = Network(socket.getaddrinfo, anyio.connect_tcp, public.port)
    monkeypatch.setattr(socket, "getaddrinfo", stub.getaddrinfo)
    monkeypatch.setattr(anyio, "connect_tcp", stub.connect_tcp)
    public.requests.clear()
    return stub


# Addresses ---------------------------------------------------------------------------------------

NUMERIC_HOSTS = ["127.1", "2130706433", "0x7f.1", "0X7F.0.0.1", "0177.0.0.1", "0x7f000001", "0177.1", "1.2.3.0377",
                 "4294967295", "1.16777215", "1.2.65535", "0", "00", "8.8.8.8",
                 # not numbers (a resolver would look them up as names)
                 "0x", "09.1", "127..1", "127.0.0.1.", "1.2.3.4.5", "4294967296", "1.16777216", "256.1.1.1", "0x0g",
                 "1.2.3.0x100", "example.com", ""]


@pytest.mark.parametrize("host", NUMERIC_HOSTS)
def test_numeric_hosts_are_read_as_the_c_resolver_reads_them(host):
    try:
        resolved = ipaddress.ip_address(socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_NUMERICHOST)[0][4][0])
    except (socket.gaierror, UnicodeError):  # UnicodeError: not even a valid name
        resolved = None
    assert numeric_ipv4(host) == resolved


@pytest.mark.parametrize("address,kind", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.1", "private"),
    ("fd00::1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"), ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"), ("fec0::1", "site-local"), ("240.0.0.1", "private"), ("255.255.255.255", "private"),
    ("192.0.2.1", "private"),
    # IPv6 forms of IPv4 addresses: judged by the IPv4 address
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"), ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b::a00:1", "private"), ("2002:7f00:1::", "loopback"), ("2002:a9fe:a9fe::1", "link-local"),
    ("::127.0.0.1", "loopback"), ("64:ff9b:1::1", "private"), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo tunnel"),
])
def test_non_public_addresses_are_named(address, kind):
    assert non_public_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "1.1.1.1", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_pass(address):
    assert non_public_kind(ipaddress.ip_address(address)) is None


# URLs that must never be fetched -------------------------------------------------------------------

REFUSED = {  # URL ({internal}: the internal server's port, {public}: the public one's) -> what the error names
    "loopback": ("http://127.0.0.1:{internal}/secret", "127.0.0.1, loopback"),
    "localhost": ("http://localhost:{internal}/secret", "loopback"),
    "ipv6_loopback": ("http://[::1]:{internal}/secret", "::1, loopback"),
    "decimal": ("http://2130706433:{internal}/secret", "127.0.0.1, loopback"),
    "hex": ("http://0x7f000001:{internal}/secret", "127.0.0.1, loopback"),
    "hex_dotted": ("http://0x7f.1:{internal}/secret", "127.0.0.1, loopback"),
    "octal": ("http://0177.0.0.1:{internal}/secret", "127.0.0.1, loopback"),
    "short": ("http://127.1:{internal}/secret", "127.0.0.1, loopback"),
    "ipv4_mapped": ("http://[::ffff:127.0.0.1]:{internal}/secret", "127.0.0.1, loopback"),
    "nat64": ("http://[64:ff9b::7f00:1]:{internal}/secret", "127.0.0.1, loopback"),
    "6to4": ("http://[2002:7f00:1::]:{internal}/secret", "127.0.0.1, loopback"),
    "unspecified": ("http://0.0.0.0:{internal}/secret", "0.0.0.0, unspecified"),
    "cloud_metadata": ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, link-local"),
    "private_10": ("http://10.0.0.1/x.png", "10.0.0.1, private"),
    "private_192": ("http://192.168.1.1/x.png", "192.168.1.1, private"),
    "carrier_grade_nat": ("http://100.64.0.1/x.png", "100.64.0.1, carrier-grade NAT"),
    "multicast": ("http://224.0.0.1/x.png", "multicast"),
    "ipv6_link_local": ("http://[fe80::1]/x.png", "link-local"),
    "ipv6_unique_local": ("http://[fd00::1]/x.png", "private"),
    "name_of_loopback": ("http://intranet.example:{internal}/secret", "127.0.0.1, loopback"),
    "name_with_one_private_address": ("http://mixed.example:{internal}/secret", "10.0.0.7, private"),
    "redirect_to_loopback": ("http://images.example:{public}/to-internal", "redirected from"),
    "redirect_to_decimal_loopback": ("http://images.example:{public}/to-internal-decimal", "redirected from"),
}


def golden_data_uri() -> str:
    with open(os.path.join(GOLDEN_DIR, "image.png"), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def refused_url(name, internal, public, network):
    network.answers["intranet.example"] = [["127.0.0.1"]]
    network.answers["mixed.example"] = [[PUBLIC_IPS["images.example"], "10.0.0.7"]]
    public.locations["/to-internal"] = f"http://127.0.0.1:{internal[0].port}/secret"
    public.locations["/to-internal-decimal"] = f"http://2130706433:{internal[0].port}/secret"
    url, named = REFUSED[name]
    return url.format(internal=internal[0].port, public=public.port), named


def assert_nothing_reached(internal, public, network):
    """No connection to the internal server, and none started but to the public test server."""
    assert internal_connections(internal) == []
    assert {host for host, _ in network.connects} <= {PUBLIC_IPS["images.example"]}, network.connects


@pytest.mark.parametrize("name", list(REFUSED))
def test_load_image_refuses_without_connecting(name, internal, public, network):
    url, named = refused_url(name, internal, public, network)
    with pytest.raises(ImageError) as err:
        load_image(url)
    message = str(err.value)
    assert "resolves to a non-public address" in message and named in message and "\n" not in message, message
    assert "--allow-private-media-urls" in message
    assert_nothing_reached(internal, public, network)
    if not name.startswith("redirect"):
        assert network.connects == []


def test_private_addresses_are_fetched_only_when_allowed(internal, public):
    allowed = MediaPolicy(allow_private=True)
    assert load_image(f"http://127.0.0.1:{public.port}/image.png", policy=allowed).size == (80, 60)
    assert load_image(f"http://localhost:{public.port}/image.png", policy=allowed).size == (80, 60)
    with pytest.raises(ImageError, match="non-public"):
        load_image(f"http://127.0.0.1:{public.port}/image.png")


def test_at_most_three_redirects(public, network):
    assert load_image(f"http://images.example:{public.port}/hops/3").size == (80, 60)
    public.requests.clear()
    with pytest.raises(ImageError, match="redirects more than 3 times"):
        load_image(f"http://images.example:{public.port}/hops/4")
    assert [path for path, _ in public.requests] == ["/hops/4", "/hops/3", "/hops/2", "/hops/1"]


def test_dns_rebinding_gets_one_lookup_and_the_checked_address(internal, public, network):
    """The name says public at the check and loopback at any later lookup; the URL's port is the internal
    server's, so a fetcher that looked up again before connecting would reach it."""
    network.answers["rebind.example"] = [[PUBLIC_IPS["images.example"]], ["127.0.0.1"]]
    port = internal[0].port
    assert load_image(f"http://rebind.example:{port}/image.png").size == (80, 60)
    assert network.lookups.count("rebind.example") == 1
    assert network.connects == [(PUBLIC_IPS["images.example"], port)]
    assert public.requests == [("/image.png", f"rebind.example:{port}")]  # the Host header keeps the name
    assert internal_connections(internal) == []


def test_the_allowlist_holds_on_every_hop(internal, public, network):
    policy = MediaPolicy(allowed_domains="Images.Example")
    base = f"http://images.example:{public.port}"
    assert load_image(base + "/image.png", policy=policy).size == (80, 60)
    with pytest.raises(ImageError, match="host other.example is not one of the allowed media domains"):
        load_image(f"http://other.example:{public.port}/image.png", policy=policy)
    public.locations["/to-other"] = f"http://other.example:{public.port}/image.png"
    with pytest.raises(ImageError) as err:
        load_image(base + "/to-other", policy=policy)
    assert "redirected from" in str(err.value) and "not one of the allowed media domains" in str(err.value)
    assert PUBLIC_IPS["other.example"] not in {host for host, _ in network.connects}
    wildcard = MediaPolicy(allowed_domains="*.example")
    assert load_image(f"http://other.example:{public.port}/image.png", policy=wildcard).size == (80, 60)
    # an allowed name still has to resolve to a public address
    network.answers["intranet.example"] = [["127.0.0.1"]]
    with pytest.raises(ImageError, match="non-public"):
        load_image(f"http://intranet.example:{internal[0].port}/secret", policy=wildcard)
    assert internal_connections(internal) == []


def test_no_media_urls_refuses_every_url_before_any_lookup(public, network):
    policy = MediaPolicy(allow_urls=False)
    with pytest.raises(ImageError, match="image URLs are turned off"):
        load_image(f"http://images.example:{public.port}/image.png", policy=policy)
    assert network.lookups == [] and network.connects == []
    assert load_image(golden_data_uri(), policy=policy).size == (80, 60)


def test_policy_values_that_would_do_nothing_are_refused():
    for domains in ("https://a.com", "a.com:443", "a.com/images", "*.", ",", "user@a.com"):
        with pytest.raises(Exception, match="allowed-media-domains"):
            MediaPolicy(allowed_domains=domains)
    with pytest.raises(Exception, match="would do nothing"):
        MediaPolicy(allow_urls=False, allow_private=True)
    with pytest.raises(Exception, match="would do nothing"):
        MediaPolicy(allow_urls=False, allowed_domains="a.com")


# TLS: the name stays the TLS name ---------------------------------------------------------------------

def _certificates(tmp_path, name):
    """A CA (written to ca.pem) and a server certificate for `name` signed by it (server.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, key, signing_key, ca, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate(ca_name, ca_name, ca_key, ca_key, True)
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, server_key, ca_key,
                         False, san=name)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))


def test_tls_uses_the_name_for_sni_and_the_certificate(tmp_path, monkeypatch, network):
    _certificates(tmp_path, "images.example")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "key.pem")
    names = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server = RecordingServer(("127.0.0.1", 0), ssl_context=context)
    try:
        network.target_port = server.port
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        assert load_image(f"https://images.example:{server.port}/image.png").size == (80, 60)
        assert names == ["images.example"]  # SNI: the URL's name, not the address connected to
        assert network.connects == [(PUBLIC_IPS["images.example"], server.port)]
        assert server.requests == [("/image.png", f"images.example:{server.port}")]
        # the certificate is checked against the name: another name at the same address is refused
        with pytest.raises(ImageError, match="cannot fetch"):
            load_image(f"https://other.example:{server.port}/image.png")
        assert len(server.requests) == 1
    finally:
        server.shutdown()


# The CLI ------------------------------------------------------------------------------------------

def run_cli(monkeypatch, capsys, stdin, *flags):
    argv = ["--from_pretrained", SAT, "--local_tokenizer", os.path.join(GOLDEN_DIR, "tokenizer"), "--version", "chat",
            "--max_length", "120", *flags]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli_demo.main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def one_error_line(text):
    lines = [line for line in text.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_cli_refusals_are_one_error_line(monkeypatch, capsys, internal, public, network):
    for name in ("loopback", "cloud_metadata", "redirect_to_loopback"):
        url, named = refused_url(name, internal, public, network)
        rc, out = run_cli(monkeypatch, capsys, f"{url}\nWhat is it?\n")
        assert rc == 1 and "non-public address" in one_error_line(out) and named in out
    assert_nothing_reached(internal, public, network)
    rc, out = run_cli(monkeypatch, capsys, f"http://127.0.0.1:{public.port}/image.png\nWhat is it?\n",
                      "--allow-private-media-urls")
    assert rc == 0 and "Model: " in out and "error" not in out


# The API server (in-process app) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline(openai_api.parse_args(["--from_pretrained", SAT, "--local_tokenizer",
                                                os.path.join(GOLDEN_DIR, "tokenizer"), "--version", "chat",
                                                "--max_length", "120"]))


def api_client(pipeline, *media_flags, api_key=None):
    args = openai_api.parse_args(["--from_pretrained", SAT, *media_flags])
    app = create_app(pipeline, MODEL, api_key=api_key, media_policy=media_policy(args))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def api(pipeline):
    with api_client(pipeline) as client:
        yield client


def image_request(url, max_tokens=2):
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def assert_image_refusal(response, text):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages" and text in error["message"]
    assert "\n" not in error["message"]


@pytest.mark.parametrize("name", list(REFUSED))
def test_api_refusals_are_400(name, api, internal, public, network):
    url, named = refused_url(name, internal, public, network)
    response = api.post("/v1/chat/completions", json=image_request(url))
    assert_image_refusal(response, "resolves to a non-public address")
    assert named in response.json()["error"]["message"]
    assert_nothing_reached(internal, public, network)


def test_api_media_flags(pipeline, internal, public, network):
    image = f"http://images.example:{public.port}/image.png"
    with api_client(pipeline, "--allowed-media-domains", "images.example") as client:
        assert client.post("/v1/chat/completions", json=image_request(image)).status_code == 200
        other = client.post("/v1/chat/completions", json=image_request(f"http://other.example:{public.port}/a.png"))
        assert_image_refusal(other, "not one of the allowed media domains")
    with api_client(pipeline, "--no-media-urls") as client:
        assert_image_refusal(client.post("/v1/chat/completions", json=image_request(image)), "turned off")
        assert client.post("/v1/chat/completions", json=image_request(golden_data_uri())).status_code == 200
    assert PUBLIC_IPS["other.example"] not in {host for host, _ in network.connects}
    with api_client(pipeline, "--allow-private-media-urls") as client:
        loopback = f"http://127.0.0.1:{public.port}/image.png"
        assert client.post("/v1/chat/completions", json=image_request(loopback)).status_code == 200
    assert internal_connections(internal) == []


# The API key ---------------------------------------------------------------------------------------

NEEDS_KEY = [("HEAD", "/health"), ("OPTIONS", "/health"), ("GET", "/health/"), ("GET", "/health/x"),
             ("GET", "/HEALTH"), ("POST", "/health"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"),
             ("GET", "/docs/oauth2-redirect"), ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"),
             ("POST", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("GET", "/nothing")]


def test_only_get_health_answers_without_the_key(pipeline):
    with api_client(pipeline, api_key=API_KEY) as client:
        assert client.get("/health").json()["status"] == "ok"
        for method, path in NEEDS_KEY:
            for headers in ({}, {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": "Bearer"},
                            {"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY},
                            {"Authorization": b"Bearer \xff\xfe"}):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    error = response.json()["error"]
                    assert error["code"] == "invalid_api_key" and "\n" not in error["message"]
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert client.head("/health", headers=good).status_code == 200
        assert client.get("/openapi.json", headers=good).json()["paths"]["/health"]["head"]["security"]
        assert "security" not in client.get("/openapi.json", headers=good).json()["paths"]["/health"]["get"]
        assert client.get("/docs", headers=good).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/models"):
                pass


# Flags: one definition, checked before the model loads ----------------------------------------------

def test_the_api_server_and_web_demo_read_the_same_media_flags():
    flags = ["--from_pretrained", SAT, "--allowed-media-domains", "images.example, *.CDN.example",
             "--allow-private-media-urls"]
    expected = MediaPolicy(allowed_domains=("images.example", "*.cdn.example"), allow_private=True)
    assert media_policy(openai_api.parse_args(flags)) == expected
    assert media_policy(web_demo.build_parser().parse_args(flags)) == expected
    assert media_policy(openai_api.parse_args(["--from_pretrained", SAT])) == media.DEFAULT_MEDIA_POLICY
    assert media.DEFAULT_MEDIA_POLICY == MediaPolicy(allow_urls=True, allowed_domains=None, allow_private=False)


@pytest.mark.parametrize("main", [openai_api.main, web_demo.main, cli_demo.main])
@pytest.mark.parametrize("flags,message", [(["--no-media-urls", "--allow-private-media-urls"], "would do nothing"),
                                           (["--allowed-media-domains", "https://a.com"], "not a host name")])
def test_bad_media_flags_are_one_error_line(main, flags, message, capsys, tmp_path):
    rc = main(["--from_pretrained", str(tmp_path / "no-checkpoint-needed"), *flags])
    err = capsys.readouterr().err
    assert rc == 1 and message in one_error_line(err)


# The web demo --------------------------------------------------------------------------------------

def test_web_demo_fetches_urls_under_its_flags(pipeline, internal, public, network):
    import gradio as gr

    def web_chat(*flags):
        args = web_demo.build_parser().parse_args(["--from_pretrained", SAT, *flags])
        return web_demo.WebChat(pipeline, args, engine_for(pipeline, EngineArgs.from_cli_args(args)))

    url, _ = refused_url("loopback", internal, public, network)
    with pytest.raises(gr.Error, match="non-public address"):
        web_chat().api_chat(url, "What is it?", [], 0.8, 0.4, 1)
    with pytest.raises(gr.Error, match="turned off"):
        web_chat("--no-media-urls").api_chat(f"http://images.example:{public.port}/image.png", "hi", [], 0.8, 0.4, 1)
    assert_nothing_reached(internal, public, network)
    answer, _ = web_chat("--allow-private-media-urls").api_chat(f"http://127.0.0.1:{public.port}/image.png",
                                                                "What is it?", [], 0.8, 0.4, 1)
    assert answer and public.requests == [("/image.png", f"127.0.0.1:{public.port}")]
    assert internal_connections(internal) == []


def test_web_demo_image_urls_from_gradio_clients_reach_our_fetcher(pipeline, internal):
    """A gradio client may send an image as a URL; gradio would download it itself (uncapped, whatever the
    flags say). It reaches utils.vision.load_image instead, whose refusal comes back."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    args = web_demo.build_parser().parse_args(["--from_pretrained", SAT, "--max_length", "120"])
    demo = web_demo.build_demo(web_demo.WebChat(pipeline, args, engine_for(pipeline, EngineArgs.from_cli_args(args))))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(AppError) as err:
            client.predict(handle_file(f"http://127.0.0.1:{internal[0].port}/secret.png"), "hi", [], 0.8, 0.4, 1,
                           api_name="/chat")
        assert "non-public address" in str(err.value) and "--allow-private-media-urls" in str(err.value)
    finally:
        demo.close()
    assert internal_connections(internal) == []


# Checkpoints: pickled code and paths out of the directory ---------------------------------------------

class RunsCodeWhenUnpickled:
    """Unpickling this object opens (creates) `marker` for writing: stands for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def poisoned_copy(source, target, marker, shard=SHARD):
    """A copy of the SAT checkpoint `source` whose shard also holds a RunsCodeWhenUnpickled."""
    shutil.copytree(source, target)
    state = torch.load(os.path.join(target, shard), weights_only=True)
    state["extra"] = RunsCodeWhenUnpickled(str(marker))
    torch.save(state, os.path.join(target, shard))
    return str(target)


@pytest.fixture
def poisoned(tmp_path):
    marker = tmp_path / "code-ran"
    yield poisoned_copy(SAT, tmp_path / "poisoned", marker), marker
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_poisoned_checkpoint_is_refused_by_the_loaders(poisoned):
    from models import CogVLMModel
    from models.checkpoint import load_model, reshard_checkpoint

    path, _ = poisoned
    for load in (lambda: CogVLMModel.from_pretrained(path, args=inference_args()), lambda: load_model(path),
                 lambda: reshard_checkpoint(path, path + "-merged")):
        with pytest.raises(CheckpointError, match="holds a pickled io.open, not only tensors"):
            load()
    assert not os.path.exists(path + "-merged")


@pytest.mark.parametrize("entry", ["cli", "api", "merge", "convert"])
def test_poisoned_checkpoint_is_one_error_line_in_every_front_end(entry, poisoned, monkeypatch, capsys, tmp_path):
    path, _ = poisoned
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nhi\n"))
    tokenizer = ["--local_tokenizer", os.path.join(GOLDEN_DIR, "tokenizer")]
    main, argv = {"cli": (cli_demo.main, ["--from_pretrained", path, *tokenizer]),
                  "api": (openai_api.main, ["--from_pretrained", path, *tokenizer]),
                  "merge": (merge_model.main, ["--from_pretrained", path, "--save", str(tmp_path / "out")]),
                  "convert": (convert_checkpoint.main, [path, str(tmp_path / "out")])}[entry]
    assert main(argv) == 1
    assert "not only tensors" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def finetune_command(tmp_path, checkpoint, *extra):
    from scripts.make_captcha_dataset import make_dataset

    make_dataset(str(tmp_path / "train"), 4, "clean", seed=3)
    config = json.load(open(os.path.join(ROOT, "scripts", "ds_config_cpu.json")))
    config["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(config))
    return [sys.executable, "finetune_demo.py", "--from_pretrained", checkpoint, "--full_finetune",
            "--local_tokenizer", os.path.join(GOLDEN_DIR, "tokenizer"), "--version", "base", "--max_length", "64",
            "--mode", "pretrain", "--train-iters", "2", "--lr", "1e-3", "--train-data", str(tmp_path / "train"),
            "--split", "1.", "--deepspeed_config", str(tmp_path / "ds.json"), "--num-workers", "0",
            "--save", str(tmp_path / "runs"), "--experiment-name", "poisoned", "--seed", "1",
            "--summary-dir", str(tmp_path / "summary"), "--final_save", str(tmp_path / "final"), *extra]


@pytest.mark.parametrize("how", ["resume", "sat_load"])
def test_poisoned_training_state_is_refused_by_finetuning(how, tmp_path, tiny_checkpoint):
    """Resuming a run (DeepSpeed's loader, which passes weights_only=False) and SAT's own --load."""
    from models.sat_compat import SAVE_COMPLETE

    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "runs" / "poisoned-01-01-00-00"
    os.makedirs(run_dir.parent)
    poisoned_copy(tiny_checkpoint, run_dir, marker)
    (run_dir / "1" / SAVE_COMPLETE).write_text("")
    extra = ["--no_resume", "--load", str(run_dir)] if how == "sat_load" else []
    result = subprocess.run(finetune_command(tmp_path, tiny_checkpoint, *extra), cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "not only tensors" in one_error_line(result.stderr)
    assert not marker.exists(), "unpickling the training state ran code"
    assert not (tmp_path / "final").exists()


def outside_copy(tmp_path):
    """The golden SAT checkpoint in tmp_path/ckpt and a complete iteration folder outside it, tmp_path/outside."""
    shutil.copytree(SAT, tmp_path / "ckpt")
    shutil.copytree(SAT + "/1", tmp_path / "outside")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("latest", ["../outside", "../../outside", "..", ".", "/etc", "1/../../outside",
                                    "..\\outside", "1\x00"])
def test_latest_that_leads_out_of_the_checkpoint_is_refused(latest, tmp_path, monkeypatch, capsys):
    from models.checkpoint import open_checkpoint

    ckpt = outside_copy(tmp_path)
    (ckpt / "latest").write_text(latest)
    with pytest.raises(CheckpointError, match="paths are refused"):
        open_checkpoint(str(ckpt)).reader()
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nhi\n"))
    assert cli_demo.main(["--from_pretrained", str(ckpt), "--local_tokenizer", os.path.join(GOLDEN_DIR, "tokenizer")]) == 1
    assert "paths are refused" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"])
def test_hf_shard_names_that_lead_out_of_the_checkpoint_are_refused(shard, tmp_path):
    from models.checkpoint import open_checkpoint
    from safetensors import safe_open

    shutil.copytree(HF, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    shutil.move(tmp_path / "hf" / "model.safetensors", tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {key: shard for key in keys}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="paths are refused"):
        open_checkpoint(str(tmp_path / "hf")).reader()
