"""Issue 4: URL refusal, checked at the function, without any network."""

from __future__ import annotations

import pytest

from pipeline.download.urlcheck import check_url, parse_ip_literal

REFUSED_ADDRESS = [
    "http://127.0.0.1/a.jpg",
    "http://127.1/a.jpg",
    "http://2130706433/a.jpg",  # 127.0.0.1 as one decimal number
    "http://0x7f000001/a.jpg",
    "http://0177.0.0.1/a.jpg",
    "http://localhost/a.jpg",
    "http://LOCALHOST./a.jpg",
    "http://api.localhost/a.jpg",
    "http://10.1.2.3/a.jpg",
    "http://172.16.0.1/a.jpg",
    "http://192.168.1.1:8080/a.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/a.jpg",  # shared address space (carrier-grade NAT)
    "http://0.0.0.0/a.jpg",
    "http://224.0.0.1/a.jpg",
    "http://240.0.0.1/a.jpg",
    "http://[::1]/a.jpg",
    "http://[fe80::1]/a.jpg",
    "http://[fc00::1]/a.jpg",
    "http://[::ffff:10.0.0.1]/a.jpg",
    "http://[::ffff:169.254.169.254]/a.jpg",
]

ALLOWED = [
    "http://example.com/a.jpg",
    "https://images.example.org:8443/x/y.png?w=200",
    "http://93.184.216.34/a.jpg",
    "http://[2606:2800:220:1:248:1893:25c8:1946]/a.jpg",
    "https://bücher.example/a.jpg",  # IDN hostname: a public name
    "http://xn--bcher-kva.example/a.jpg",
    "http://1e100.net/a.jpg",  # starts with digits, still a hostname
]


@pytest.mark.parametrize("url", REFUSED_ADDRESS)
def test_private_and_special_addresses_refused(url):
    assert check_url(url) == "refused_address"


@pytest.mark.parametrize("url", ALLOWED)
def test_public_addresses_allowed(url):
    assert check_url(url) is None


@pytest.mark.parametrize(
    "url,reason",
    [
        ("ftp://example.com/a.jpg", "refused_scheme"),
        ("file:///etc/passwd", "refused_scheme"),
        ("gopher://example.com/", "refused_scheme"),
        ("data:image/png;base64,AAAA", "refused_scheme"),
        ("javascript:alert(1)", "refused_scheme"),
        ("http://user:pass@example.com/a.jpg", "refused_credentials"),
        ("http://user@example.com/a.jpg", "refused_credentials"),
        ("http:///a.jpg", "invalid_url"),
        ("http://example.com:99999/a.jpg", "invalid_url"),
        ("", "invalid_url"),
        (None, "invalid_url"),
    ],
)
def test_schemes_credentials_and_garbage(url, reason):
    assert check_url(url) == reason


def test_opt_in_allows_addresses_but_never_schemes_or_credentials():
    assert check_url("http://127.0.0.1:8000/a.jpg", allow_private=True) is None
    assert check_url("http://10.0.0.1/a.jpg", allow_private=True) is None
    assert check_url("file:///etc/passwd", allow_private=True) == "refused_scheme"
    assert check_url("http://u:p@127.0.0.1/", allow_private=True) == "refused_credentials"


def test_ip_literal_parsing():
    assert str(parse_ip_literal("0x7f.1")) == "127.0.0.1"
    assert str(parse_ip_literal("[::1]")) == "::1"
    assert parse_ip_literal("example.com") is None
    assert parse_ip_literal("deadbeef.com") is None


TRICKY = [
    *REFUSED_ADDRESS,
    *ALLOWED,
    "HTTP://EXAMPLE.COM/A.JPG",
    "http://example.com./a.jpg",
    "http://example.com",
    "http://example.com?x=1",
    "http://example.com#f",
    "http://a..b.com/",
    "http://-a.com/x",
    "http://1.2.3/a.jpg",
    "http://0x7f.1/a.jpg",
    "http://0x/a.jpg",
    "http://012/a.jpg",
    "http://a.0x1f/a.jpg",
    "http://cafe/a.jpg",
    "http://x.localhost./a.jpg",
    "http://localhost.example.com/a.jpg",
    "http://example.com:8080/a.jpg",
    "http://example.com:0/a.jpg",
    "http://example.com:/a.jpg",
    "http://ex ample.com/a.jpg",
    "http://example.com/a b.jpg",
    "http://exa\tmple.com/a.jpg",
    " http://example.com/a.jpg",
    "http://example.com\\@10.0.0.1/",
    "http://evil.com@127.0.0.1/",
    "http://[::1/",
    "http://[2001:db8::1]/a.jpg",
    "http://[64:ff9b::a00:1]/a.jpg",
    "https://例え.jp/a.jpg",
    "//example.com/a.jpg",
    "example.com/a.jpg",
    "HtTpS://Example.COM/%2e%2e/a.jpg",
    None,
    "",
]


@pytest.mark.parametrize("allow_private", [False, True])
def test_vectorised_check_agrees_with_check_url(allow_private):
    """check_urls settles most URLs with Arrow regexes: it must answer exactly like check_url."""
    import numpy as np
    import pyarrow as pa

    from pipeline.download.urlcheck import check_urls

    rng = np.random.default_rng(0)
    alphabet = list("abcx0179.-:/@[]%?#\\ \t") + [
        "localhost",
        "0x",
        "127",
        "http://",
        "https://",
        "::",
    ]
    fuzz = [
        "http://" + "".join(rng.choice(alphabet, size=int(rng.integers(1, 12))))
        for _ in range(2000)
    ]
    urls = TRICKY + fuzz
    expected = [check_url(u, allow_private) for u in urls]
    assert check_urls(urls, allow_private) == expected
    assert (
        check_urls(pa.chunked_array([urls[:10], urls[10:]], pa.string()), allow_private) == expected
    )
    assert check_urls([], allow_private) == []
