"""The masks: X25519 agreement, HKDF seeds, and a ChaCha20 generator that expands a seed.

Two silos ``u`` and ``v`` agree on a secret from one's private key and the other's public key
(X25519), and derive a 32-byte seed from it with HKDF-SHA256, bound to the round and the
pair. The seed keys ChaCha20, whose keystream read as ring elements is the pairwise mask:
``u`` adds it when ``u > v`` and subtracts it when ``u < v`` (silo ids compared as strings),
so in the sum of both inputs it cancels. Each silo also adds a self mask expanded from a
seed of its own, which hides its input even from a coordinator that learns a dropped peer's
key (Bonawitz et al. 2017, section 4).
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gptfl.errors import SecureAggregationError
from gptfl.secagg.encoding import frame
from gptfl.secagg.ring import Ring, RingVector

#: a seed's length: a ChaCha20 key
SEED_BYTES = 32
#: an X25519 public key's length
PUBLIC_KEY_BYTES = 32
# ChaCha20's 16-byte nonce is a 4-byte block counter and a 12-byte nonce; each seed keys one
# stream only, so it may start at zero.
_STREAM_NONCE = bytes(16)
_MASK_LABEL = b"gptfl-secagg-mask-v1"
#: the keystream is made and added this many bytes at a time
_BLOCK_BYTES = 1 << 18
_ZEROS = memoryview(bytes(_BLOCK_BYTES))


def new_seed() -> bytes:
    """A fresh random seed (for a self mask)."""
    return secrets.token_bytes(SEED_BYTES)


def load_public_key(data: bytes, *, what: str) -> X25519PublicKey:
    """An X25519 public key from its 32 raw bytes.

    Raises:
        SecureAggregationError: not 32 bytes.
    """
    if len(data) != PUBLIC_KEY_BYTES:
        raise SecureAggregationError(
            f"{what} must be a {PUBLIC_KEY_BYTES}-byte X25519 key, got {len(data)} bytes"
        )
    return X25519PublicKey.from_public_bytes(data)


def agree(private: X25519PrivateKey, peer_public: bytes, *, what: str) -> bytes:
    """The X25519 shared secret of ``private`` and a peer's raw public key.

    Raises:
        SecureAggregationError: the public key is malformed or of small order (the agreement
            would be all zeros).
    """
    public = load_public_key(peer_public, what=what)
    try:
        return private.exchange(public)
    except ValueError:
        raise SecureAggregationError(f"{what} is a degenerate X25519 key") from None


def pair_key(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    label: bytes,
    context: bytes,
    me: str,
    peer: str,
    what: str,
) -> bytes:
    """A 32-byte key ``me`` and ``peer`` derive alike from their X25519 agreement: HKDF-SHA256
    bound to its use (``label``), the round and the pair (in id order, so both ends agree).

    Raises:
        SecureAggregationError: the peer's key (``what``) is malformed or degenerate.
    """
    shared = agree(private, peer_public, what=what)
    info = frame(label, context, *sorted((me, peer)))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def pairwise_seed(
    private: X25519PrivateKey, peer_public: bytes, *, context: bytes, me: str, peer: str
) -> bytes:
    """The mask seed ``me`` and ``peer`` share (the same on both sides)."""
    return pair_key(
        private,
        peer_public,
        label=_MASK_LABEL,
        context=context,
        me=me,
        peer=peer,
        what=f"mask key of {peer}",
    )


def pairwise_sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds the pair's mask, -1 if it subtracts it."""
    if me == peer:
        raise ValueError("a silo has no pairwise mask with itself")
    return 1 if me > peer else -1


def expand(seed: bytes, ring: Ring, length: int) -> RingVector:
    """``length`` ring elements from ChaCha20 keyed with ``seed``.

    The keystream is uniform over words, and the ring's modulus divides the word's, so the
    elements are uniform over the ring.
    """
    out = ring.zeros(length)
    apply_mask(out, seed, ring, sign=1)
    return out


def apply_mask(total: RingVector, seed: bytes, ring: Ring, *, sign: int) -> None:
    """Adds (``sign`` +1) or subtracts (-1) the mask expanded from ``seed``, in place.

    The keystream (the encryption of zeros) is made and added a block at a time, into one
    small buffer: no model-sized mask is ever held, and each block is added while it is in
    the CPU's cache.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _STREAM_NONCE), mode=None).encryptor()
    words = _BLOCK_BYTES // ring.word_bytes
    buffer = bytearray(_BLOCK_BYTES)
    block = np.frombuffer(buffer, dtype=ring.dtype)
    combine = np.add if sign > 0 else np.subtract
    for start in range(0, len(total), words):
        part = total[start : start + words]
        count = len(part)
        encryptor.update_into(_ZEROS[: count * ring.word_bytes], buffer)
        combine(part, block[:count], out=part)
    ring.reduce(total)
