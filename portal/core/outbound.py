"""The destination rule: what Carnet agrees to call when a URL comes from input.

Webhook endpoints and web push subscription endpoints are URLs that callers give us and that
the worker later POSTs to. Left alone, that turns Carnet into a proxy into its own network
(the database port, cloud metadata at 169.254.169.254, an admin page on localhost) and its
delivery log into a port scanner. Every such URL goes through this module twice:

- :func:`check_url` when it is stored: syntax, scheme, an IDNA-encodable host, no userinfo,
  no privileged port other than 80/443, and a host that is neither a private or reserved
  address in any notation (decimal ``2130706433``, octal, hex, short ``127.1``, IPv4-mapped
  IPv6) nor a name kept for local use (``localhost``, ``*.local``, ``*.internal``, …);
- :func:`pin` when it is called: the name is resolved, **every** address it resolves to is
  checked, and the request goes to the checked address (``Host`` header and TLS server name
  still say the name), so a DNS answer cannot change between the check and the connection.
  Redirects are never followed by the callers.

``allow_private`` (setting ``WEBHOOK_ALLOW_PRIVATE_NETWORKS``) lifts the address and name
rules for people who run their receiver on their own machine, and for the test suite's local
receivers; the syntax, scheme and port rules always hold.

The module knows nothing of Flask or the database.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import idna

MAX_URL_LENGTH = 2048
RESERVED_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa")
RESERVED_NAMES = frozenset({"localhost", "localhost.localdomain", "broadcasthost"})
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Sequence[tuple[Any, ...]]]


class RefusedDestination(ValueError):
    """A URL Carnet will not call. ``reason`` is a stable code, ``str()`` a sentence that is
    safe to show a caller (it never contains the text of a network error)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Destination:
    """A checked URL, split into what a pinned request needs."""

    scheme: str
    host: str  # ASCII (IDNA-encoded) name or IP literal, without brackets
    port: int
    target: str  # path and query, at least "/"
    explicit_port: bool

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.target}"


@dataclass(frozen=True)
class Pinned:
    """Where to connect for one request: the checked address, and the name to present."""

    destination: Destination
    address: str

    @property
    def url(self) -> str:
        """The URL with the address in place of the name (for the HTTP client)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.destination.scheme}://{host}:{self.destination.port}" \
               f"{self.destination.target}"

    @property
    def host_header(self) -> str:
        return self.destination.netloc

    @property
    def server_hostname(self) -> str:
        """The name TLS sends (SNI) and verifies the certificate against."""
        return self.destination.host

    def httpx_options(self) -> dict[str, Any]:
        """Keyword arguments for an ``httpx.Client`` request to this destination."""
        return {"headers": {"Host": self.host_header},
                "extensions": {"sni_hostname": self.server_hostname}}


def check_url(url: object, *, allow_private: bool = False,
              schemes: Sequence[str] = ("https", "http")) -> Destination:
    """The registration-time rule. Returns the URL split and normalised (IDNA host)."""
    if not isinstance(url, str) or not url:
        raise RefusedDestination("invalid_url", "The URL is empty.")
    if len(url) > MAX_URL_LENGTH:
        raise RefusedDestination("invalid_url",
                                 f"The URL is longer than {MAX_URL_LENGTH} characters.")
    if _CONTROL.search(url):
        raise RefusedDestination("invalid_url", "The URL contains spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedDestination("invalid_url", "The URL is not valid.") from exc
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise RefusedDestination("scheme", f"The URL must start with {wanted}.")
    if "@" in parts.netloc:
        raise RefusedDestination("userinfo",
                                 "The URL must not contain a user name or password.")
    host = _host(parts)
    if port is not None and port < 1024 and port not in (80, 443):
        raise RefusedDestination("port", "The URL's port must be 80, 443 or 1024 and above.")
    if port == 0:
        raise RefusedDestination("port", "The URL's port must be 80, 443 or 1024 and above.")
    address = ip_literal(host)
    if address is not None:
        host = str(address)
        if not allow_private and not is_public(address):
            raise RefusedDestination("private_address",
                                     "The URL points to a private or reserved network address.")
    elif not allow_private:
        _check_name(host)
    default = 443 if scheme == "https" else 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Destination(scheme, host, port or default, target, port is not None)


def _host(parts: SplitResult) -> str:
    raw = parts.hostname  # lower-cased, brackets removed
    if not raw:
        raise RefusedDestination("invalid_url", "The URL has no host name.")
    if parts.netloc.split("@")[-1].startswith("["):
        return raw  # an IPv6 literal; checked by ip_literal
    raw = raw.rstrip(".")
    if not raw:
        raise RefusedDestination("invalid_url", "The URL has no host name.")
    if ip_literal(raw) is not None:
        return raw
    try:
        ascii_host = idna.encode(raw, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise RefusedDestination("invalid_url", "The URL's host name is not valid.") from exc
    if len(ascii_host) > 253 or not all(
            re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", label)
            for label in ascii_host.split(".")):
        raise RefusedDestination("invalid_url", "The URL's host name is not valid.")
    return ascii_host


def _check_name(host: str) -> None:
    if host in RESERVED_NAMES or host.endswith(RESERVED_SUFFIXES):
        raise RefusedDestination("reserved_name",
                                 "The URL's host name is reserved for local networks.")
    if "." not in host:
        raise RefusedDestination("reserved_name",
                                 "The URL's host name must be a full domain name.")


def ip_literal(host: str) -> IPAddress | None:
    """The address a host written as an IP stands for, in any notation a resolver accepts
    (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``, ``::ffff:127.0.0.1``), else None."""
    host = host.strip("[]")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    if not re.fullmatch(r"[0-9a-fA-FxX.]+", host) or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_public(address: IPAddress) -> bool:
    """True for an address on the public internet, looking through IPv6 forms that carry an
    IPv4 address (mapped, compatible, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public(embedded):
            return False
        if address.is_site_local:
            return False
    return not (address.is_loopback or address.is_private or address.is_link_local
                or address.is_multicast or address.is_reserved or address.is_unspecified
                or not address.is_global)


def pin(destination: Destination, *, allow_private: bool = False,
        resolver: Resolver = socket.getaddrinfo) -> Pinned:
    """Resolve the destination now and choose the address to connect to.

    Every address the name resolves to must pass (a name answering with one public and one
    private address is refused: the client could pick either). Raises
    :class:`RefusedDestination` with reason ``private_address`` or ``unresolvable``.
    """
    literal = ip_literal(destination.host)
    if literal is not None:
        addresses = [literal]
    else:
        if not allow_private:
            _check_name(destination.host)
        try:
            infos = resolver(destination.host, destination.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise RefusedDestination("unresolvable",
                                     "The URL's host name does not resolve.") from exc
        addresses = []
        for info in infos:
            found = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if found not in addresses:
                addresses.append(found)
        if not addresses:
            raise RefusedDestination("unresolvable", "The URL's host name does not resolve.")
    if not allow_private and not all(is_public(a) for a in addresses):
        raise RefusedDestination("private_address",
                                 "The URL points to a private or reserved network address.")
    return Pinned(destination, str(addresses[0]))


def check_and_pin(url: str, *, allow_private: bool = False,
                  schemes: Sequence[str] = ("https", "http"),
                  resolver: Resolver = socket.getaddrinfo) -> Pinned:
    """Both rules at once, as a sender applies them just before a request."""
    return pin(check_url(url, allow_private=allow_private, schemes=schemes),
               allow_private=allow_private, resolver=resolver)
