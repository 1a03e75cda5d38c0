"""Proxy configuration as curl and requests users expect it: URLs, *_proxy and no_proxy."""

from __future__ import annotations

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.tunnel import ProxyConfig
from wavesync_proto.tunnel.proxy_env import (
    bypasses_proxy,
    parse_proxy_url,
    proxy_from_environment,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://squid:3128", ProxyConfig(host="squid", port=3128)),
        ("http://squid", ProxyConfig(host="squid", port=80)),
        ("squid:3128", ProxyConfig(host="squid", port=3128)),
        ("HTTP://Squid:3128/", ProxyConfig(host="squid", port=3128)),
        (
            "http://al%40ice:p%3Ass@10.0.0.1:8080",
            ProxyConfig(host="10.0.0.1", port=8080, username="al@ice", password="p:ss"),
        ),
        ("http://bob@[::1]:3128", ProxyConfig(host="::1", port=3128, username="bob")),
    ],
)
def test_proxy_urls(url: str, expected: ProxyConfig) -> None:
    assert parse_proxy_url(url) == expected
    assert ProxyConfig.from_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("https://squid:3128", "only http:// proxies"),
        ("socks5://squid:1080", "only http:// proxies"),
        ("http://squid:99999", "bad proxy URL"),
        ("http://:3128", "names no host"),
        ("http://squid:3128/path", "no path"),
        ("http://squid:0", "port 0"),
    ],
)
def test_bad_proxy_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        parse_proxy_url(url)


def test_the_variable_follows_tls_lower_case_wins_and_all_proxy_is_the_fallback() -> None:
    environ = {
        "HTTP_PROXY": "http://upper:1",
        "http_proxy": "http://lower:2",
        "HTTPS_PROXY": "http://secure:3",
    }
    assert proxy_from_environment("m", 80, tls=False, environ=environ) == ProxyConfig(
        host="lower", port=2
    )
    assert proxy_from_environment("m", 443, tls=True, environ=environ) == ProxyConfig(
        host="secure", port=3
    )
    fallback = {"ALL_PROXY": "http://every:4", "http_proxy": "  "}  # empty counts as unset
    assert proxy_from_environment("m", 80, tls=False, environ=fallback) == ProxyConfig(
        host="every", port=4
    )
    assert proxy_from_environment("m", 80, tls=False, environ={}) is None


def test_no_proxy_is_checked_first() -> None:
    environ = {"http_proxy": "http://squid:3128", "NO_PROXY": "example.com"}
    assert proxy_from_environment("api.example.com", 80, tls=False, environ=environ) is None
    assert proxy_from_environment("example.org", 80, tls=False, environ=environ) is not None


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "bypass"),
    [
        ("anything", 80, "*", True),
        ("example.com", 80, "example.com", True),
        ("a.b.example.com", 80, "example.com", True),
        ("badexample.com", 80, "example.com", False),
        ("example.com", 80, ".example.com", True),
        ("a.example.com", 80, "*.example.com", True),
        ("A.Example.COM.", 80, "example.com", True),
        ("example.com", 8080, "example.com:8080", True),
        ("example.com", 80, "example.com:8080", False),
        ("10.1.2.3", 80, "10.0.0.0/8", True),
        ("11.1.2.3", 80, "10.0.0.0/8", False),
        ("127.0.0.1", 80, "localhost, 127.0.0.1", True),
        ("::1", 80, "::1", True),
        ("[::1]", 443, "[::1]:443", True),
        ("fd00::5", 80, "fd00::/8", True),
        ("10.1.2.3", 80, "10.1.2", False),  # no partial-address matching
        ("host", 80, " , ,", False),
        ("host", 80, "other host", True),  # space-separated too
    ],
)
def test_no_proxy_rules(host: str, port: int, no_proxy: str, bypass: bool) -> None:
    assert bypasses_proxy(host, port, no_proxy) is bypass
