"""Shares sealed from one silo to another, so the coordinator that relays them reads none.

The key is HKDF-SHA256 of the X25519 agreement of the sender's and the receiver's cipher
keys, bound to the round; the cipher is ChaCha20-Poly1305 with a random 96-bit nonce, and the
associated data binds the round, the sender and the receiver, so an envelope cannot be
replayed into another round, turned around, or redirected to a third silo.

What an envelope holds is a :class:`ShareBundle`: the receiver's shares of the sender's mask
key and of its self-mask seed, at the receiver's point.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gptfl.errors import SecureAggregationError
from gptfl.secagg.encoding import frame
from gptfl.secagg.masking import pair_key
from gptfl.secagg.shamir import SHARE_VALUE_BYTES, Share

_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEY_LABEL = b"gptfl-secagg-envelope-key-v1"
_AD_LABEL = b"gptfl-secagg-envelope-v1"
_BUNDLE = struct.Struct(f">I{SHARE_VALUE_BYTES}s{SHARE_VALUE_BYTES}s")
#: the exact length of a sealed bundle
SEALED_BYTES = _NONCE_BYTES + _BUNDLE.size + _TAG_BYTES


@dataclass(frozen=True)
class ShareBundle:
    """One holder's shares of one silo's two secrets (both at the holder's point).

    Attributes:
        mask_key: the share of the silo's X25519 mask private key.
        self_mask: the share of the silo's self-mask seed.
    """

    mask_key: Share
    self_mask: Share

    def __post_init__(self) -> None:
        if self.mask_key.x != self.self_mask.x:
            raise ValueError("both shares of a bundle are at the holder's point")

    @property
    def point(self) -> int:
        return self.mask_key.x

    def to_bytes(self) -> bytes:
        return _BUNDLE.pack(self.point, self.mask_key.value_bytes(), self.self_mask.value_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        """Raises SecureAggregationError on the wrong length or a value outside the field."""
        if len(data) != _BUNDLE.size:
            raise SecureAggregationError(f"a share bundle must be {_BUNDLE.size} bytes")
        point, mask_key, self_mask = _BUNDLE.unpack(data)
        return cls(
            Share.from_value_bytes(point, mask_key), Share.from_value_bytes(point, self_mask)
        )


def envelope_key(
    private: X25519PrivateKey, peer_public: bytes, *, context: bytes, me: str, peer: str
) -> bytes:
    """The key ``me`` and ``peer`` seal envelopes with (the same on both sides)."""
    return pair_key(
        private,
        peer_public,
        label=_KEY_LABEL,
        context=context,
        me=me,
        peer=peer,
        what=f"cipher key of {peer}",
    )


def seal(key: bytes, bundle: ShareBundle, *, context: bytes, sender: str, receiver: str) -> bytes:
    """``bundle`` encrypted and authenticated for ``receiver``: nonce, ciphertext, tag."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    associated = frame(_AD_LABEL, context, sender, receiver)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, bundle.to_bytes(), associated)


def open_sealed(
    key: bytes, sealed: bytes, *, context: bytes, sender: str, receiver: str
) -> ShareBundle:
    """The bundle in an envelope from ``sender`` to ``receiver`` in this round.

    Raises:
        SecureAggregationError: the wrong length, or the envelope was not sealed with this
            key for this round, sender and receiver (or was altered).
    """
    if len(sealed) != SEALED_BYTES:
        raise SecureAggregationError(
            f"shares from {sender} are {len(sealed)} bytes, expected {SEALED_BYTES}"
        )
    nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
    associated = frame(_AD_LABEL, context, sender, receiver)
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise SecureAggregationError(
            f"shares from {sender} do not open: not sealed for {receiver} in this round"
        ) from None
    return ShareBundle.from_bytes(plaintext)
