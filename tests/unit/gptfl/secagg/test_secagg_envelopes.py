"""Sealed shares: only the receiver opens them, and only for the round, sender and receiver."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gptfl.errors import SecureAggregationError
from gptfl.secagg import shamir
from gptfl.secagg.envelopes import SEALED_BYTES, ShareBundle, envelope_key, open_sealed, seal
from gptfl.secagg.silo_session import public_bytes

CONTEXT = b"round-1"


def _bundle() -> ShareBundle:
    key_share = shamir.split(b"k" * 32, threshold=2, points=[4, 5])[0]
    seed_share = shamir.split(b"s" * 32, threshold=2, points=[4, 5])[0]
    return ShareBundle(key_share, seed_share)


def test_the_receiver_opens_what_the_sender_sealed() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    bundle = _bundle()
    key_a = envelope_key(a, public_bytes(b), context=CONTEXT, me="a", peer="b")
    key_b = envelope_key(b, public_bytes(a), context=CONTEXT, me="b", peer="a")
    sealed = seal(key_a, bundle, context=CONTEXT, sender="a", receiver="b")
    assert len(sealed) == SEALED_BYTES
    assert open_sealed(key_b, sealed, context=CONTEXT, sender="a", receiver="b") == bundle
    # The share values are not in the ciphertext in the clear.
    assert bundle.mask_key.value_bytes()[-16:] not in sealed


@pytest.mark.parametrize(
    ("context", "sender", "receiver"),
    [(b"round-2", "a", "b"), (CONTEXT, "b", "a"), (CONTEXT, "a", "c"), (CONTEXT, "c", "b")],
)
def test_an_envelope_opens_only_for_its_round_sender_and_receiver(
    context: bytes, sender: str, receiver: str
) -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    key = envelope_key(a, public_bytes(b), context=CONTEXT, me="a", peer="b")
    sealed = seal(key, _bundle(), context=CONTEXT, sender="a", receiver="b")
    with pytest.raises(SecureAggregationError, match="do not open"):
        open_sealed(key, sealed, context=context, sender=sender, receiver=receiver)


def test_a_third_silo_or_an_altered_envelope_does_not_open() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    key = envelope_key(a, public_bytes(b), context=CONTEXT, me="a", peer="b")
    sealed = seal(key, _bundle(), context=CONTEXT, sender="a", receiver="b")
    eavesdropper = envelope_key(c, public_bytes(a), context=CONTEXT, me="b", peer="a")
    with pytest.raises(SecureAggregationError, match="do not open"):
        open_sealed(eavesdropper, sealed, context=CONTEXT, sender="a", receiver="b")
    altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecureAggregationError, match="do not open"):
        open_sealed(key, altered, context=CONTEXT, sender="a", receiver="b")
    with pytest.raises(SecureAggregationError, match="bytes, expected"):
        open_sealed(key, sealed[:-1], context=CONTEXT, sender="a", receiver="b")
