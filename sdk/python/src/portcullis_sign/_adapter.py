"""What the two HTTP client adapters share: which header carries the signature."""

from __future__ import annotations

from typing import Optional


def signature_header_name(authorization: Optional[str]) -> str:
    """``X-Signature`` when the request already carries ``Authorization: Bearer``, else
    ``Authorization``. Any other existing ``Authorization`` (Basic, ...) would be lost or
    ambiguous, so it is refused rather than overwritten."""
    if authorization is None:
        return "Authorization"
    scheme = authorization.strip().partition(" ")[0]
    if scheme.lower() == "bearer":
        return "X-Signature"
    if scheme.lower() == "signature":
        # Signing again (a retry through the same auth): replace the old signature.
        return "Authorization"
    raise ValueError(
        f"the request already has an Authorization header with the {scheme!r} scheme; "
        "portcullis signatures go in Authorization, or in X-Signature next to a Bearer token"
    )
