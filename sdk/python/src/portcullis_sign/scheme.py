"""Signature scheme v1 of portcullis: the string to sign, the HMAC, and the header value.

This module is the client half of the scheme and uses the standard library only. The proxy
recomputes the same string to sign from the request it receives, so every line here must equal
what actually goes on the wire: the target as on the request line, the Host header the client
sends, and the body bytes as sent. The adapters for `requests` and `httpx` take those values from
the prepared request for exactly that reason.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
from typing import Optional, Tuple, Union

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "body_sha256_hex",
    "compute_signature",
    "format_header",
    "new_nonce",
    "sign_request",
    "split_url",
    "string_to_sign",
]

#: Algorithm name -> (hashlib constructor, length of the hex signature).
ALGORITHMS = {
    "hmac-sha256": (hashlib.sha256, 64),
    "hmac-sha512": (hashlib.sha512, 128),
}
DEFAULT_ALGORITHM = "hmac-sha256"

NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
# Plain decimal Unix seconds as the proxy parses them: no sign, fraction or leading zero,
# at most 10 digits.
TS_RE = re.compile(r"0|[1-9][0-9]{0,9}")
MAX_TS = 9_999_999_999
_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
# ASCII-only case mapping, as the proxy does it: str.upper() would also map "ß" to "SS".
_TO_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_TO_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

Secret = Union[bytes, bytearray, str]


def _secret_bytes(secret: Secret) -> bytes:
    if isinstance(secret, str):
        return secret.encode("utf-8")
    if isinstance(secret, (bytes, bytearray)):
        return bytes(secret)
    raise TypeError(f"secret must be bytes or str, not {type(secret).__name__}")


def _hash_for(algorithm: str):
    try:
        return ALGORITHMS[algorithm][0]
    except KeyError:
        raise ValueError(
            f"algorithm must be one of {', '.join(sorted(ALGORITHMS))}, not {algorithm!r}"
        ) from None


def _ts_text(ts: Union[int, str]) -> str:
    # bool is an int subclass; True as a timestamp is certainly a bug.
    if isinstance(ts, bool):
        raise TypeError("ts must be an int (Unix seconds), not bool")
    if isinstance(ts, int):
        if not 0 <= ts <= MAX_TS:
            raise ValueError(f"ts must be Unix seconds between 0 and {MAX_TS}, not {ts}")
        return str(ts)
    if isinstance(ts, str):
        if not TS_RE.fullmatch(ts):
            raise ValueError(
                "ts must be plain decimal Unix seconds (no sign, fraction or leading zero, "
                f"at most 10 digits), not {ts!r}"
            )
        return ts
    raise TypeError(f"ts must be an int, not {type(ts).__name__}")


def _check_line(name: str, value: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    # A line break would let one field forge the next line of the string to sign.
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name} must not contain CR, LF or NUL")
    return value


def check_nonce(nonce: str) -> str:
    if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 16 to 128 characters of A-Z a-z 0-9 - _")
    return nonce


def body_sha256_hex(body: Union[bytes, bytearray, memoryview]) -> str:
    """Lower-case hex SHA-256 of the body as sent (the last line of the string to sign)."""
    if isinstance(body, str):
        raise TypeError("body must be bytes; encode str bodies exactly as they will be sent")
    return hashlib.sha256(bytes(body)).hexdigest()


def string_to_sign(
    method: str,
    target: str,
    host: str,
    ts: Union[int, str],
    nonce: str,
    body: Union[bytes, bytearray, memoryview] = b"",
) -> str:
    """The scheme-v1 string to sign: seven lines joined by ``\\n``, no trailing newline.

    ``v1``, the method in upper case, the request target exactly as on the request line, the
    host in lower case (with ``:port`` when the Host header has one), ``ts``, ``nonce`` and the
    lower-case hex SHA-256 of ``body``. ``target`` and ``host`` are used as given: nothing is
    re-encoded or normalised.
    """
    return "\n".join(
        (
            "v1",
            _check_line("method", method).translate(_TO_UPPER),
            _check_line("target", target),
            _check_line("host", host, allow_empty=True).translate(_TO_LOWER),
            _ts_text(ts),
            check_nonce(nonce),
            body_sha256_hex(body),
        )
    )


def compute_signature(secret: Secret, message: str, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """Lower-case hex HMAC of ``message`` (UTF-8) with ``secret``."""
    return hmac.new(_secret_bytes(secret), message.encode("utf-8"), _hash_for(algorithm)).hexdigest()


def new_nonce() -> str:
    """A fresh nonce: 24 characters of the base64url alphabet (144 random bits)."""
    return secrets.token_urlsafe(18)


def format_header(
    key_id: str, ts: Union[int, str], nonce: str, signature: str, algorithm: str = DEFAULT_ALGORITHM
) -> str:
    """The header value ``Signature v1, keyId="...", ts="...", nonce="...", signature="..."``.

    ``alg`` is written only for hmac-sha512, where the proxy needs it to tell the 128-hex
    signature apart; hmac-sha256 is the default and is left implicit.
    """
    _check_key_id(key_id)
    parts = [
        f'keyId="{key_id}"',
        f'ts="{_ts_text(ts)}"',
        f'nonce="{check_nonce(nonce)}"',
        f'signature="{signature}"',
    ]
    if algorithm != DEFAULT_ALGORITHM:
        _hash_for(algorithm)
        parts.append(f'alg="{algorithm}"')
    return "Signature v1, " + ", ".join(parts)


def _check_key_id(key_id: str) -> str:
    # Visible ASCII, without the characters that would break the header's own syntax.
    if (
        not isinstance(key_id, str)
        or not 1 <= len(key_id) <= 256
        or not all(33 <= ord(c) <= 126 and c not in '",\\' for c in key_id)
    ):
        raise ValueError("key_id must be 1 to 256 visible ASCII characters, without \" , or \\")
    return key_id


def split_url(url: str) -> Tuple[str, str]:
    """``(target, host)`` of an absolute URL, as the URL spells them.

    The target is the path and ``?query`` exactly as written (a bare ``?`` is kept), ``/`` when
    the path is empty, without the ``#fragment``. The host is the authority in lower case without
    any ``user:password@``, with the port only when the URL has one.

    HTTP clients may rewrite a URL before sending it (``requests`` and ``httpx`` remove ``.``
    and ``..`` segments and drop a default port from Host); the adapters sign what they send.
    """
    match = _URL_RE.fullmatch(url)
    if match is None:
        raise ValueError(f"not an absolute URL: {url!r}")
    authority, rest = match.group(2), match.group(3)
    host = authority.rpartition("@")[2].translate(_TO_LOWER)
    if not host:
        raise ValueError(f"the URL has no host: {url!r}")
    target = rest.partition("#")[0]
    if not target.startswith("/"):
        target = "/" + target
    return target, host


def sign_request(
    method: str,
    url_or_target: str,
    *,
    key_id: str,
    secret: Secret,
    body: Union[bytes, bytearray, memoryview] = b"",
    host: Optional[str] = None,
    ts: Optional[Union[int, str]] = None,
    nonce: Optional[str] = None,
    algorithm: str = DEFAULT_ALGORITHM,
) -> str:
    """The ``Authorization`` (or ``X-Signature``) header value for one request.

    ``url_or_target`` is either an absolute URL (the target and host are taken from it; an
    explicit ``host`` wins) or a request target such as ``/api/v1/x?y=1``, which needs ``host``.
    ``ts`` defaults to now and ``nonce`` to a fresh random one; pass them only for tests.
    """
    if _URL_RE.fullmatch(url_or_target or ""):
        target, url_host = split_url(url_or_target)
        host = url_host if host is None else host
    else:
        target = url_or_target
        if host is None:
            raise ValueError("host is required when url_or_target is a request target, not a URL")
    _hash_for(algorithm)
    ts = int(time.time()) if ts is None else ts
    nonce = new_nonce() if nonce is None else nonce
    message = string_to_sign(method, target, host, ts, nonce, body)
    signature = compute_signature(secret, message, algorithm)
    return format_header(key_id, ts, nonce, signature, algorithm)
