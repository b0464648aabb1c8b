"""``httpx`` adapter: :class:`HttpxSignatureAuth` signs each request, sync or async.

httpx has already normalised the URL and set the Host header when the auth flow runs, so the
signature covers exactly ``request.url.raw_path``, ``request.headers["host"]`` and the body
bytes (``requires_request_body`` makes httpx read a streamed body first).
"""

from __future__ import annotations

from typing import Generator

import httpx

from ._adapter import signature_header_name
from .scheme import DEFAULT_ALGORITHM, Secret, _hash_for, _secret_bytes, sign_request

__all__ = ["HttpxSignatureAuth"]


class HttpxSignatureAuth(httpx.Auth):
    """Signs ``httpx`` requests with signature scheme v1.

    >>> client = httpx.Client(auth=HttpxSignatureAuth("client-42-2026-11", secret))
    """

    requires_request_body = True

    def __init__(self, key_id: str, secret: Secret, algorithm: str = DEFAULT_ALGORITHM):
        _hash_for(algorithm)
        self.key_id = key_id
        self._secret = _secret_bytes(secret)
        self.algorithm = algorithm

    def __repr__(self) -> str:
        return f"HttpxSignatureAuth(key_id={self.key_id!r}, algorithm={self.algorithm!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        value = sign_request(
            request.method,
            request.url.raw_path.decode("ascii"),
            key_id=self.key_id,
            secret=self._secret,
            body=request.content,
            host=request.headers["host"],
            algorithm=self.algorithm,
        )
        request.headers[signature_header_name(request.headers.get("authorization"))] = value
        yield request
