import hashlib
import hmac
import re
import subprocess
import sys
import time

import pytest

from portcullis_sign import (
    new_nonce,
    parse_header,
    sign_request,
    split_url,
    string_to_sign,
)

SECRET = b"0123456789abcdef0123456789abcdef"
NONCE = "q3J8x0bV2mN5pL7tK9wZ"
TS = 1764000000


def test_string_to_sign_uppercases_method_and_lowercases_host_only():
    s = string_to_sign("post", "/A/B?Q=X%2f", "API.Example.COM:8080", TS, NONCE, b"x")
    assert s.split("\n") == [
        "v1",
        "POST",
        "/A/B?Q=X%2f",
        "api.example.com:8080",
        "1764000000",
        NONCE,
        hashlib.sha256(b"x").hexdigest(),
    ]
    assert not s.endswith("\n")


def test_string_to_sign_hashes_the_empty_body():
    s = string_to_sign("GET", "/", "h", TS, NONCE, b"")
    assert s.endswith("\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize("field", ["method", "target", "host", "nonce"])
def test_string_to_sign_refuses_line_breaks(field):
    args = dict(method="GET", target="/", host="h", nonce=NONCE)
    args[field] += "\nx"
    with pytest.raises(ValueError):
        string_to_sign(args["method"], args["target"], args["host"], TS, args["nonce"], b"")


@pytest.mark.parametrize("ts", [-1, 10_000_000_000, "01", "+1", "1.5", "", "١٢"])
def test_string_to_sign_refuses_bad_timestamps(ts):
    with pytest.raises(ValueError):
        string_to_sign("GET", "/", "h", ts, NONCE, b"")


def test_string_to_sign_refuses_str_body():
    with pytest.raises(TypeError):
        string_to_sign("GET", "/", "h", TS, NONCE, "text")


@pytest.mark.parametrize(
    "url,target,host",
    [
        ("https://API.example.com/x/y?b=2&a=1", "/x/y?b=2&a=1", "api.example.com"),
        ("http://h:8080", "/", "h:8080"),
        ("http://h:8080?q=1", "/?q=1", "h:8080"),
        ("http://h/p?", "/p?", "h"),
        ("http://h/a%2Fb/./c?x=%20#frag", "/a%2Fb/./c?x=%20", "h"),
        ("https://user:pw@H.example:443/p", "/p", "h.example:443"),
        ("http://[::1]:9000/v", "/v", "[::1]:9000"),
    ],
)
def test_split_url_keeps_the_url_spelling(url, target, host):
    assert split_url(url) == (target, host)


def test_sign_request_from_url_equals_sign_request_from_target():
    from_url = sign_request(
        "GET", "http://Svc.local:8080/signed?x=1", key_id="k1", secret=SECRET, ts=TS, nonce=NONCE
    )
    from_target = sign_request(
        "GET", "/signed?x=1", key_id="k1", secret=SECRET, host="svc.local:8080", ts=TS, nonce=NONCE
    )
    assert from_url == from_target


def test_sign_request_header_value_is_the_hmac_of_the_string_to_sign():
    header = sign_request(
        "PUT", "/r", key_id="k1", secret=SECRET.decode(), body=b"{}", host="h", ts=TS, nonce=NONCE
    )
    expected = hmac.new(
        SECRET, string_to_sign("PUT", "/r", "h", TS, NONCE, b"{}").encode(), hashlib.sha256
    ).hexdigest()
    assert header == f'Signature v1, keyId="k1", ts="{TS}", nonce="{NONCE}", signature="{expected}"'
    assert "alg=" not in header


def test_sign_request_sha512_names_the_algorithm():
    header = sign_request(
        "GET", "/", key_id="k1", secret=SECRET, host="h", ts=TS, nonce=NONCE, algorithm="hmac-sha512"
    )
    params = parse_header(header)
    assert params.alg == "hmac-sha512"
    assert len(params.signature) == 128


def test_sign_request_defaults_to_now_and_a_fresh_nonce():
    before = int(time.time())
    a = parse_header(sign_request("GET", "/", key_id="k", secret=SECRET, host="h"))
    b = parse_header(sign_request("GET", "/", key_id="k", secret=SECRET, host="h"))
    assert before <= a.ts <= int(time.time())
    assert a.nonce != b.nonce


def test_new_nonce_is_in_the_allowed_alphabet():
    for _ in range(200):
        assert re.fullmatch(r"[A-Za-z0-9_-]{24}", new_nonce())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(url_or_target="/x"),  # no host for a bare target
        dict(algorithm="hmac-md5"),
        dict(nonce="short"),
        dict(nonce="x" * 129),
        dict(nonce="has space in it, 20 chars"),
        dict(key_id='a"b'),
        dict(key_id=""),
        dict(ts=True),
    ],
)
def test_sign_request_refuses_bad_arguments(kwargs):
    args = dict(url_or_target="http://h/x", key_id="k", secret=SECRET, ts=TS, nonce=NONCE)
    args.update(kwargs)
    method_and_url = ("GET", args.pop("url_or_target"))
    with pytest.raises((ValueError, TypeError)):
        sign_request(*method_and_url, **args)


def test_core_imports_without_requests_or_httpx():
    code = (
        "import sys; sys.modules['requests'] = None; sys.modules['httpx'] = None\n"
        "import portcullis_sign as p\n"
        "p.sign_request('GET', 'http://h/', key_id='k', secret=b's')\n"
        "assert 'requests' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    p.SignatureAuth\nexcept ImportError:\n    print('lazy')\n"
    )
    src = str(__import__("pathlib").Path(__file__).parent.parent / "src")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"
