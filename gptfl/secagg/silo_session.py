"""A silo's side of one secure-aggregation round, as a state machine with no I/O.

The silo agent calls the four steps in order, one per stage task, and sends what each
returns: :meth:`SiloSession.advertise`, :meth:`~SiloSession.share_keys`,
:meth:`~SiloSession.mask`, :meth:`~SiloSession.unmask`. Each step checks everything the
coordinator relayed before it uses it, and a step that fails changes nothing, so the silo
can decline the task and stay consistent.

The silo's secrets (two X25519 private keys and a self-mask seed) live only in this object;
nothing but shares sealed to peers, and at the end the shares the protocol allows, ever
leaves it. A silo never reveals both kinds of share of one peer: once it has given the
coordinator a share of a peer's self-mask seed it refuses to give a share of that peer's
mask key, and the other way round, for as long as the round lasts.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.hazmat.primitives.serialization import PublicFormat as _PublicFormat

from gptfl.errors import BelowThresholdError, SecureAggregationError
from gptfl.secagg import shamir
from gptfl.secagg.authentication import PeerVerifier, SiloCredentials, sign_advertisement
from gptfl.secagg.envelopes import ShareBundle, envelope_key, open_sealed, seal
from gptfl.secagg.graph import Graph, neighbour_graph, share_holders
from gptfl.secagg.masking import apply_mask, new_seed, pairwise_seed, pairwise_sign
from gptfl.secagg.messages import (
    KeyAdvertisement,
    ProtocolSettings,
    RoundContext,
    ShareEnvelope,
    UnmaskReply,
    UnmaskRequest,
)
from gptfl.secagg.quantization import sample_weights
from gptfl.secagg.ring import Ring, RingVector

log = logging.getLogger(__name__)


class SiloStep(enum.Enum):
    """How far a silo's round has got: the last step it completed."""

    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    UNMASKED = "unmasked"


class _RevealedKind(enum.Enum):
    MASK_KEY = "mask key"
    SELF_MASK = "self-mask seed"


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of a private key's public half."""
    return key.public_key().public_bytes(Encoding.Raw, _PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of an X25519 private key (what is shared)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class SiloSession:
    """One silo's part in one round (not thread-safe: one stage task at a time).

    Args:
        credentials: the silo's TLS identity (signs its keys).
        verifier: checks peers' keys against the CA.
        context: the round.
        settings: the job's threshold and graph.
        ring: the ring masked inputs live in.
        num_examples: the silo's training examples (advertised; its weight in the sum).
    """

    def __init__(
        self,
        *,
        credentials: SiloCredentials,
        verifier: PeerVerifier,
        context: RoundContext,
        settings: ProtocolSettings,
        ring: Ring,
        num_examples: int,
    ) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self._credentials = credentials
        self._verifier = verifier
        self._context = context
        self._settings = settings
        self._ring = ring
        self._num_examples = num_examples
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = new_seed()
        self.step = SiloStep.NEW
        self._own: KeyAdvertisement | None = None
        self._peers: dict[str, KeyAdvertisement] = {}
        self._points: dict[str, int] = {}
        self._graph: Graph = {}
        #: the bundles this silo holds, by whose secrets they share (its own included)
        self._held: dict[str, ShareBundle] = {}
        self._revealed: dict[str, _RevealedKind] = {}
        #: what the share and mask steps answered, for a repeat of the same request
        self._shared: tuple[tuple[KeyAdvertisement, ...], list[ShareEnvelope]] | None = None
        #: the digest of the input masked (a repeat is masked again, not stored)
        self._masked_digest: bytes | None = None
        self._mask_peers: tuple[str, ...] = ()

    @property
    def silo_id(self) -> str:
        return self._credentials.silo_id

    @property
    def context(self) -> RoundContext:
        return self._context

    @property
    def num_examples(self) -> int:
        """The sample count this silo advertises (its weight in the sum)."""
        return self._num_examples

    @property
    def advertisement(self) -> KeyAdvertisement | None:
        """The silo's signed keys, once advertised."""
        return self._own

    @property
    def weight(self) -> float:
        """This silo's weight in the round's sum: its examples over the most any advertising
        silo has (known once keys are shared)."""
        self._expect_at_least(SiloStep.SHARED, "know its weight")
        counts = {silo: adv.num_examples for silo, adv in self._peers.items()}
        return sample_weights(counts)[self.silo_id]

    # ------------------------------------------------------------------ stage 1

    def advertise(self) -> KeyAdvertisement:
        """The silo's two public keys for the round, signed with its TLS key."""
        self._expect(SiloStep.NEW, "advertise keys")
        self._own = sign_advertisement(
            self._credentials,
            self._context,
            cipher_public=public_bytes(self._cipher_key),
            mask_public=public_bytes(self._mask_key),
            num_examples=self._num_examples,
        )
        self.step = SiloStep.ADVERTISED
        return self._own

    # ------------------------------------------------------------------ stage 2

    def share_keys(self, advertisements: Sequence[KeyAdvertisement]) -> list[ShareEnvelope]:
        """Checks the relayed keys and seals shares of this silo's secrets to its neighbours.

        Args:
            advertisements: every silo's keys as the coordinator relays them (this silo's
                own included, unchanged).

        Returns:
            One envelope per neighbour. The same relay again (a lost reply) gets the same
            envelopes; any other relay after the first is refused.

        Raises:
            PeerKeyError: a peer's keys are not signed by that peer's certificate.
            SecureAggregationError: a replay from another round, a silo twice, this silo's
                keys missing or altered, or two silos with the same key.
            BelowThresholdError: fewer silos (or, in a sparse graph, neighbours) than the
                threshold.
        """
        if self._shared is not None and self.step is SiloStep.SHARED:
            if tuple(advertisements) == self._shared[0]:
                return list(self._shared[1])
            raise SecureAggregationError(
                f"{self.silo_id} already shared its keys for other relayed keys this round"
            )
        self._expect(SiloStep.ADVERTISED, "share keys")
        assert self._own is not None
        peers = self._check_advertisements(advertisements)
        members = sorted(peers)
        points = {silo: position + 1 for position, silo in enumerate(members)}
        graph = neighbour_graph(members, degree=self._settings.neighbours, seed=self._ctx())
        holders = sorted(share_holders(graph, self.silo_id))
        threshold = self._settings.threshold
        if len(holders) < threshold:
            raise BelowThresholdError(
                f"{len(holders)} silos would hold shares of {self.silo_id}'s secrets, "
                f"threshold {threshold}"
            )
        at = [points[holder] for holder in holders]
        key_shares = shamir.split(private_bytes(self._mask_key), threshold=threshold, points=at)
        seed_shares = shamir.split(self._self_seed, threshold=threshold, points=at)
        envelopes: list[ShareEnvelope] = []
        held: dict[str, ShareBundle] = {}
        for holder, key_share, seed_share in zip(holders, key_shares, seed_shares, strict=True):
            bundle = ShareBundle(key_share, seed_share)
            if holder == self.silo_id:
                held[holder] = bundle
                continue
            key = envelope_key(
                self._cipher_key,
                peers[holder].cipher_public,
                context=self._ctx(),
                me=self.silo_id,
                peer=holder,
            )
            sealed = seal(key, bundle, context=self._ctx(), sender=self.silo_id, receiver=holder)
            envelopes.append(ShareEnvelope(self._context.round, self.silo_id, holder, sealed))
        self._peers, self._points, self._graph, self._held = peers, points, graph, held
        self._shared = (tuple(advertisements), envelopes)
        self.step = SiloStep.SHARED
        return list(envelopes)

    def _check_advertisements(
        self, advertisements: Sequence[KeyAdvertisement]
    ) -> dict[str, KeyAdvertisement]:
        own = self._own
        assert own is not None
        peers: dict[str, KeyAdvertisement] = {}
        for advertisement in advertisements:
            silo = advertisement.silo_id
            self._context.check(advertisement.round, what=f"the keys of {silo}")
            if silo in peers:
                raise SecureAggregationError(f"the keys of {silo} are relayed twice")
            if silo == self.silo_id:
                if advertisement != own:
                    raise SecureAggregationError(f"the keys relayed for {silo} are not its own")
            else:
                self._verifier.verify(advertisement, self._context)
            peers[silo] = advertisement
        if self.silo_id not in peers:
            raise SecureAggregationError(f"the relayed keys leave {self.silo_id} out")
        keys = [a.cipher_public for a in peers.values()] + [a.mask_public for a in peers.values()]
        if len(set(keys)) != len(keys):
            raise SecureAggregationError("two advertised keys are the same")
        if len(peers) < self._settings.threshold:
            raise BelowThresholdError(
                f"{len(peers)} silos advertised keys, threshold {self._settings.threshold}"
            )
        return peers

    # ------------------------------------------------------------------ stage 3

    def mask(self, envelopes: Sequence[ShareEnvelope], values: RingVector) -> RingVector:
        """Opens the shares the neighbours sent and masks this silo's quantized input.

        The pairwise masks are those with the neighbours whose shares arrived (the silos
        that completed the share stage); the self mask is always added.

        Args:
            envelopes: the envelopes addressed to this silo, as relayed.
            values: the silo's quantized input (not changed).

        Returns:
            The masked input. The same input again (an upload sent anew) gets the same
            masked input; a different one is refused, since two inputs under the same masks
            would give their difference away.

        Raises:
            SecureAggregationError: a replay, an envelope for another silo, from a silo that
                is not a neighbour, twice from one silo, that does not open, or with shares at
                another point; an input outside the ring.
            BelowThresholdError: fewer than the threshold of this silo's neighbours (itself
                included) remain.
        """
        if self._masked_digest is not None:
            if _digest(values) == self._masked_digest:
                return self._apply_masks(values)
            raise SecureAggregationError(
                f"{self.silo_id} already masked another input this round; it masks one only"
            )
        self._expect(SiloStep.SHARED, "mask its input")
        me = self.silo_id
        received: dict[str, ShareBundle] = {}
        for envelope in envelopes:
            sender = envelope.sender
            self._context.check(envelope.round, what=f"the shares from {sender}")
            if envelope.receiver != me:
                raise SecureAggregationError(
                    f"shares from {sender} for {envelope.receiver} were relayed to {me}"
                )
            if sender not in self._graph[me]:
                raise SecureAggregationError(
                    f"shares from {sender}, which is not a neighbour of {me} in this round"
                )
            if sender in received:
                raise SecureAggregationError(f"shares from {sender} are relayed twice")
            key = envelope_key(
                self._cipher_key,
                self._peers[sender].cipher_public,
                context=self._ctx(),
                me=me,
                peer=sender,
            )
            bundle = open_sealed(
                key, envelope.sealed, context=self._ctx(), sender=sender, receiver=me
            )
            if bundle.point != self._points[me]:
                raise SecureAggregationError(f"the shares from {sender} are not at {me}'s point")
            received[sender] = bundle
        if len(received) + 1 < self._settings.threshold:
            raise BelowThresholdError(
                f"{len(received) + 1} of {me}'s neighbourhood shared keys, threshold "
                f"{self._settings.threshold}"
            )
        self._ring.check(values, length=len(values), what="the input to mask")
        self._held.update(received)
        self._mask_peers = tuple(sorted(received))
        self._masked_digest = _digest(values)
        masked = self._apply_masks(values)
        self.step = SiloStep.MASKED
        log.debug("masked input of %s with %d pairwise masks", me, len(received))
        return masked

    def _apply_masks(self, values: RingVector) -> RingVector:
        """``values`` plus the self mask and the pairwise masks with :attr:`_mask_peers`."""
        me = self.silo_id
        masked = values.copy()
        apply_mask(masked, self._self_seed, self._ring, sign=1)
        for peer in self._mask_peers:
            seed = pairwise_seed(
                self._mask_key, self._peers[peer].mask_public, context=self._ctx(), me=me, peer=peer
            )
            apply_mask(masked, seed, self._ring, sign=pairwise_sign(me, peer))
        return masked

    # ------------------------------------------------------------------ stage 4

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """The shares the coordinator needs to remove the masks, and no others.

        For each dropped neighbour, this silo's share of its mask key; for each surviving
        neighbour and itself, its share of the self-mask seed. A request may be repeated
        (a lost reply) as long as it asks nothing this silo refuses.

        Raises:
            SecureAggregationError: a replay; a silo named both surviving and dropped, or
                named as the other kind than a share already revealed (both kinds of one
                peer); a silo outside the round; this silo named dropped; a neighbour named
                whose shares never arrived.
            BelowThresholdError: fewer survivors than the threshold.
        """
        if self.step not in (SiloStep.MASKED, SiloStep.UNMASKED):
            raise SecureAggregationError(
                f"{self.silo_id} cannot unmask: its round is at step {self.step.value}"
            )
        self._context.check(request.round, what="the unmask request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = sorted(survivors & dropped)
        if both:
            raise SecureAggregationError(
                f"the unmask request asks for both kinds of share of {', '.join(both)}"
            )
        unknown = sorted((survivors | dropped) - set(self._peers))
        if unknown:
            raise SecureAggregationError(
                f"the unmask request names silos outside this round: {', '.join(unknown)}"
            )
        me = self.silo_id
        if me not in survivors:
            raise SecureAggregationError(f"the unmask request does not count {me} a survivor")
        if len(survivors) < self._settings.threshold:
            raise BelowThresholdError(
                f"{len(survivors)} survivors, threshold {self._settings.threshold}"
            )
        neighbours = self._graph[me]
        missing = sorted(((survivors | dropped) & neighbours) - set(self._held))
        if missing:
            raise SecureAggregationError(
                f"the unmask request names {', '.join(missing)}, whose shares never reached {me}"
            )
        wanted = dict.fromkeys(dropped & neighbours, _RevealedKind.MASK_KEY)
        wanted.update(dict.fromkeys(survivors & (neighbours | {me}), _RevealedKind.SELF_MASK))
        for peer, kind in wanted.items():
            before = self._revealed.get(peer)
            if before is not None and before is not kind:
                raise SecureAggregationError(
                    f"{me} already revealed its share of {peer}'s {before.value}; it never "
                    f"reveals the {kind.value} too"
                )
        self._revealed.update(wanted)
        self.step = SiloStep.UNMASKED
        return UnmaskReply(
            round=self._context.round,
            silo_id=me,
            mask_key_shares={
                peer: self._held[peer].mask_key
                for peer, kind in sorted(wanted.items())
                if kind is _RevealedKind.MASK_KEY
            },
            self_mask_shares={
                peer: self._held[peer].self_mask
                for peer, kind in sorted(wanted.items())
                if kind is _RevealedKind.SELF_MASK
            },
        )

    # ------------------------------------------------------------------ helpers

    def _ctx(self) -> bytes:
        return self._context.encode()

    def _expect(self, step: SiloStep, action: str) -> None:
        if self.step is not step:
            raise SecureAggregationError(
                f"{self.silo_id} cannot {action}: its round is at step {self.step.value}"
            )

    def _expect_at_least(self, step: SiloStep, action: str) -> None:
        order = list(SiloStep)
        if order.index(self.step) < order.index(step):
            raise SecureAggregationError(
                f"{self.silo_id} cannot {action}: its round is at step {self.step.value}"
            )


def _digest(values: RingVector) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(values).data).digest()  # the buffer, no copy
