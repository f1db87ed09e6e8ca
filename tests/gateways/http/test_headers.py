"""Header handling without a socket: what is forwarded, what is refused, what is masked."""

from __future__ import annotations

import pytest

from tether.gateways.http.errors import HTTPGatewayError
from tether.gateways.http.headers import Scrubber, inbound, outbound, record_headers

H = list[tuple[bytes, bytes]]


def _in(headers: H, injected: str = "x-api-key", cookies: bool = False):  # type: ignore[no-untyped-def]
    return inbound(headers, max_bytes=8192, injected=injected, forward_cookies=cookies)


def test_forwards_end_to_end_headers_only() -> None:
    got = _in(
        [
            (b"host", b"tether.test"),
            (b"authorization", b"Bearer agent.jwt.token"),
            (b"accept", b"application/json"),
            (b"content-type", b"application/json"),
            (b"content-length", b"2"),
            (b"connection", b"keep-alive, X-Api-Key, x-custom-hop"),
            (b"keep-alive", b"timeout=5"),
            (b"x-custom-hop", b"1"),
            (b"x-api-key", b"agent-supplied-key"),
            (b"te", b"trailers"),
            (b"upgrade", b"h2c"),
            (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
            (b"proxy-foo", b"1"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"forwarded", b"for=6.6.6.6"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"cookie", b"sid=agent"),
            (b"expect", b"100-continue"),
            (b"x-request-thing", b"kept"),
        ]
    )
    assert got.token == "agent.jwt.token"
    assert got.host == "tether.test"
    assert dict(got.forward) == {
        "accept": "application/json",
        "content-type": "application/json",
        "x-request-thing": "kept",
    }


def test_cookies_forwarded_when_the_service_allows() -> None:
    got = _in([(b"authorization", b"Bearer t"), (b"cookie", b"a=1")], cookies=True)
    assert ("cookie", "a=1") in got.forward


@pytest.mark.parametrize(
    "headers,why",
    [
        ([], "no token"),
        ([(b"authorization", b"Basic dTpw")], "must be 'Bearer"),
        ([(b"authorization", b"Bearer ")], "must be 'Bearer"),
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], "more than one"),
    ],
    ids=["missing", "basic", "empty", "two"],
)
def test_unusable_authorization(headers: H, why: str) -> None:
    got = _in(headers)
    assert got.token is None and got.auth_error is not None and why in got.auth_error


# Header values and framing a raw ASGI scope (or a lax server) can carry.
BAD_HEADERS: dict[str, tuple[H, int]] = {
    "crlf-in-value": ([(b"x-a", b"1\r\nX-Api-Key: forged")], 400),
    "lf-in-value": ([(b"x-a", b"1\nx-b: 2")], 400),
    "nul-in-value": ([(b"x-a", b"a\x00b")], 400),
    "del-in-value": ([(b"x-a", b"a\x7fb")], 400),
    "crlf-in-authorization": ([(b"authorization", b"Bearer a\r\nX: y")], 400),
    "space-in-name": ([(b"x a", b"1")], 400),
    "colon-in-name": ([(b"x:a", b"1")], 400),
    "upper-case-name": ([(b"X-A", b"1")], 400),  # ASGI names are lower case
    "te-not-chunked": ([(b"transfer-encoding", b"gzip, chunked")], 400),
    "te-obfuscated": ([(b"transfer-encoding", b"xchunked")], 400),
    "te-twice": ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], 400),
    "te-and-content-length": (
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
        400,
    ),
    "conflicting-content-length": ([(b"content-length", b"5"), (b"content-length", b"6")], 400),
    "non-numeric-content-length": ([(b"content-length", b"5, 5x")], 400),
    "too-many-headers": ([(f"x-h{i}".encode(), b"1") for i in range(101)], 431),
    "oversized-headers": ([(b"x-big", b"a" * 9000)], 431),
}


@pytest.mark.parametrize("headers,status", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_refuses(headers: H, status: int) -> None:
    with pytest.raises(HTTPGatewayError) as e:
        _in([(b"authorization", b"Bearer t"), *headers])
    assert e.value.status == status
    assert "forged" not in e.value.message


def test_outbound_drops_hop_by_hop_and_cookies_masks_secret_rewrites_location() -> None:
    scrub = Scrubber([b"s3cret-value"])
    got = outbound(
        [
            (b"Content-Type", b"application/json"),
            (b"Connection", b"close, X-Upstream-Private"),
            (b"X-Upstream-Private", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Set-Cookie", b"sid=upstream"),
            (b"X-Echo", b"you sent s3cret-value"),
            (b"Location", b"http://crm.internal/api/customers/1"),
        ],
        forward_cookies=False,
        scrub=scrub,
        base_url="http://crm.internal/api",
        prefix="/http/crm",
    )
    assert got == [
        (b"content-type", b"application/json"),
        (b"x-echo", b"you sent ************"),
        (b"location", b"/http/crm/customers/1"),
    ]


@pytest.mark.parametrize(
    "location,base,expected",
    [
        ("http://crm.internal/api/x?y=1", "http://crm.internal/api", "/http/crm/x?y=1"),
        ("http://crm.internal/api", "http://crm.internal/api", "/http/crm"),
        ("/api/x", "http://crm.internal/api", "/http/crm/x"),
        ("/apix/y", "http://crm.internal/api", "/apix/y"),
        ("/x", "http://crm.internal", "/http/crm/x"),
        ("http://crm.internal.evil/api/x", "http://crm.internal", "http://crm.internal.evil/api/x"),
        ("//elsewhere.example/x", "http://crm.internal/api", "//elsewhere.example/x"),
        ("//elsewhere.example/x", "http://crm.internal", "//elsewhere.example/x"),
    ],
)
def test_location_rewritten_only_inside_the_service(
    location: str, base: str, expected: str
) -> None:
    got = outbound(
        [(b"location", location.encode())],
        forward_cookies=False,
        scrub=None,
        base_url=base,
        prefix="/http/crm",
    )
    assert got == [(b"location", expected.encode())]


def test_foreign_location_left_alone() -> None:
    got = outbound(
        [(b"location", b"https://elsewhere.example/x")],
        forward_cookies=True,
        scrub=None,
        base_url="http://crm.internal/api",
        prefix="/http/crm",
    )
    assert got == [(b"location", b"https://elsewhere.example/x")]


def test_record_headers_redacts_credentials_and_the_injected_name() -> None:
    got = record_headers(
        [("authorization", "Bearer x"), ("x-crm-key", "k"), ("cookie", "a"), ("accept", "*/*")],
        "x-crm-key",
    )
    assert got == {
        "authorization": "[REDACTED]",
        "x-crm-key": "[REDACTED]",
        "cookie": "[REDACTED]",
        "accept": "*/*",
    }


def test_scrubber_masks_across_chunk_boundaries_keeping_length() -> None:
    s = Scrubber([b"SECRETVALUE"])
    stream = [b"abc SEC", b"RETVAL", b"UE def SECRETVALUE", b" end SE"]
    out = b"".join(s.feed(c) for c in stream) + s.end()
    assert out == b"abc *********** def *********** end SE"
    assert len(out) == sum(map(len, stream))


def test_scrubber_holds_back_nothing_that_cannot_start_a_secret() -> None:
    s = Scrubber([b"SECRETVALUE"])
    assert s.feed(b"data: one\n\n") == b"data: one\n\n"  # an SSE event goes out whole
    assert s.feed(b"data: S") == b"data: "  # only the 'S' could begin the secret
    assert s.feed(b"o\n\n") == b"So\n\n"
