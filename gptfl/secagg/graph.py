"""Who masks with and shares with whom: every pair, or SecAgg+'s sparse neighbour graph.

The complete graph is Bonawitz et al.'s: each silo masks with every other and gives each a
share of its secrets, which costs every silo work and bytes linear in the round's size. The
sparse graph is the Harary-style graph of SecAgg+ (Bell et al. 2020): the silos are put in a
random ring, ordered by a hash of a public seed and their ids, and each is joined to the
``ceil(k/2)`` silos on either side, so each has about ``k`` neighbours whatever the round's
size. The seed is the round's context, so the coordinator and every silo compute the same
graph from the same set of silos and nobody chooses it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from gptfl.secagg.encoding import frame

#: each silo's neighbours (never itself)
Graph = dict[str, frozenset[str]]


def neighbour_graph(silos: Sequence[str], *, degree: int | None, seed: bytes) -> Graph:
    """The graph over ``silos``.

    Args:
        silos: distinct silo ids.
        degree: the neighbours each silo should have (SecAgg+), rounded up to even; None,
            or a degree of ``len(silos) - 1`` or more, for the complete graph.
        seed: public bytes the random order is drawn from (the round's context).

    Returns:
        Each silo's neighbours; the graph is symmetric.

    Raises:
        ValueError: repeated ids, or a degree below 1.
    """
    if len(set(silos)) != len(silos):
        raise ValueError("silo ids in a graph must be distinct")
    if degree is not None and degree < 1:
        raise ValueError(f"a degree must be >= 1, got {degree}")
    members = sorted(silos)
    count = len(members)
    if degree is None or degree >= count - 1:
        everyone = frozenset(members)
        return {silo: everyone - {silo} for silo in members}
    order = sorted(members, key=lambda silo: hashlib.sha256(frame(seed, silo)).digest())
    reach = (degree + 1) // 2
    graph: Graph = {}
    for position, silo in enumerate(order):
        around = {order[(position + step) % count] for step in range(-reach, reach + 1)}
        graph[silo] = frozenset(around - {silo})
    return graph


def share_holders(graph: Graph, silo: str) -> frozenset[str]:
    """Who holds shares of ``silo``'s secrets: its neighbours and itself."""
    return graph[silo] | {silo}
