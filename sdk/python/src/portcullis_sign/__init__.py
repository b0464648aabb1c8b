"""Client SDK for portcullis request signatures (scheme v1).

Signing and verifying need only the standard library. The HTTP client adapters import their
client on first use, so ``import portcullis_sign`` works without ``requests`` or ``httpx``:

- :class:`SignatureAuth` for ``requests`` (``pip install portcullis-sign[requests]``)
- :class:`HttpxSignatureAuth` for ``httpx`` (``pip install portcullis-sign[httpx]``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .scheme import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    body_sha256_hex,
    compute_signature,
    format_header,
    new_nonce,
    sign_request,
    split_url,
    string_to_sign,
)
from .verify import (
    NonceCache,
    SignatureError,
    SignatureParams,
    SigningKey,
    VerifiedSignature,
    parse_header,
    verify,
)

if TYPE_CHECKING:
    from .httpx_auth import HttpxSignatureAuth
    from .requests_auth import SignatureAuth

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "HttpxSignatureAuth",
    "NonceCache",
    "SignatureAuth",
    "SignatureError",
    "SignatureParams",
    "SigningKey",
    "VerifiedSignature",
    "body_sha256_hex",
    "compute_signature",
    "format_header",
    "new_nonce",
    "parse_header",
    "sign_request",
    "split_url",
    "string_to_sign",
    "verify",
]


def __getattr__(name: str) -> Any:
    # Lazy: the adapters import requests / httpx, which are optional extras.
    if name == "SignatureAuth":
        from .requests_auth import SignatureAuth

        return SignatureAuth
    if name == "HttpxSignatureAuth":
        from .httpx_auth import HttpxSignatureAuth

        return HttpxSignatureAuth
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
