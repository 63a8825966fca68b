"""The destination rule for URLs that come from input (webhooks, push endpoints)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from portal.core.outbound import RefusedDestination, check_and_pin, check_url, ip_literal, pin

PRIVATE_URLS = [
    "http://127.0.0.1:5432/",
    "http://localhost/",
    "http://LOCALHOST./hook",
    "http://api.localhost/",
    "http://db.internal/",
    "http://printer.local/",
    "http://intranet/",
    "http://[::1]/",
    "http://2130706433/",
    "http://017700000001/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://127.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://[fec0::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:a00:1]/",
    "http://[2002:a00:1::]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_and_local_destinations_are_refused(url: str) -> None:
    with pytest.raises(RefusedDestination) as refused:
        check_url(url)
    assert refused.value.reason in {"private_address", "reserved_name"}
    check_url(url, allow_private=True)  # the setting lifts exactly this rule


@pytest.mark.parametrize("url, reason", [
    ("https://user:pass@example.com/", "userinfo"),
    ("https://user@example.com/", "userinfo"),
    ("ftp://example.com/", "scheme"),
    ("javascript:alert(1)", "scheme"),
    ("https://example.com:22/", "port"),
    ("https://example.com:0/", "port"),
    ("https://example.com:99999/", "invalid_url"),
    ("https://¦ïQê;/", "invalid_url"),
    ("https://exa mple.com/", "invalid_url"),
    ("https://example.com/\nX-Injected: 1", "invalid_url"),
    ("https:///path", "invalid_url"),
    ("https://-bad-.example.com/", "invalid_url"),
    ("https://example.com/" + "a" * 2100, "invalid_url"),
    ("", "invalid_url"),
])
def test_malformed_urls_are_refused_whatever_the_setting(url: str, reason: str) -> None:
    for allow in (False, True):
        with pytest.raises(RefusedDestination) as refused:
            check_url(url, allow_private=allow)
        assert refused.value.reason == reason


@pytest.mark.parametrize("url, host, port", [
    ("https://hooks.example.com/carnet", "hooks.example.com", 443),
    ("http://hooks.example.com:8080/x?y=1", "hooks.example.com", 8080),
    ("https://bücher.example/", "xn--bcher-kva.example", 443),
    ("https://93.184.215.14/", "93.184.215.14", 443),
    ("https://[2001:4860:4860::8888]/", "2001:4860:4860::8888", 443),
])
def test_public_destinations_are_accepted(url: str, host: str, port: int) -> None:
    destination = check_url(url)
    assert (destination.host, destination.port) == (host, port)


def test_ip_literals_in_every_notation() -> None:
    for written in ("2130706433", "0x7f000001", "017700000001", "127.1", "0x7f.0.0.1"):
        assert str(ip_literal(written)) == "127.0.0.1"
    assert ip_literal("example.com") is None
    assert ip_literal("1a.be") is None


def fake_dns(answers: dict[str, list[str]]) -> Any:
    """DNS is the one part that cannot run here: a resolver answering from a table."""
    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in answers[host]]
    return resolve


def test_a_name_resolving_to_a_private_address_is_refused_at_call_time() -> None:
    destination = check_url("https://rebind.example.com/hook")  # passes when stored
    for answer in (["10.0.0.7"], ["93.184.215.14", "127.0.0.1"], ["::ffff:169.254.169.254"]):
        with pytest.raises(RefusedDestination) as refused:
            pin(destination, resolver=fake_dns({"rebind.example.com": answer}))
        assert refused.value.reason == "private_address"
    with pytest.raises(RefusedDestination) as refused:
        pin(destination, resolver=fake_dns({}))
    assert refused.value.reason == "unresolvable"
    pinned = pin(destination, resolver=fake_dns({"rebind.example.com": ["93.184.215.14"]}))
    assert pinned.url == "https://93.184.215.14:443/hook"
    assert (pinned.host_header, pinned.server_hostname) == ("rebind.example.com",
                                                            "rebind.example.com")


class Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Recorder.seen.append({"host": self.headers["Host"], "path": self.path})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.seen.clear()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_pinned_request_goes_to_the_checked_address_and_names_the_host(receiver: int) -> None:
    resolver = fake_dns({"receiver.example.com": ["127.0.0.1"]})
    url = f"http://receiver.example.com:{receiver}/in?x=1"
    with pytest.raises(RefusedDestination):
        check_and_pin(url, resolver=resolver)
    pinned = check_and_pin(url, allow_private=True, resolver=resolver)
    with httpx.Client() as client:
        answer = client.post(pinned.url, content=b"{}", **pinned.httpx_options())
    assert answer.status_code == 204
    assert Recorder.seen == [{"host": f"receiver.example.com:{receiver}", "path": "/in?x=1"}]
