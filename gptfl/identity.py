"""Who is calling: the identity and role from the peer's client certificate.

With mutual TLS the identity is the certificate's CN and the role its OU (see
:mod:`gptfl.pki`). In ``--insecure`` mode (development only) a caller names itself with the
``x-gptfl-identity`` metadata header as ``role:name``; servers log that they trust it.
"""

from __future__ import annotations

import grpc

from gptfl.errors import PermissionDeniedError, PkiError, UnauthenticatedError
from gptfl.pki import Identity, identity_from_pem

INSECURE_IDENTITY_HEADER = "x-gptfl-identity"


def caller_identity(context: grpc.ServicerContext, *, insecure: bool) -> Identity:
    """The verified identity of the caller of an RPC."""
    if insecure:
        for key, value in context.invocation_metadata():
            if key == INSECURE_IDENTITY_HEADER:
                role, _, name = str(value).partition(":")
                if role and name:
                    return Identity(common_name=name, role=role)
        raise UnauthenticatedError(
            f"insecure mode: the call carries no {INSECURE_IDENTITY_HEADER} header"
        )
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise UnauthenticatedError("no client certificate was presented")
    try:
        return identity_from_pem(pems[0])
    except PkiError as exc:
        raise UnauthenticatedError(f"unusable client certificate: {exc}") from None


def require_role(identity: Identity, *roles: str) -> None:
    """Raises unless ``identity`` holds one of ``roles``."""
    if identity.role not in roles:
        raise PermissionDeniedError(
            f"{identity.common_name!r} has role {identity.role!r}; this call needs "
            f"{' or '.join(repr(r) for r in roles)}"
        )


def insecure_metadata(identity: Identity) -> tuple[tuple[str, str], ...]:
    """Call metadata that names the caller in ``--insecure`` mode."""
    return ((INSECURE_IDENTITY_HEADER, f"{identity.role}:{identity.common_name}"),)
