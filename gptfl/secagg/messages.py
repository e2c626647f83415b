"""The messages of one secure-aggregation round, and what both sides agree on beforehand.

The stages (Bonawitz et al. 2017, figure 4, without the consistency check, which guards
against a coordinator that lies and is outside the honest-but-curious model):

1. advertise keys: each silo sends two X25519 public keys signed with its TLS key
   (:class:`KeyAdvertisement`); the coordinator relays all of them to every silo that sent.
2. share keys: each silo splits its mask private key and its self-mask seed into Shamir
   shares and seals one bundle to each neighbour (:class:`ShareEnvelope`); the coordinator
   relays each envelope to its receiver.
3. masked input: each silo uploads its quantized update plus its masks.
4. unmask: the coordinator names the survivors and the dropped (:class:`UnmaskRequest`);
   each survivor returns its shares of the survivors' seeds and of the dropped silos' mask
   keys, never both for one silo (:class:`UnmaskReply`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gptfl.errors import ConfigError, SecureAggregationError
from gptfl.secagg.encoding import frame
from gptfl.secagg.quantization import FixedPoint
from gptfl.secagg.ring import Ring
from gptfl.secagg.shamir import Share

_CONTEXT_LABEL = b"gptfl-secagg-round-v1"


@dataclass(frozen=True)
class RoundContext:
    """The round every key, seed and envelope is bound to.

    Attributes:
        job_id: the job.
        round: the round number (>= 1).
    """

    job_id: str
    round: int

    def encode(self) -> bytes:
        """The bytes mixed into every derivation, signature and associated data."""
        return frame(_CONTEXT_LABEL, self.job_id, self.round)

    def check(self, round_number: int, *, what: str) -> None:
        """Raises SecureAggregationError when a message names another round (a replay)."""
        if round_number != self.round:
            raise SecureAggregationError(
                f"{what} is for round {round_number}, this is round {self.round}"
            )


@dataclass(frozen=True)
class ProtocolSettings:
    """What the silos and the coordinator agree on for a job.

    Attributes:
        threshold: how many shares recover a secret; at least this many silos must remain
            at every stage, and up to ``threshold - 1`` colluding silos learn nothing.
        neighbours: with SecAgg+'s sparse graph, how many neighbours each silo masks with
            and shares with (rounded up to even; see :mod:`gptfl.secagg.graph`); None for
            the complete graph.

    Raises:
        ConfigError: a threshold below 2, or fewer neighbours than ``threshold - 1``.
    """

    threshold: int
    neighbours: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or self.threshold < 2:
            raise ConfigError(
                f"secure aggregation threshold must be an integer >= 2, got {self.threshold!r}"
            )
        if self.neighbours is not None and self.neighbours + 1 < self.threshold:
            raise ConfigError(
                f"secure aggregation neighbours {self.neighbours} cannot hold threshold "
                f"{self.threshold} shares (a silo and its neighbours hold them): need "
                f"neighbours >= {self.threshold - 1}"
            )


@dataclass(frozen=True)
class KeyAdvertisement:
    """A silo's public keys for one round, signed with its TLS certificate's key.

    Attributes:
        round: the round.
        silo_id: the silo (its certificate's CN).
        cipher_public: X25519 key the silo's envelopes are agreed with.
        mask_public: X25519 key its pairwise masks are agreed with.
        num_examples: the silo's training examples (its weight in the sum).
        certificate_pem: the silo's TLS certificate.
        signature: the certificate key's signature over all of the above
            (:func:`gptfl.secagg.authentication.signed_payload`).
    """

    round: int
    silo_id: str
    cipher_public: bytes
    mask_public: bytes
    num_examples: int
    certificate_pem: bytes
    signature: bytes


@dataclass(frozen=True)
class ShareEnvelope:
    """One silo's sealed shares for another (:mod:`gptfl.secagg.envelopes`)."""

    round: int
    sender: str
    receiver: str
    sealed: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """The coordinator's closing question: who uploaded, and who dropped after sharing.

    Attributes:
        round: the round.
        survivors: silos whose masked input was accepted (their self-mask seeds are asked).
        dropped: silos that shared keys but whose input never came (their mask keys are
            asked).
    """

    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskReply:
    """A survivor's shares for the unmasking.

    Attributes:
        round: the round.
        silo_id: the survivor.
        mask_key_shares: its share of each dropped neighbour's mask private key.
        self_mask_shares: its share of each surviving neighbour's (and its own) self-mask
            seed.
    """

    round: int
    silo_id: str
    mask_key_shares: Mapping[str, Share]
    self_mask_shares: Mapping[str, Share]


@dataclass(frozen=True)
class SecAggSettings:
    """A secure-aggregation job's settings, as every task of its rounds carries them.

    Attributes:
        threshold: see :class:`ProtocolSettings`.
        bits: the ring's width (:class:`gptfl.secagg.ring.Ring`).
        clip_range: the silo clips each update value to ``[-clip_range, clip_range]``.
        max_silos: the most silos a round sums (the quantizer's headroom).
        neighbours: see :class:`ProtocolSettings`; None for the complete graph.

    Raises:
        ConfigError: settings that do not fit together (see :meth:`check`).
    """

    threshold: int
    bits: int
    clip_range: float
    max_silos: int
    neighbours: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ConfigError unless the ring, the quantizer and the protocol can be built,
        and the rounds can hold the threshold."""
        self.quantizer()
        self.protocol()
        if self.max_silos < self.threshold:
            raise ConfigError(
                f"secure aggregation max_silos {self.max_silos} is below the threshold "
                f"{self.threshold}: no round could finish"
            )

    def protocol(self) -> ProtocolSettings:
        return ProtocolSettings(threshold=self.threshold, neighbours=self.neighbours)

    def ring(self) -> Ring:
        return Ring(self.bits)

    def quantizer(self) -> FixedPoint:
        return FixedPoint(self.ring(), self.clip_range, self.max_silos)


@dataclass(frozen=True)
class SecAggTask:
    """What a task of a secure-aggregation round carries besides the task itself.

    Which stage it belongs to is the task's kind; each stage fills its own field.

    Attributes:
        settings: the job's settings.
        advertisements: share stage: every silo's keys, as relayed.
        envelopes: masked-input (train) stage: the shares sealed to this silo.
        unmask: unmask stage: the coordinator's request.
    """

    settings: SecAggSettings
    advertisements: tuple[KeyAdvertisement, ...] = ()
    envelopes: tuple[ShareEnvelope, ...] = ()
    unmask: UnmaskRequest | None = None
