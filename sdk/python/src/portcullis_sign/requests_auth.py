"""``requests`` adapter: :class:`SignatureAuth` signs each prepared request.

It signs what urllib3 will put on the wire: ``PreparedRequest.path_url`` (after requests
removed dot-segments and dropped the fragment), the Host header that ``http.client`` will
send (the URL's host, with the port unless it is the scheme's default) unless the request sets
Host itself, and the body bytes. A ``str`` body is encoded to UTF-8 here and the request is
given those bytes, so the signed and the sent body cannot differ.

Redirects: requests does not re-run this auth on the redirected request, and a signature is
bound to one target and nonce, so a redirected signed request is refused by portcullis. Follow
redirects yourself (``allow_redirects=False``) when a signed endpoint may redirect.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import requests
import requests.auth

from ._adapter import signature_header_name
from .scheme import DEFAULT_ALGORITHM, Secret, _hash_for, _secret_bytes, sign_request

__all__ = ["SignatureAuth"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _sent_host(url: str) -> str:
    """The Host header http.client sends for ``url`` (requests leaves Host to it)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{port}"
    return host


def _body_bytes(request: requests.PreparedRequest) -> bytes:
    body = request.body
    if body is None:
        return b""
    if isinstance(body, str):
        encoded = body.encode("utf-8")
        request.body = encoded
        return encoded
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    raise TypeError(
        "portcullis_sign.SignatureAuth cannot sign a streaming body "
        f"({type(body).__name__}): the signature covers the SHA-256 of the whole body, so "
        "read it into bytes first (data=f.read())"
    )


class SignatureAuth(requests.auth.AuthBase):
    """Signs ``requests`` requests with signature scheme v1.

    >>> session.auth = SignatureAuth("client-42-2026-11", secret)
    """

    def __init__(self, key_id: str, secret: Secret, algorithm: str = DEFAULT_ALGORITHM):
        _hash_for(algorithm)
        self.key_id = key_id
        self._secret = _secret_bytes(secret)
        self.algorithm = algorithm

    def __repr__(self) -> str:
        return f"SignatureAuth(key_id={self.key_id!r}, algorithm={self.algorithm!r})"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = _body_bytes(r)
        host = r.headers.get("Host") or _sent_host(r.url)
        value = sign_request(
            r.method,
            r.path_url,
            key_id=self.key_id,
            secret=self._secret,
            body=body,
            host=host,
            algorithm=self.algorithm,
        )
        r.headers[signature_header_name(r.headers.get("Authorization"))] = value
        return r
