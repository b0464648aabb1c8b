import pytest

from portcullis_sign import (
    NonceCache,
    SignatureError,
    SigningKey,
    compute_signature,
    parse_header,
    sign_request,
    string_to_sign,
    verify,
)

SECRET = b"0123456789abcdef0123456789abcdef"
SECRET_512 = b"fedcba9876543210fedcba9876543210"
NONCE = "q3J8x0bV2mN5pL7tK9wZ"
TS = 1764000000
KEYS = {
    "k256": SigningKey(SECRET, "hmac-sha256", client="client-a"),
    "k512": SigningKey(SECRET_512, "hmac-sha512", client="client-b"),
    "plain": SECRET,
}
REQ = dict(method="POST", target="/signed/x?y=1", host="svc:8080", body=b'{"a":1}')


def signed(key_id="k256", secret=SECRET, algorithm="hmac-sha256", ts=TS, nonce=NONCE, **req):
    r = dict(REQ, **req)
    return sign_request(
        r["method"], r["target"], key_id=key_id, secret=secret, body=r["body"],
        host=r["host"], ts=ts, nonce=nonce, algorithm=algorithm,
    )


def check(headers, now=TS, seen_nonce=None, max_skew=300, **req):
    r = dict(REQ, **req)
    return verify(
        headers, r["method"], r["target"], r["host"], r["body"],
        keys=KEYS, now=now, seen_nonce=seen_nonce, max_skew=max_skew,
    )


def code_of(headers, **kwargs):
    with pytest.raises(SignatureError) as e:
        check(headers, **kwargs)
    return e.value.code


def raw_header(**params):
    """A header with the given parameters in order (None drops one)."""
    base = dict(keyId="k256", ts=str(TS), nonce=NONCE, signature="0" * 64)
    base.update(params)
    return "Signature v1, " + ", ".join(f'{k}="{v}"' for k, v in base.items() if v is not None)


# Round trips


@pytest.mark.parametrize("key_id,secret,alg", [("k256", SECRET, "hmac-sha256"), ("k512", SECRET_512, "hmac-sha512")])
def test_round_trip(key_id, secret, alg):
    v = check({"Authorization": signed(key_id, secret, alg)})
    assert (v.key_id, v.algorithm, v.ts, v.nonce) == (key_id, alg, TS, NONCE)
    assert v.client == KEYS[key_id].client


def test_round_trip_with_plain_bytes_key_and_str_secret():
    v = check({"Authorization": signed("plain", SECRET.decode())})
    assert v.client is None and v.algorithm == "hmac-sha256"


def test_round_trip_in_x_signature_next_to_bearer():
    headers = {"authorization": "Bearer eyJ.x.y", "X-SIGNATURE": signed()}
    assert check(headers).key_id == "k256"


def test_header_names_are_case_insensitive_and_scheme_too():
    value = signed().replace("Signature v1", "signature v1", 1)
    assert check({"AUTHORIZATION": value}).nonce == NONCE


def test_unquoted_params_in_any_order_with_tabs():
    p = parse_header(signed())
    value = f"Signature v1,\tsignature={p.signature} ,nonce={p.nonce},ts={p.ts},  keyId=k256"
    assert check({"Authorization": value}).key_id == "k256"


def test_timestamp_window_edges():
    assert check({"Authorization": signed(ts=TS - 300)}, now=TS)
    assert check({"Authorization": signed(ts=TS + 300)}, now=TS + 0.99)
    assert code_of({"Authorization": signed(ts=TS - 301)}, now=TS) == "timestamp_out_of_window"
    assert code_of({"Authorization": signed(ts=TS + 301)}, now=TS) == "timestamp_out_of_window"
    assert check({"Authorization": signed(ts=TS - 60)}, now=TS, max_skew=60)
    assert code_of({"Authorization": signed(ts=TS - 61)}, now=TS, max_skew=60) == "timestamp_out_of_window"


# Missing


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer abc"}, {"Authorization": "Basic dTpw"}, {"Content-Type": "x"}],
)
def test_signature_missing(headers):
    assert code_of(headers) == "signature_missing"


# Malformed


MALFORMED = {
    "no_params": "Signature v1",
    "no_space": "Signature",
    "wrong_scheme_in_x_signature": "Sig v1, " + raw_header()[14:],
    "v2": raw_header().replace("v1,", "v2,", 1),
    "no_version": raw_header().replace("v1, ", "", 1),
    "unknown_param": raw_header(extra="1"),
    "repeated_param": raw_header() + f', nonce="{NONCE}"',
    "case_changed_param": raw_header().replace("keyId", "keyid"),
    "missing_keyId": raw_header(keyId=None),
    "missing_ts": raw_header(ts=None),
    "missing_nonce": raw_header(nonce=None),
    "missing_signature": raw_header(signature=None),
    "empty_param": raw_header() + ",",
    "no_equals": raw_header() + ", flag",
    "broken_quote": raw_header().replace(f'"{NONCE}"', f'"{NONCE}'),
    "quote_inside": raw_header().replace(f'"{NONCE}"', f'"{NONCE[:8]}"{NONCE[8:]}"'),
    "quote_in_unquoted": raw_header().replace(f'"{NONCE}"', f'{NONCE}"'),
    "empty_keyId": raw_header(keyId=""),
    "keyId_with_space": raw_header(keyId="k 256"),
    "keyId_too_long": raw_header(keyId="k" * 257),
    "nonce_too_short": raw_header(nonce="a" * 15),
    "nonce_too_long": raw_header(nonce="a" * 129),
    "nonce_bad_char": raw_header(nonce="q3J8x0bV2mN5pL7t.9wZ"),
    "nonce_non_ascii": raw_header(nonce="q3J8x0bV2mN5pL7tK9wé"),
    "ts_sign": raw_header(ts="+1764000000"),
    "ts_negative": raw_header(ts="-1764000000"),
    "ts_fraction": raw_header(ts="1764000000.0"),
    "ts_leading_zero": raw_header(ts="01764000000"),
    "ts_11_digits": raw_header(ts="17640000000"),
    "ts_empty": raw_header(ts=""),
    "ts_arabic_digits": raw_header(ts="١٧٦٤٠٠٠٠٠٠"),
    "ts_exponent": raw_header(ts="1e9"),
    "sig_uppercase": raw_header(signature="A" * 64),
    "sig_63": raw_header(signature="0" * 63),
    "sig_65": raw_header(signature="0" * 65),
    "sig_127": raw_header(signature="0" * 127),
    "sig_not_hex": raw_header(signature="g" * 64),
    "alg_unknown": raw_header(alg="hmac-md5"),
    "alg_differs_from_key": raw_header(alg="hmac-sha512", signature="0" * 128),
    "sig_length_differs_from_key": raw_header(signature="0" * 128),
    "too_long": raw_header() + ", " + "x" * 1024,
}


@pytest.mark.parametrize("value", list(MALFORMED.values()), ids=list(MALFORMED))
def test_signature_malformed(value):
    header = "X-Signature" if not value.lower().startswith("signature") else "Authorization"
    assert code_of({header: value}) == "signature_malformed"


def test_repeated_signature_header_is_malformed():
    class Multi:
        """A header mapping with a repeated name, as Starlette's Headers.items() gives it."""

        def items(self):
            return [("authorization", signed()), ("Authorization", signed(nonce="x" * 20))]

    assert code_of(Multi()) == "signature_malformed"


def test_signature_in_both_headers_is_malformed():
    assert code_of({"Authorization": signed(), "X-Signature": signed()}) == "signature_malformed"


# Key lookup, HMAC, nonce


def test_unknown_signing_key():
    assert code_of({"Authorization": raw_header(keyId="nobody")}) == "unknown_signing_key"


def test_unknown_key_is_checked_before_the_timestamp():
    assert code_of({"Authorization": raw_header(keyId="nobody", ts="1")}) == "unknown_signing_key"


def test_timestamp_is_checked_before_the_hmac():
    assert code_of({"Authorization": raw_header(ts="1")}) == "timestamp_out_of_window"


@pytest.mark.parametrize(
    "change",
    [
        dict(method="PUT"),
        dict(target="/signed/x?y=2"),
        dict(target="/signed/x"),
        dict(target="/signed/%78?y=1"),
        dict(host="svc:8081"),
        dict(host="svc"),
        dict(body=b'{"a":2}'),
        dict(body=b""),
    ],
    ids=lambda c: next(iter(c)) + "=" + repr(next(iter(c.values()))),
)
def test_signature_mismatch_on_any_changed_line(change):
    with pytest.raises(SignatureError) as e:
        check({"Authorization": signed()}, **change)
    assert e.value.code == "signature_mismatch"
    r = dict(REQ, **change)
    assert e.value.string_to_sign == string_to_sign(r["method"], r["target"], r["host"], TS, NONCE, r["body"])


def test_signature_mismatch_with_the_wrong_secret():
    assert code_of({"Authorization": signed(secret=b"x" * 32)}) == "signature_mismatch"


def test_method_and_host_case_do_not_matter():
    assert check({"Authorization": signed()}, method="post", host="SVC:8080")


def test_nonce_replayed_and_only_recorded_for_valid_signatures():
    cache = NonceCache(ttl=600)
    forged = raw_header(signature="0" * 64)
    assert code_of({"Authorization": forged}, seen_nonce=cache) == "signature_mismatch"
    assert len(cache) == 0, "a forged request must not burn the nonce"
    assert check({"Authorization": signed()}, seen_nonce=cache).nonce == NONCE
    assert code_of({"Authorization": signed()}, seen_nonce=cache) == "nonce_replayed"


def test_nonce_cache_forgets_after_ttl():
    now = [1000.0]
    cache = NonceCache(ttl=10, clock=lambda: now[0])
    assert cache("a" * 16) is False
    assert cache("a" * 16) is True
    now[0] += 10
    assert cache("a" * 16) is False
    assert len(cache) == 1


def test_signing_key_repr_hides_the_secret():
    assert "0123456789" not in repr(KEYS["k256"])


def test_compute_signature_matches_sign_request():
    p = parse_header(signed())
    message = string_to_sign(REQ["method"], REQ["target"], REQ["host"], TS, NONCE, REQ["body"])
    assert p.signature == compute_signature(SECRET, message)
