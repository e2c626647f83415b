"""What the coordinator holds of one silo, its masked input, looks uniformly random.

A chi-square test on the bytes of a masked input, against the uniform distribution over
the 256 byte values. The bound is the chi-square quantile that uniform bytes exceed with
probability 1e-6, so an honest mask fails this test once in a million runs; the same test on
the unmasked input fails by orders of magnitude, which shows it can tell the two apart.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import stats

from gptfl.secagg.messages import ProtocolSettings
from gptfl.secagg.quantization import FixedPoint
from gptfl.secagg.ring import Ring
from tests.unit.gptfl.secagg.protocol_driver import SILOS, Cohort, run_round, start_round

LENGTH = 200_000
_BOUND = float(stats.chi2.isf(1e-6, df=255))


def _chi_square(data: npt.NDArray[np.uint8]) -> float:
    observed = np.bincount(data, minlength=256).astype(np.float64)
    expected = len(data) / 256
    return float(((observed - expected) ** 2 / expected).sum())


def _masked_inputs(
    cohort: Cohort, bits: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    silos = list(SILOS[:4])
    ring = Ring(bits)
    quantizer = FixedPoint(ring, 1.0, len(silos))
    rng = np.random.default_rng(11)
    # Model updates are anything but uniform: small values around zero, many exactly zero.
    updates = {
        s: np.where(rng.random(LENGTH) < 0.5, 0.0, rng.normal(0, 0.01, LENGTH)) for s in silos
    }
    inputs = {s: quantizer.quantize(u) for s, u in updates.items()}
    round_ = start_round(cohort, silos, settings=ProtocolSettings(3), ring=ring, length=LENGTH)
    run_round(round_, inputs)
    return inputs, round_.masked


def test_a_masked_input_is_indistinguishable_from_uniform_bytes(cohort: Cohort) -> None:
    inputs, masked = _masked_inputs(cohort, 32)
    for silo, vector in masked.items():
        statistic = _chi_square(vector.view(np.uint8))
        assert statistic < _BOUND, f"the masked input of {silo}: chi-square {statistic:.0f}"
        assert _chi_square(inputs[silo].view(np.uint8)) > 100 * _BOUND


def test_in_a_narrower_ring_every_byte_the_ring_uses_is_uniform(cohort: Cohort) -> None:
    _, masked = _masked_inputs(cohort, 24)
    for silo, vector in masked.items():
        assert int(vector.max()) < 2**24
        used = vector.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].ravel()  # the low 3 bytes
        statistic = _chi_square(used)
        assert statistic < _BOUND, f"the masked input of {silo}: chi-square {statistic:.0f}"
