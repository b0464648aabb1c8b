"""A verifier for signature scheme v1, for Python services and tests.

It follows the proxy's rules and order (DESIGN.md, "Request signatures, scheme v1"): strict
parsing, key lookup, timestamp window, HMAC compared in constant time, and only then the nonce,
so that a forged request can never burn a legitimate client's nonce. Each failure is a
:class:`SignatureError` whose ``code`` is the one portcullis puts in its problem+json body.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Mapping, Optional, Union

from .scheme import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    NONCE_RE,
    TS_RE,
    compute_signature,
    string_to_sign,
)

__all__ = [
    "NonceCache",
    "SignatureError",
    "SignatureParams",
    "SigningKey",
    "VerifiedSignature",
    "parse_header",
    "verify",
]

#: The longest header value looked at, as in the proxy; anything longer is malformed.
MAX_HEADER_LEN = 1024

_HEX_LOWER = frozenset("0123456789abcdef")
_PARAMS = ("keyId", "ts", "nonce", "signature", "alg")


class SignatureError(Exception):
    """A request signature was refused.

    ``code`` is one of portcullis's codes: ``signature_missing``, ``signature_malformed``,
    ``unknown_signing_key``, ``timestamp_out_of_window``, ``signature_mismatch``,
    ``nonce_replayed``. ``detail`` is a short reason that holds nothing secret. For
    ``signature_mismatch``, ``string_to_sign`` is the string the verifier computed, to compare
    line by line with the client's.
    """

    def __init__(self, code: str, detail: str, string_to_sign: Optional[str] = None):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.string_to_sign = string_to_sign


@dataclass(frozen=True)
class SigningKey:
    """A verification key: the shared secret, its algorithm and the client it belongs to."""

    secret: bytes
    algorithm: str = DEFAULT_ALGORITHM
    client: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.secret, str):
            object.__setattr__(self, "secret", self.secret.encode("utf-8"))
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}")

    def __repr__(self) -> str:
        # Never print the secret.
        return f"SigningKey(secret=<{len(self.secret)} bytes>, algorithm={self.algorithm!r}, client={self.client!r})"


@dataclass(frozen=True)
class SignatureParams:
    """The parameters of a parsed ``Signature v1, ...`` header value."""

    key_id: str
    ts: int
    nonce: str
    signature: str
    alg: Optional[str] = None


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature that verified (and whose nonce was recorded, when a recorder was given)."""

    key_id: str
    client: Optional[str]
    algorithm: str
    ts: int
    nonce: str


def _malformed(detail: str) -> SignatureError:
    return SignatureError("signature_malformed", detail)


def parse_header(value: str) -> SignatureParams:
    """Parses ``Signature v1, keyId="...", ts="...", nonce="...", signature="..."`` strictly.

    Parameters are ``name="value"`` or ``name=value`` in any order; an unknown, repeated or
    missing parameter, a bad nonce, a ``ts`` that is not plain decimal seconds, or a signature
    that is not 64 or 128 lower-case hex characters is ``signature_malformed``.
    """
    if len(value.encode("utf-8", "surrogatepass")) > MAX_HEADER_LEN:
        raise _malformed(f"the signature header is over {MAX_HEADER_LEN} bytes")
    scheme, space, rest = value.partition(" ")
    if not space:
        raise _malformed("expected `Signature v1, keyId=..., ts=..., nonce=..., signature=...`")
    if scheme.lower() != "signature":
        raise _malformed(f"the scheme is {scheme!r}, not Signature")
    rest = rest.lstrip(" \t")
    if rest == "v1":
        raw_params = None
    elif rest.startswith("v1,"):
        raw_params = rest[3:]
    else:
        raise _malformed("the version is missing or not v1: expected `Signature v1, ...`")

    found = {}
    for param in raw_params.split(",") if raw_params is not None else ():
        param = param.strip(" \t")
        name, eq, raw = param.partition("=")
        if not eq:
            raise _malformed(f"parameter {param!r} is not name=value")
        if raw.startswith('"'):
            if len(raw) < 2 or not raw.endswith('"') or '"' in raw[1:-1]:
                raise _malformed(f"parameter {name} has a broken quoted value")
            raw = raw[1:-1]
        elif '"' in raw:
            raise _malformed(f"parameter {name} has a broken quoted value")
        if name not in _PARAMS:
            raise _malformed(f"unknown parameter {name!r}")
        if name in found:
            raise _malformed(f"parameter {name} is repeated")
        found[name] = raw
    for name in _PARAMS[:4]:
        if name not in found:
            raise _malformed(f"{name} is missing")

    key_id = found["keyId"]
    if not 1 <= len(key_id) <= 256 or not all(33 <= ord(c) <= 126 for c in key_id):
        raise _malformed("keyId must be 1 to 256 visible ASCII characters")
    ts = found["ts"]
    # TS_RE is ASCII-only; str.isdigit() would accept other scripts' digits.
    if not TS_RE.fullmatch(ts):
        raise _malformed(
            "ts must be Unix seconds in plain decimal (at most 10 digits, no leading zeros)"
        )
    nonce = found["nonce"]
    if not NONCE_RE.fullmatch(nonce):
        raise _malformed("nonce must be 16 to 128 characters of A-Z a-z 0-9 - _")
    signature = found["signature"]
    if len(signature) not in (64, 128) or not set(signature) <= _HEX_LOWER:
        raise _malformed("signature must be 64 or 128 lower-case hex characters")
    alg = found.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        raise _malformed(f"alg {alg!r} is not hmac-sha256 or hmac-sha512")
    return SignatureParams(key_id=key_id, ts=int(ts), nonce=nonce, signature=signature, alg=alg)


def _signature_header(headers: Mapping[str, str]) -> str:
    """The header holding the signature: ``Authorization`` when it has the Signature scheme,
    else ``X-Signature`` (sent alongside ``Authorization: Bearer``)."""
    authorization, x_signature = [], []
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "authorization":
            authorization.append(value)
        elif lowered == "x-signature":
            x_signature.append(value)
    if len(authorization) > 1 or len(x_signature) > 1:
        raise _malformed("the signature header is repeated")
    signed_authorization = [
        v for v in authorization if v.partition(" ")[0].lower() == "signature"
    ]
    if signed_authorization and x_signature:
        raise _malformed("both Authorization and X-Signature carry a signature")
    if signed_authorization:
        return signed_authorization[0]
    if x_signature:
        return x_signature[0]
    raise SignatureError("signature_missing", "no Signature v1 header was sent")


def _as_key(key: Union[bytes, bytearray, str, SigningKey]) -> SigningKey:
    if isinstance(key, SigningKey):
        return key
    if isinstance(key, (bytes, bytearray, str)):
        return SigningKey(secret=bytes(key) if not isinstance(key, str) else key)
    raise TypeError(f"a key must be bytes, str or SigningKey, not {type(key).__name__}")


def _seconds(value: Union[int, float, timedelta]) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def verify(
    headers: Mapping[str, str],
    method: str,
    target: str,
    host: str,
    body: Union[bytes, bytearray, memoryview] = b"",
    *,
    keys: Mapping[str, Union[bytes, str, SigningKey]],
    max_skew: Union[int, float, timedelta] = 300,
    now: Optional[Union[int, float, datetime]] = None,
    seen_nonce: Optional[Callable[[str], bool]] = None,
) -> VerifiedSignature:
    """Verifies the scheme-v1 signature of one request, in the proxy's order.

    ``headers`` is any mapping of the request headers (a plain dict, ``requests``' or
    Starlette's headers); names are matched case-insensitively. ``method``, ``target`` (exactly
    as on the request line), ``host`` (the Host header) and ``body`` (the raw bytes received) are
    what the signature covers. ``keys`` maps key ids to a secret (bytes or str, hmac-sha256) or a
    :class:`SigningKey`. ``seen_nonce(nonce)`` must record the nonce and return True if it had
    been recorded before (see :class:`NonceCache`; keep nonces for ``2 * max_skew``). It is
    called only for a valid signature. Without it there is **no replay protection**.

    Raises :class:`SignatureError`; returns :class:`VerifiedSignature`.
    """
    params = parse_header(_signature_header(headers))
    try:
        raw_key = keys[params.key_id]
    except KeyError:
        raise SignatureError("unknown_signing_key", f"no signing key {params.key_id!r}") from None
    key = _as_key(raw_key)
    if params.alg is not None and params.alg != key.algorithm:
        raise _malformed(f"alg does not match the algorithm of key {params.key_id!r}")
    want_len = ALGORITHMS[key.algorithm][1]
    if len(params.signature) != want_len:
        raise _malformed(f"key {params.key_id!r} signs with {want_len} hex characters")

    if now is None:
        now = time.time()
    elif isinstance(now, datetime):
        now = now.timestamp()
    # Whole seconds, as the proxy compares them.
    now_secs = int(now)
    window = _seconds(max_skew)
    skew = abs(now_secs - params.ts)
    if skew > window:
        direction = "ahead of" if params.ts > now_secs else "behind"
        raise SignatureError(
            "timestamp_out_of_window",
            f"ts is {skew}s {direction} the verifier's clock; the window is {window:g}s",
        )

    message = string_to_sign(method, target, host, params.ts, params.nonce, body)
    expected = compute_signature(key.secret, message, key.algorithm)
    if not hmac.compare_digest(expected, params.signature):
        raise SignatureError(
            "signature_mismatch", "the signature does not match the request", message
        )
    if seen_nonce is not None and seen_nonce(params.nonce):
        raise SignatureError("nonce_replayed", "this nonce was used before")
    return VerifiedSignature(
        key_id=params.key_id,
        client=key.client,
        algorithm=key.algorithm,
        ts=params.ts,
        nonce=params.nonce,
    )


class NonceCache:
    """An in-memory ``seen_nonce`` for one process: each nonce is remembered for ``ttl``
    seconds (use ``2 * max_skew``, the default being 600 for the default window of 300).

    Thread-safe. It grows with the request rate times ``ttl`` and is forgotten on restart; a
    service with several replicas needs a shared store (Redis ``SET key 1 NX EX ttl``) instead.
    """

    def __init__(self, ttl: Union[int, float, timedelta] = 600, clock: Callable[[], float] = time.monotonic):
        self._ttl = _seconds(ttl)
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is expiry order, because every entry lives for the same ttl.
        self._expiry: "OrderedDict[str, float]" = OrderedDict()

    def __call__(self, nonce: str) -> bool:
        now = self._clock()
        with self._lock:
            while self._expiry:
                oldest, expires = next(iter(self._expiry.items()))
                if expires > now:
                    break
                del self._expiry[oldest]
            if nonce in self._expiry:
                return True
            self._expiry[nonce] = now + self._ttl
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)
