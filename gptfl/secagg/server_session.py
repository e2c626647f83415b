"""The coordinator's side of one secure-aggregation round, as a state machine with no I/O.

It relays what the silos send, tracks who is still in the round (Bonawitz et al.'s U1: keys
advertised, U2: shares sent, U3: masked input accepted, U5: unmask reply accepted), adds the
masked inputs into one running sum as they arrive, and at the end reconstructs what it is
allowed to: the dropped silos' mask keys (to remove their pairwise masks from the survivors'
inputs) and the survivors' self-mask seeds. What is left is the exact sum of the survivors'
quantized inputs. It never holds a silo's secret while that silo's input is masked by it:
shares of both kinds for one silo are refused on arrival.

Every ``receive_*`` either accepts a message whole or raises and changes nothing, so the
round goes on with the silos that behave while the threshold holds. Not thread-safe: the
caller serialises (the coordinator's update intake holds its fold lock).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gptfl.errors import BelowThresholdError, DuplicateUpdateError, SecureAggregationError
from gptfl.secagg import shamir
from gptfl.secagg.authentication import PeerVerifier
from gptfl.secagg.envelopes import SEALED_BYTES
from gptfl.secagg.graph import Graph, neighbour_graph, share_holders
from gptfl.secagg.masking import apply_mask, load_public_key, pairwise_seed, pairwise_sign
from gptfl.secagg.messages import (
    KeyAdvertisement,
    ProtocolSettings,
    RoundContext,
    ShareEnvelope,
    UnmaskReply,
    UnmaskRequest,
)
from gptfl.secagg.ring import Ring, RingVector
from gptfl.secagg.silo_session import public_bytes

log = logging.getLogger(__name__)


class ServerStage(enum.Enum):
    """The stage the round is in (what it accepts now)."""

    ADVERTISE = "advertise keys"
    SHARE = "share keys"
    MASKED_INPUT = "masked input"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


class ServerSession:
    """One round at the coordinator.

    Args:
        context: the round.
        settings: the job's threshold and graph.
        ring: the ring masked inputs live in.
        length: how many ring elements a masked input holds.
        silos: the silos selected for the round.
        verifier: checks each advertisement against the CA on arrival, so a forged one never
            reaches the silos (they check again); None to leave that to the silos.
    """

    def __init__(
        self,
        *,
        context: RoundContext,
        settings: ProtocolSettings,
        ring: Ring,
        length: int,
        silos: Sequence[str],
        verifier: PeerVerifier | None = None,
    ) -> None:
        self.context = context
        self._settings = settings
        self._ring = ring
        self.length = length
        self._selected = frozenset(silos)
        self._verifier = verifier
        self.stage = ServerStage.ADVERTISE
        self._advertised: dict[str, KeyAdvertisement] = {}
        self._shares: dict[str, tuple[ShareEnvelope, ...]] = {}
        self._graph: Graph = {}
        self._points: dict[str, int] = {}
        self._sharing: tuple[str, ...] = ()
        self._total = ring.zeros(length)
        self._masked: set[str] = set()
        self._survivors: tuple[str, ...] = ()
        self._dropped: tuple[str, ...] = ()
        self._replies: dict[str, UnmaskReply] = {}

    # ------------------------------------------------------------------ what it knows

    @property
    def threshold(self) -> int:
        return self._settings.threshold

    @property
    def members(self) -> tuple[str, ...]:
        """The silos still in the round at its current stage (for status)."""
        if self.stage is ServerStage.ADVERTISE:
            return tuple(sorted(self._advertised))
        if self.stage is ServerStage.SHARE:
            return tuple(sorted(self._advertised))
        if self.stage is ServerStage.MASKED_INPUT:
            return self._sharing
        return self._survivors

    @property
    def advertised(self) -> Mapping[str, KeyAdvertisement]:
        """U1's advertisements (their sample counts weight the sum)."""
        return self._advertised

    @property
    def sharing(self) -> tuple[str, ...]:
        """U2: the silos whose shares were relayed (asked for masked inputs)."""
        return self._sharing

    @property
    def survivors(self) -> tuple[str, ...]:
        """U3: the silos whose masked inputs are in the sum."""
        return self._survivors

    @property
    def dropped(self) -> tuple[str, ...]:
        """U2 minus U3: shared keys but sent no accepted masked input."""
        return self._dropped

    # ------------------------------------------------------------------ stage 1

    def receive_advertisement(self, sender: str, advertisement: KeyAdvertisement) -> None:
        """Accepts a silo's keys (a repeat of the same keys is a no-op).

        Args:
            sender: the silo that sent it (from its TLS certificate).
            advertisement: its keys.

        Raises:
            SecureAggregationError: the stage is over, a replay from another round, keys in
                another silo's name, a silo not selected, different keys a second time, or
                malformed keys.
            PeerKeyError: the signature does not verify against the silo's certificate.
        """
        self._expect(ServerStage.ADVERTISE, f"keys from {sender}")
        self.context.check(advertisement.round, what=f"the keys from {sender}")
        if advertisement.silo_id != sender:
            raise SecureAggregationError(
                f"{sender} sent keys in the name of {advertisement.silo_id}"
            )
        if sender not in self._selected:
            raise SecureAggregationError(f"{sender} is not in round {self.context.round}")
        if _is_repeat(self._advertised, sender, advertisement, "advertised other keys"):
            return
        load_public_key(advertisement.cipher_public, what=f"the cipher key of {sender}")
        load_public_key(advertisement.mask_public, what=f"the mask key of {sender}")
        if advertisement.num_examples <= 0:
            raise SecureAggregationError(
                f"{sender} advertised {advertisement.num_examples} examples"
            )
        if self._verifier is not None:
            self._verifier.verify(advertisement, self.context)
        self._advertised[sender] = advertisement

    def close_advertising(self) -> tuple[KeyAdvertisement, ...]:
        """Ends the stage: U1 is fixed and its keys are what every member receives.

        Raises:
            BelowThresholdError: fewer silos than the threshold advertised (the round fails).
        """
        self._expect(ServerStage.ADVERTISE, "the end of the advertise stage")
        members = sorted(self._advertised)
        self._require(len(members), "silos advertised keys")
        self._graph = neighbour_graph(
            members, degree=self._settings.neighbours, seed=self.context.encode()
        )
        self._points = {silo: position + 1 for position, silo in enumerate(members)}
        self.stage = ServerStage.SHARE
        return tuple(self._advertised[silo] for silo in members)

    # ------------------------------------------------------------------ stage 2

    def receive_shares(self, sender: str, envelopes: Sequence[ShareEnvelope]) -> None:
        """Accepts a silo's envelopes: exactly one for each of its neighbours.

        Raises:
            SecureAggregationError: the stage is over; the sender did not advertise keys; a
                replay; an envelope sent in another's name, for a silo outside the round
                (an unknown peer), for a silo that is not its neighbour, twice for one
                receiver, missing for a neighbour, or of the wrong size; other envelopes a
                second time.
        """
        self._expect(ServerStage.SHARE, f"shares from {sender}")
        if sender not in self._advertised:
            raise SecureAggregationError(f"{sender} sent shares but advertised no keys this round")
        received = tuple(envelopes)
        if _is_repeat(self._shares, sender, received, "sent other shares"):
            return
        receivers: set[str] = set()
        for envelope in received:
            receiver = envelope.receiver
            self.context.check(envelope.round, what=f"shares from {sender}")
            if envelope.sender != sender:
                raise SecureAggregationError(
                    f"{sender} sent shares in the name of {envelope.sender}"
                )
            if receiver not in self._advertised:
                raise SecureAggregationError(
                    f"{sender} sent shares for {receiver}, which is not in this round"
                )
            if receiver not in self._graph[sender]:
                raise SecureAggregationError(
                    f"{sender} sent shares for {receiver}, which is not its neighbour"
                )
            if receiver in receivers:
                raise SecureAggregationError(f"{sender} sent two envelopes for {receiver}")
            if len(envelope.sealed) != SEALED_BYTES:
                raise SecureAggregationError(
                    f"{sender}'s shares for {receiver} are {len(envelope.sealed)} bytes, "
                    f"expected {SEALED_BYTES}"
                )
            receivers.add(receiver)
        missing = sorted(self._graph[sender] - receivers)
        if missing:
            raise SecureAggregationError(f"{sender} sent no shares for {', '.join(missing)}")
        self._shares[sender] = received

    def close_sharing(self) -> tuple[str, ...]:
        """Ends the stage: U2 is fixed.

        A silo is left out when fewer than the threshold of its share holders (its
        neighbours and itself) shared, since its own secrets could not be recovered then;
        that can cascade, so the set is pruned until it is stable.

        Returns:
            U2, the silos asked for masked inputs.

        Raises:
            BelowThresholdError: fewer silos than the threshold remain.
        """
        self._expect(ServerStage.SHARE, "the end of the share stage")
        sharing = set(self._shares)
        while True:
            short = {
                silo
                for silo in sharing
                if len(share_holders(self._graph, silo) & sharing) < self.threshold
            }
            if not short:
                break
            sharing -= short
        self._require(len(sharing), "silos shared keys")
        self._sharing = tuple(sorted(sharing))
        self.stage = ServerStage.MASKED_INPUT
        return self._sharing

    def envelopes_for(self, receiver: str) -> tuple[ShareEnvelope, ...]:
        """The envelopes ``receiver`` gets: those addressed to it by silos in U2.

        Raises:
            SecureAggregationError: ``receiver`` is not in U2.
        """
        self._expect(ServerStage.MASKED_INPUT, f"the envelopes of {receiver}")
        if receiver not in self._sharing:
            raise SecureAggregationError(f"{receiver} is not among the silos that shared keys")
        return tuple(
            envelope
            for sender in self._sharing
            if sender != receiver
            for envelope in self._shares[sender]
            if envelope.receiver == receiver
        )

    # ------------------------------------------------------------------ stage 3

    def check_masked(self, sender: str, vector: RingVector) -> None:
        """Checks, without adding it, that ``vector`` may be ``sender``'s masked input.

        Raises:
            SecureAggregationError: the stage is over, the sender is not in U2, or the vector
                holds values outside the ring.
            DuplicateUpdateError: the sender's input is already in the sum.
            ManifestMismatchError: the wrong dtype or length.
        """
        self._expect(ServerStage.MASKED_INPUT, f"a masked input from {sender}")
        if sender not in self._sharing:
            raise SecureAggregationError(
                f"{sender} sent a masked input but is not among the silos that shared keys"
            )
        if sender in self._masked:
            raise DuplicateUpdateError(f"the masked input of {sender} is already in the sum")
        self._ring.check(vector, length=self.length, what=f"the masked input of {sender}")

    def receive_masked(self, sender: str, vector: RingVector) -> None:
        """Checks ``sender``'s masked input (see :meth:`check_masked`) and adds it to the sum."""
        self.check_masked(sender, vector)
        self._ring.add_into(self._total, vector)
        self._masked.add(sender)

    @property
    def masked_count(self) -> int:
        return len(self._masked)

    def close_masking(self) -> UnmaskRequest:
        """Ends the stage: U3 is fixed, and the survivors are asked to unmask.

        Raises:
            BelowThresholdError: fewer masked inputs than the threshold arrived.
        """
        self._expect(ServerStage.MASKED_INPUT, "the end of the masked-input stage")
        self._require(len(self._masked), "masked inputs arrived")
        self._survivors = tuple(sorted(self._masked))
        self._dropped = tuple(silo for silo in self._sharing if silo not in self._masked)
        self.stage = ServerStage.UNMASK
        return UnmaskRequest(self.context.round, self._survivors, self._dropped)

    # ------------------------------------------------------------------ stage 4

    def receive_unmask(self, sender: str, reply: UnmaskReply) -> None:
        """Accepts a survivor's shares (a repeat of the same reply is a no-op).

        Raises:
            SecureAggregationError: the stage is over; a replay; a reply in another's name or
                from a silo that is not a survivor; shares for a silo outside the round (an
                unknown peer), of a kind that silo must not be unmasked with (a survivor's
                mask key, a dropped silo's self-mask seed: both kinds of one peer), for a
                silo that never sent shares to the sender, or at another point; a different
                reply a second time.
        """
        self._expect(ServerStage.UNMASK, f"an unmask reply from {sender}")
        self.context.check(reply.round, what=f"the unmask reply from {sender}")
        if reply.silo_id != sender:
            raise SecureAggregationError(f"{sender} sent an unmask reply for {reply.silo_id}")
        if sender not in self._survivors:
            raise SecureAggregationError(f"{sender} is not a survivor of this round")
        if _is_repeat(self._replies, sender, reply, "sent another unmask reply"):
            return
        both = sorted(set(reply.mask_key_shares) & set(reply.self_mask_shares))
        if both:
            raise SecureAggregationError(f"{sender} sent both kinds of share of {', '.join(both)}")
        point = self._points[sender]
        for kinds, allowed, kind in (
            (reply.mask_key_shares, set(self._dropped), "mask key"),
            (reply.self_mask_shares, set(self._survivors), "self-mask seed"),
        ):
            for peer, share in kinds.items():
                if peer not in self._advertised:
                    raise SecureAggregationError(
                        f"{sender} sent a share for {peer}, which is not in this round"
                    )
                if peer not in allowed:
                    raise SecureAggregationError(
                        f"{sender} sent a share of {peer}'s {kind}, which this round must "
                        f"never hold (both kinds of share of one peer)"
                    )
                if peer not in self._sharing or sender not in share_holders(self._graph, peer):
                    raise SecureAggregationError(
                        f"{sender} sent a share for {peer}, from which it received none"
                    )
                if share.x != point:
                    raise SecureAggregationError(
                        f"{sender}'s share for {peer} is at point {share.x}, not its own {point}"
                    )
        self._replies[sender] = reply

    @property
    def unmask_count(self) -> int:
        return len(self._replies)

    def finish(self) -> RingVector:
        """Removes the masks and returns the exact sum of the survivors' quantized inputs.

        Raises:
            BelowThresholdError: fewer unmask replies than the threshold, or too few shares
                of one silo's secret (named); the round fails.
            SecureAggregationError: shares that do not recover a secret (a mask key that
                does not match its public key, extra shares that disagree).
        """
        self._expect(ServerStage.UNMASK, "the end of the unmask stage")
        try:
            self._require(len(self._replies), "unmask replies arrived")
            total = self._total
            for dropped in self._dropped:
                self._remove_pairwise(total, dropped)
            for survivor in self._survivors:
                seed = self._reconstruct(survivor, "self_mask_shares")
                apply_mask(total, seed, self._ring, sign=-1)
        except Exception:
            self.stage = ServerStage.FAILED
            raise
        self.stage = ServerStage.DONE
        log.info(
            "round %d unmasked: %d survivors, %d dropped",
            self.context.round,
            len(self._survivors),
            len(self._dropped),
        )
        return total

    def _remove_pairwise(self, total: RingVector, dropped: str) -> None:
        secret = self._reconstruct(dropped, "mask_key_shares")
        key = X25519PrivateKey.from_private_bytes(secret)
        if public_bytes(key) != self._advertised[dropped].mask_public:
            raise SecureAggregationError(f"the shares of {dropped}'s mask key do not recover it")
        for survivor in self._survivors:
            if survivor not in self._graph[dropped]:
                continue
            seed = pairwise_seed(
                key,
                self._advertised[survivor].mask_public,
                context=self.context.encode(),
                me=dropped,
                peer=survivor,
            )
            # The survivor added its mask with sign(survivor, dropped); take it out.
            apply_mask(total, seed, self._ring, sign=-pairwise_sign(survivor, dropped))

    def _reconstruct(self, silo: str, field: str) -> bytes:
        shares = [
            getattr(reply, field)[silo]
            for reply in self._replies.values()
            if silo in getattr(reply, field)
        ]
        try:
            return shamir.reconstruct(shares, threshold=self.threshold)
        except BelowThresholdError as exc:
            raise BelowThresholdError(f"cannot unmask {silo}: {exc}") from None

    # ------------------------------------------------------------------ helpers

    def fail(self) -> None:
        """Marks the round failed (a stage could not be completed); it accepts nothing more."""
        self.stage = ServerStage.FAILED

    def _expect(self, stage: ServerStage, what: str) -> None:
        if self.stage is not stage:
            raise SecureAggregationError(
                f"{what} does not fit: round {self.context.round} is at the "
                f"{self.stage.value} stage"
            )

    def _require(self, count: int, what: str) -> None:
        if count < self.threshold:
            self.stage = ServerStage.FAILED
            raise BelowThresholdError(f"{count} {what}, threshold {self.threshold}")


def _is_repeat(accepted: Mapping[str, object], sender: str, message: object, what: str) -> bool:
    """Whether ``message`` repeats what ``sender`` already sent (a retried call: a no-op).

    Raises:
        SecureAggregationError: the sender already sent something else at this stage.
    """
    before = accepted.get(sender)
    if before is None:
        return False
    if before != message:
        raise SecureAggregationError(f"{sender} already {what} this round")
    return True
