"""Image URLs: which ones a front end fetches (MediaPolicy, from the flags of `add_media_args`), and the
one fetcher that downloads them at a bounded cost (ImageFetcher; utils.vision.load_image and the API
server's image gate use it).

No image URL can make a front end reach an internal address: each hop's host is resolved once, and every
address it has must be public (not loopback, private, link-local, carrier-grade NAT, multicast, reserved,
unspecified, nor an IPv6 form of such an IPv4 address; numeric hosts such as 2130706433 or 0x7f.1 are read
as the C library reads them). The connection then goes to a checked address, so a second DNS answer never
counts (DNS rebinding). Redirects are followed by hand, each hop checked the same way, at most
MAX_REDIRECTS. A refusal is an ImageError raised before any connection is made. A download has one deadline
for connecting and the whole body (also against a server that trickles bytes) and a byte cap checked while
reading.
"""
import argparse
import asyncio
import ipaddress
import re
import socket
import urllib.parse
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Union

import httpcore
import httpx

from models.errors import CogVLMError, ImageError

URL_TIMEOUT_S = 10.0


def url_timed_out(url: str, timeout: float) -> ImageError:
    return ImageError(f"image URL {url} timed out (the whole image must arrive within {timeout:g} s); check the "
                      "URL or download the image and give its path")


# Which URLs: addresses, hosts, the policy and its flags -----------------------------------------

MAX_REDIRECTS = 3
NO_URLS_FLAG, ALLOWED_DOMAINS_FLAG, PRIVATE_URLS_FLAG = ("--no-media-urls", "--allowed-media-domains",
                                                         "--allow-private-media-urls")
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
# blocks that `ipaddress` does not classify (or counts as global) although no public server answers there,
# and the IPv6 forms whose last 32 bits are an IPv4 address
CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052
LOCAL_NAT64_PREFIX = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a network's own translator
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def numeric_ipv4(host: str) -> Optional[ipaddress.IPv4Address]:
    """`host` read as the C library reads a numeric IPv4 host (inet_aton): one to four parts, each decimal,
    octal after a leading 0 or hex after 0x, the last one filling the remaining bytes, so that 127.1,
    2130706433, 0x7f.1 and 0177.0.0.1 are all 127.0.0.1; None when `host` is not such a number.

    Written here because `ipaddress` reads only the dotted-decimal form and socket.inet_aton (glibc) also
    takes text after a space."""
    parts = host.split(".")
    if len(parts) > 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        return None
    values = [int(part, 16) if part[:2] in ("0x", "0X") else int(part, 8) if part.startswith("0") else int(part)
              for part in parts]
    *leading, last = values
    if any(value > 255 for value in leading) or last >= 256 ** (4 - len(leading)):
        return None
    number = last
    for index, value in enumerate(leading):
        number += value << (24 - 8 * index)
    return ipaddress.IPv4Address(number)


def ip_literal(host: str) -> Optional[IPAddress]:
    """The address that a URL host spells (an IPv6 address without its brackets, or any numeric IPv4
    spelling), or None when the host is a name."""
    address = numeric_ipv4(host)
    if address is not None:
        return address
    try:
        return ipaddress.IPv6Address(host)
    except ValueError:
        return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64, 6to4, IPv4-compatible), else None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64_PREFIX or (address in IPV4_COMPATIBLE and int(address) > 1):  # not :: or ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def non_public_kind(address: IPAddress) -> Optional[str]:
    """What keeps `address` from being a public internet address ('loopback', 'private', 'link-local',
    'carrier-grade NAT', 'multicast', ...), or None when it is one. An IPv6 form of an IPv4 address is
    judged by that IPv4 address."""
    if address.version == 6:
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return non_public_kind(embedded)
        if address.teredo is not None:
            return "Teredo tunnel"
        if address.is_site_local:
            return "site-local"
        if address in LOCAL_NAT64_PREFIX:
            return "private"
    elif address in CARRIER_GRADE_NAT:
        return "carrier-grade NAT"
    for kind, matches in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                          ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                          ("private", address.is_private), ("reserved", address.is_reserved)):
        if matches:
            return kind
    return None if address.is_global else "not globally routable"


def _bad_host_entry(entry: str) -> CogVLMError:
    return CogVLMError(f"{ALLOWED_DOMAINS_FLAG}: '{entry}' is not a host name; list bare names such as "
                       "images.example.org,*.cdn.example.com (no scheme, port or path)")


def _allowed_host(entry: str) -> str:
    """An allowlist entry in the spelling `canonical_host` gives URL hosts ('*.' kept in front)."""
    text = entry.strip().lower()
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    address = ip_literal(name)
    if address is not None and not wildcard:
        return str(address)
    if not name or address is not None or any(c in name for c in "/:@?#[]*%\\ "):
        raise _bad_host_entry(entry)
    try:
        name = httpx.URL(f"http://{name}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError):
        raise _bad_host_entry(entry) from None
    return ("*." if wildcard else "") + name.rstrip(".")


def canonical_host(url: httpx.URL) -> str:
    """The URL's host as allowlists compare it: lower case, IDNA (punycode) names without a trailing dot,
    addresses in their standard form."""
    host = url.raw_host.decode("ascii").lower()
    address = ip_literal(host)
    return str(address) if address is not None else host.rstrip(".")


@dataclass(frozen=True)
class MediaPolicy:
    """Which http(s) image URLs a front end fetches (local files and data: URIs are not URLs here).

    allow_urls: False refuses every URL (--no-media-urls). allowed_domains: when given, only hosts in it, on
    every redirect too: exact names (any case, IDNA or not), IP addresses, or '*.example.org' for every name
    under example.org (--allowed-media-domains a.com,b.org). allow_private: also fetch from hosts that
    resolve to loopback, private, link-local, carrier-grade NAT, multicast or other non-public addresses
    (--allow-private-media-urls); by default such a URL is refused before any connection is made.
    """
    allow_urls: bool = True
    allowed_domains: Optional[FrozenSet[str]] = None
    allow_private: bool = False

    def __post_init__(self):
        if self.allowed_domains is not None:
            entries = self.allowed_domains.split(",") if isinstance(self.allowed_domains, str) else self.allowed_domains
            domains = frozenset(_allowed_host(entry) for entry in entries if entry.strip())
            if not domains:
                raise CogVLMError(f"{ALLOWED_DOMAINS_FLAG} names no host; list the hosts images may come from, "
                                  "e.g. images.example.org,cdn.example.com")
            object.__setattr__(self, "allowed_domains", domains)
        if not self.allow_urls and (self.allowed_domains is not None or self.allow_private):
            unused = ALLOWED_DOMAINS_FLAG if self.allowed_domains is not None else PRIVATE_URLS_FLAG
            raise CogVLMError(f"{NO_URLS_FLAG} refuses every image URL, so {unused} would do nothing; "
                              "drop one of them")

    def allows_host(self, host: str) -> bool:
        """Whether the allowlist (if any) holds `host` (as `canonical_host` spells it)."""
        if self.allowed_domains is None or host in self.allowed_domains:
            return True
        return any(entry.startswith("*.") and host.endswith(entry[1:]) for entry in self.allowed_domains)


DEFAULT_MEDIA_POLICY = MediaPolicy()


def add_media_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The image-URL flags (--allowed-media-domains, --allow-private-media-urls, --no-media-urls), declared
    once for every front end; `media_policy(args)` reads them."""
    group = parser.add_argument_group("image URLs", "which http(s) image URLs are fetched (local files and "
                                      "data: URIs are not URLs); by default any host that resolves to a "
                                      "public address")
    group.add_argument(ALLOWED_DOMAINS_FLAG, dest="allowed_media_domains", default=None, metavar="HOSTS",
                       help="comma-separated hosts that image URLs may come from, on every redirect too "
                            "(exact names, or *.example.org for the names under it); others are refused")
    group.add_argument(PRIVATE_URLS_FLAG, dest="allow_private_media_urls", action="store_true",
                       help="also fetch from hosts that resolve to loopback, private, link-local or other "
                            "non-public addresses (refused by default; for a trusted network)")
    group.add_argument(NO_URLS_FLAG, dest="no_media_urls", action="store_true",
                       help="fetch no image URL at all: images come as data: URIs, uploads or files")
    return parser


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    """The MediaPolicy of the flags `add_media_args` declares (CogVLMError for a contradictory set)."""
    return MediaPolicy(allow_urls=not args.no_media_urls, allowed_domains=args.allowed_media_domains,
                       allow_private=args.allow_private_media_urls)


def _non_public(described: str, address: IPAddress, kind: str) -> ImageError:
    embedded = _embedded_ipv4(address) if address.version == 6 else None
    if embedded is not None:
        address = f"{address} = {embedded}"
    return ImageError(f"{described} resolves to a non-public address ({address}, {kind}); only public hosts are "
                      f"fetched: send the image as a data: URI (or a file), or, on a trusted network, start with "
                      f"{PRIVATE_URLS_FLAG}")


def _with_host(parts: urllib.parse.SplitResult, host: str) -> str:
    """The URL of `parts` with its host replaced (not an IPv6 one, which has brackets)."""
    userinfo, at, host_port = parts.netloc.rpartition("@")
    _, colon, port = host_port.partition(":")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}{colon}{port}"))


def check_url(url: str, policy: MediaPolicy = DEFAULT_MEDIA_POLICY, described: Optional[str] = None) -> httpx.URL:
    """`url` as it is requested, once it passes the checks that need no network: http(s), URLs allowed,
    host on the allowlist, an address host public (numeric IPv4 spellings read as the C library reads
    them, and requested in dotted form). ImageError otherwise. described: how errors name the URL."""
    described = described or f"image URL {url}"
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ImageError(f"{described} is not an http(s) URL; give an http(s) URL or a data: URI")
        if not policy.allow_urls:
            raise ImageError(f"{described}: image URLs are turned off ({NO_URLS_FLAG}); send the image as a "
                             "data: URI")
        address = numeric_ipv4(parts.hostname or "")
        if address is not None:  # httpx refuses 0177.0.0.1 and sends 2130706433 to the resolver as a name
            url = _with_host(parts, str(address))
        request_url = httpx.URL(url)
        if not request_url.raw_host:
            raise ImageError(f"{described} has no host; check the URL")
    except (ValueError, httpx.InvalidURL, UnicodeError) as e:  # urlsplit: bad port or brackets
        raise ImageError(f"{described} is not a valid URL ({e}); check the URL") from None
    host = canonical_host(request_url)
    if not policy.allows_host(host):
        raise ImageError(f"{described}: host {host} is not one of the allowed media domains "
                         f"({', '.join(sorted(policy.allowed_domains))}); use an image from those or send it as a "
                         "data: URI")
    address = ip_literal(host)
    kind = None if address is None or policy.allow_private else non_public_kind(address)
    if kind is not None:
        raise _non_public(described, address, kind)
    return request_url


# Fetching: one lookup, a connection to the checked address, redirects by hand ------------------

class _NonPublicAddress(Exception):
    """Raised instead of connecting; not an httpcore error, so httpx passes it on unchanged."""

    def __init__(self, address: IPAddress, kind: str):
        super().__init__(f"{address} is {kind}")
        self.address, self.kind = address, kind


async def resolve_checked(host: str, port: int, policy: MediaPolicy) -> List[IPAddress]:
    """The addresses to connect to for `host`: looked up once (an address host is not looked up), every one
    of them public unless the policy allows private ones (else _NonPublicAddress: a name with one private
    address among public ones is refused too)."""
    address = ip_literal(host)
    if address is not None:
        addresses = [address]
    else:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise httpcore.ConnectError(f"cannot resolve {host} ({e})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
    if not policy.allow_private:
        for address in addresses:
            kind = non_public_kind(address)
            if kind is not None:
                raise _NonPublicAddress(address, kind)
    return addresses


class _CheckedAddressBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend but for one step: `connect_tcp` resolves the host once, checks the
    addresses (resolve_checked) and connects to those very addresses. TLS (SNI, the certificate check) and
    the Host header keep the URL's name, and no second lookup happens between the check and the connection,
    so a DNS answer that changes in between (DNS rebinding) cannot lead to an internal host."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy
        self.network = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None,
                          local_address: Optional[str] = None, socket_options=None) -> httpcore.AsyncNetworkStream:
        failure = None
        for address in await resolve_checked(host, port, self.policy):
            try:
                return await self.network.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as e:  # the next address of the name, as socket.create_connection does
                failure = e
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self.network.sleep(seconds)


class _CheckedAddressTransport(httpx.AsyncHTTPTransport):
    """httpx's transport on a connection pool whose connections go through _CheckedAddressBackend. No
    proxy (a proxy would resolve the host itself, past the check); SSL_CERT_FILE / SSL_CERT_DIR still apply."""

    def __init__(self, policy: MediaPolicy, max_connections: int):
        ssl_context = httpx.create_ssl_context()
        super().__init__(verify=ssl_context, trust_env=False)
        # httpx takes no network backend, so the pool it made is replaced by the same kind with ours
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=max_connections, max_keepalive_connections=max_connections,
            keepalive_expiry=5.0, network_backend=_CheckedAddressBackend(policy))


class ImageFetcher:
    """Downloads image URLs under one MediaPolicy. Each hop of a URL is checked (`check_url`), its host
    resolved once and connected to at a checked address; redirects are followed by hand, at most
    MAX_REDIRECTS. `timeout` bounds connecting plus the whole download (cancelled when it passes), the byte
    cap is checked as the bytes arrive (after content decoding). A server keeps one fetcher: it holds the
    connection pool (at most `max_connections`) and the CA bundle."""

    def __init__(self, policy: MediaPolicy = DEFAULT_MEDIA_POLICY, max_connections: int = 16):
        self.policy = policy
        self.client = httpx.AsyncClient(transport=_CheckedAddressTransport(policy, max_connections),
                                        follow_redirects=False, trust_env=False, timeout=URL_TIMEOUT_S)

    async def __aenter__(self) -> "ImageFetcher":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(self, url: str, max_bytes: int, timeout: float = URL_TIMEOUT_S) -> bytes:
        """The body of the image URL `url` (at most `max_bytes`), or ImageError naming why not."""
        try:
            async with asyncio.timeout(timeout):
                return await self._follow(url, max_bytes)
        except (TimeoutError, httpx.TimeoutException):
            raise url_timed_out(url, timeout) from None
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:
            raise ImageError(f"cannot fetch image URL {url} ({type(e).__name__}); check the URL or your "
                             "network") from None

    async def _follow(self, url: str, max_bytes: int) -> bytes:
        target, described = url, f"image URL {url}"
        for redirects in range(MAX_REDIRECTS + 1):
            request_url = check_url(target, self.policy, described)
            try:
                async with self.client.stream("GET", request_url) as response:
                    if not response.is_redirect:
                        return await _read_body(response, url, max_bytes)
                    location = response.headers["location"]
            except _NonPublicAddress as refused:
                raise _non_public(described, refused.address, refused.kind) from None
            if redirects == MAX_REDIRECTS:
                raise ImageError(f"image URL {url} redirects more than {MAX_REDIRECTS} times; give the URL the "
                                 "image is at")
            target = urllib.parse.urljoin(str(request_url), location)
            described = f"image URL {target} (redirected from {url})"
        raise AssertionError("unreachable")


async def _read_body(response: httpx.Response, url: str, max_bytes: int) -> bytes:
    too_large = ImageError(f"image URL {url} is larger than {max_bytes // 2**20} MiB; use a smaller image")
    if response.status_code != 200:
        raise ImageError(f"image URL {url} answered HTTP {response.status_code}; check the URL")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise too_large
    return bytes(data)


async def fetch_url(url: str, max_bytes: int, timeout: float = URL_TIMEOUT_S,
                    policy: MediaPolicy = DEFAULT_MEDIA_POLICY) -> bytes:
    """The body of an http(s) image URL (at most `max_bytes`), fetched under `policy` by a fresh ImageFetcher
    (see there), or ImageError."""
    async with ImageFetcher(policy, max_connections=1) as fetcher:
        return await fetcher.fetch(url, max_bytes, timeout)
