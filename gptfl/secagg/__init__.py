"""Secure aggregation: the coordinator learns only the sum of the silos' updates.

The protocol is Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS 2017), for an honest-but-curious coordinator, with the sparse neighbour graph
of SecAgg+ (Bell et al., CCS 2020) as an option. Each module does one thing:

- :mod:`~gptfl.secagg.ring`: vectors in the ring ``Z_{2^bits}`` and their wire form.
- :mod:`~gptfl.secagg.quantization`: fixed point in that ring, with the headroom that keeps a
  sum of silos from wrapping.
- :mod:`~gptfl.secagg.shamir`: Shamir secret sharing of 32-byte secrets.
- :mod:`~gptfl.secagg.masking`: X25519 key agreement, HKDF, the ChaCha20 mask generator,
  pairwise and self masks.
- :mod:`~gptfl.secagg.envelopes`: authenticated encryption of shares between two silos.
- :mod:`~gptfl.secagg.authentication`: silos sign their advertised keys with their TLS key.
- :mod:`~gptfl.secagg.graph`: who masks with and shares with whom.
- :mod:`~gptfl.secagg.messages`: the protocol's messages.
- :mod:`~gptfl.secagg.silo_session` and :mod:`~gptfl.secagg.server_session`: the two sides of
  one round as pure state machines (no network, no threads).
"""
