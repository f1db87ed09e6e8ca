"""Request targets: normalised once from the raw bytes; anything read two ways is refused."""

from __future__ import annotations

import pytest

from tether.gateways.http.paths import PathError, parse_target

GOOD = {
    "plain": (b"/http/crm/customers/42", "crm", "/customers/42", "/customers/42"),
    "service-root": (b"/http/crm", "crm", "/", "/"),
    "service-root-slash": (b"/http/crm/", "crm", "/", "/"),
    "trailing-slash-kept": (b"/http/crm/customers/", "crm", "/customers/", "/customers/"),
    "dot-removed": (b"/http/crm/./customers/./42", "crm", "/customers/42", "/customers/42"),
    "dotdot-inside": (b"/http/crm/a/b/../../customers", "crm", "/customers", "/customers"),
    "encoded-dotdot-inside": (b"/http/crm/a/%2e%2E/customers", "crm", "/customers", "/customers"),
    "empty-segments": (b"/http/crm//customers///42", "crm", "/customers/42", "/customers/42"),
    "encoded-space": (b"/http/crm/a%20b", "crm", "/a b", "/a%20b"),
    "unicode": (b"/http/crm/caf%C3%A9", "crm", "/caf\u00e9", "/caf%C3%A9"),
    "literal-percent": (b"/http/crm/100%25", "crm", "/100%", "/100%25"),
    "sub-delims-kept": (b"/http/crm/a:b@c;d=e", "crm", "/a:b@c;d=e", "/a:b@c;d=e"),
}


@pytest.mark.parametrize("raw,service,path,encoded", GOOD.values(), ids=GOOD.keys())
def test_normalises(raw: bytes, service: str, path: str, encoded: str) -> None:
    t = parse_target(raw)
    assert (t.service, t.path, t.encoded) == (service, path, encoded)
    assert t.resource == service + path


# Each would let a request be matched as one thing and routed upstream as another.
BAD_PATHS = {
    "dotdot-escapes-service": b"/http/crm/../admin",
    "dotdot-escapes-after-descent": b"/http/crm/customers/../../admin",
    "encoded-dotdot-escapes": b"/http/crm/%2e%2e/admin",
    "mixed-case-encoded-dotdot": b"/http/crm/%2E%2e/admin",
    "half-encoded-dotdot": b"/http/crm/.%2e/admin",
    "encoded-slash": b"/http/crm/customers%2f..%2fadmin",
    "encoded-slash-upper": b"/http/crm/a%2Fb",
    "double-encoded-dotdot": b"/http/crm/%252e%252e/admin",
    "double-encoded-slash": b"/http/crm/a%252fb",
    "backslash": b"/http/crm/..\\admin",
    "encoded-backslash": b"/http/crm/..%5cadmin",
    "tomcat-dotdot-semicolon": b"/http/crm/..;/admin",
    "dot-semicolon": b"/http/crm/.;x/customers",
    "encoded-nul": b"/http/crm/a%00b",
    "encoded-crlf": b"/http/crm/a%0d%0aX-Injected:%201",
    "invalid-utf8": b"/http/crm/%ff%fe",
    "malformed-escape": b"/http/crm/%zz",
    "truncated-escape": b"/http/crm/a%2",
    "raw-space": b"/http/crm/a b",
    "raw-non-ascii": "/http/crm/caf\u00e9".encode(),
    "raw-control": b"/http/crm/a\x01b",
}


@pytest.mark.parametrize("raw", BAD_PATHS.values(), ids=BAD_PATHS.keys())
def test_refuses(raw: bytes) -> None:
    with pytest.raises(PathError) as e:
        parse_target(raw)
    assert e.value.status == 400


BAD_QUERIES = {
    "raw-space": b"a=1 b",
    "crlf": b"a=1\r\nX: y",
    "fragment": b"a=1#frag",
    "non-ascii": "a=\u00e9".encode(),
}


@pytest.mark.parametrize("query", BAD_QUERIES.values(), ids=BAD_QUERIES.keys())
def test_refuses_query(query: bytes) -> None:
    with pytest.raises(PathError):
        parse_target(b"/http/crm/x", query)


def test_query_forwarded_as_sent() -> None:
    t = parse_target(b"/http/crm/search", b"q=a%20b&page=2")
    assert t.query == "q=a%20b&page=2"
    assert t.path == "/search"


@pytest.mark.parametrize("raw", [b"/http/", b"/other/crm", b"/http//customers"])
def test_no_service(raw: bytes) -> None:
    with pytest.raises(PathError) as e:
        parse_target(raw)
    assert e.value.status == 404
