"""The requests and httpx adapters sign what their client actually sends: checked on prepared
requests, and once on the wire against a local server that verifies what it received."""

import asyncio
import http.server
import json
import threading

import httpx
import pytest
import requests

from portcullis_sign import (
    HttpxSignatureAuth,
    SignatureAuth,
    SignatureError,
    SigningKey,
    parse_header,
    verify,
)

SECRET = b"0123456789abcdef0123456789abcdef"
KEY_ID = "client-42-2026-11"
KEYS = {KEY_ID: SigningKey(SECRET, client="client-42"), "k512": SigningKey(SECRET, "hmac-sha512")}


def prepare(method, url, **kwargs):
    kwargs.setdefault("auth", SignatureAuth(KEY_ID, SECRET))
    return requests.Request(method, url, **kwargs).prepare()


def verify_prepared(r, host):
    return verify(r.headers, r.method, r.path_url, host, r.body or b"", keys=KEYS)


# requests


def test_requests_get_with_query():
    r = prepare("GET", "http://Svc.Local:8080/signed/items?b=2&a=%20x")
    assert r.headers["Authorization"].startswith(f'Signature v1, keyId="{KEY_ID}", ts="')
    assert verify_prepared(r, "svc.local:8080").client == "client-42"


def test_requests_post_json():
    r = prepare("POST", "http://svc:8080/signed/tx", json={"amount": "12.50"})
    assert isinstance(r.body, bytes)
    assert verify_prepared(r, "svc:8080")


def test_requests_sha512():
    r = prepare("POST", "http://svc:8080/signed/tx", data=b"x", auth=SignatureAuth("k512", SECRET, "hmac-sha512"))
    assert parse_header(r.headers["Authorization"]).alg == "hmac-sha512"
    assert verify_prepared(r, "svc:8080").algorithm == "hmac-sha512"


def test_requests_str_body_is_sent_as_the_signed_utf8_bytes():
    r = prepare("POST", "http://svc/signed", data="héllo wörld")
    assert r.body == "héllo wörld".encode("utf-8")
    assert r.headers["Content-Length"] == str(len(r.body))
    assert verify_prepared(r, "svc")


def test_requests_form_and_multipart_bodies():
    form = prepare("POST", "http://svc/signed", data={"a": "1", "b": "x y"})
    multipart = prepare("POST", "http://svc/signed", files={"f": ("a.txt", b"abc")})
    assert verify_prepared(form, "svc") and verify_prepared(multipart, "svc")


def test_requests_streaming_body_is_refused():
    with pytest.raises(TypeError, match="streaming body"):
        prepare("POST", "http://svc/signed", data=(c for c in [b"a", b"b"]))


def test_requests_bearer_moves_the_signature_to_x_signature():
    r = prepare("GET", "http://svc/signed", headers={"Authorization": "Bearer eyJ.a.b"})
    assert r.headers["Authorization"] == "Bearer eyJ.a.b"
    assert verify_prepared(r, "svc")
    assert r.headers["X-Signature"].startswith("Signature v1, ")


def test_requests_other_authorization_is_refused():
    with pytest.raises(ValueError, match="Basic"):
        prepare("GET", "http://svc/signed", headers={"Authorization": "Basic dTpw"})


@pytest.mark.parametrize(
    "url,host",
    [
        ("http://svc:80/x", "svc"),
        ("https://svc:443/x", "svc"),
        ("https://svc:80/x", "svc:80"),
        ("http://[::1]:8080/x", "[::1]:8080"),
        ("http://user:pw@svc:9000/x", "svc:9000"),
    ],
)
def test_requests_host_is_the_one_http_client_sends(url, host):
    assert verify_prepared(prepare("GET", url), host)


def test_requests_explicit_host_header_wins():
    r = prepare("GET", "http://127.0.0.1:8080/signed", headers={"Host": "api.example.com"})
    assert verify_prepared(r, "api.example.com")


def test_requests_target_is_path_url_after_dot_segment_removal():
    r = prepare("GET", "http://svc/a/../signed/./x?q=1#frag")
    assert r.path_url == "/signed/x?q=1"
    assert verify_prepared(r, "svc")


# httpx


def httpx_signed(request, auth=None):
    flow = (auth or HttpxSignatureAuth(KEY_ID, SECRET)).sync_auth_flow(request)
    return next(flow)


def verify_httpx(r):
    return verify(
        r.headers, r.method, r.url.raw_path.decode("ascii"), r.headers["host"], r.content, keys=KEYS
    )


def test_httpx_get_with_query():
    r = httpx_signed(httpx.Request("GET", "http://Svc.Local:8080/signed/items?b=2&a=%20x"))
    assert r.headers["authorization"].startswith(f'Signature v1, keyId="{KEY_ID}"')
    assert verify_httpx(r).client == "client-42"


def test_httpx_auth_flow_directly():
    request = httpx.Request("POST", "http://svc:8080/signed/tx", json={"amount": "12.50"})
    r = next(HttpxSignatureAuth(KEY_ID, SECRET).auth_flow(request))
    assert verify_httpx(r)


def test_httpx_streamed_body_is_read_and_signed():
    r = httpx_signed(httpx.Request("POST", "http://svc/signed", content=iter([b"ab", b"cd"])))
    assert r.content == b"abcd"
    assert verify_httpx(r)


def test_httpx_sha512_and_bearer():
    request = httpx.Request("GET", "http://svc/signed", headers={"Authorization": "Bearer eyJ.a.b"})
    r = httpx_signed(request, HttpxSignatureAuth("k512", SECRET, "hmac-sha512"))
    assert r.headers["authorization"] == "Bearer eyJ.a.b"
    assert parse_header(r.headers["x-signature"]).alg == "hmac-sha512"
    assert verify_httpx(r).algorithm == "hmac-sha512"


def test_httpx_default_port_is_dropped_from_host():
    r = httpx_signed(httpx.Request("GET", "https://svc:443/x"))
    assert r.headers["host"] == "svc"
    assert verify_httpx(r)


def test_httpx_async_client():
    seen = []

    def handler(request):
        seen.append(verify_httpx(request))
        return httpx.Response(200)

    async def main():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, auth=HttpxSignatureAuth(KEY_ID, SECRET)) as c:
            r = await c.post("http://svc/signed?x=1", json={"a": 1})
            assert r.status_code == 200

    asyncio.run(main())
    assert seen and seen[0].key_id == KEY_ID


# On the wire: a loopback server verifies the request line, Host and body it received.


class VerifyingHandler(http.server.BaseHTTPRequestHandler):
    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            v = verify(dict(self.headers.items()), self.command, self.path, self.headers["Host"], body, keys=KEYS)
            status, answer = 200, {"key_id": v.key_id}
        except SignatureError as e:
            status, answer = 401, {"code": e.code, "string_to_sign": e.string_to_sign}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _handle

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def wire_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), VerifyingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "method,path,kwargs",
    [
        ("GET", "/signed/items?b=2&a=%20x&c=%2F", {}),
        ("POST", "/signed/tx", {"json": {"amount": "12.50", "note": "é"}}),
        ("PUT", "/signed/raw", {"data": "héllo"}),
    ],
)
def test_on_the_wire_with_requests_and_httpx(wire_server, method, path, kwargs):
    r = requests.request(method, wire_server + path, auth=SignatureAuth(KEY_ID, SECRET), timeout=5, **kwargs)
    assert r.status_code == 200, r.text
    if "data" in kwargs:
        kwargs = {"content": kwargs["data"].encode()}
    with httpx.Client(auth=HttpxSignatureAuth(KEY_ID, SECRET), timeout=5) as c:
        r = c.request(method, wire_server + path, **kwargs)
    assert r.status_code == 200, r.text
