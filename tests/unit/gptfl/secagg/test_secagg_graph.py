"""The neighbour graph: complete, or sparse, symmetric and the same for everyone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gptfl.secagg.graph import neighbour_graph

IDS = [f"s{i}" for i in range(40)]


@given(count=st.integers(2, 40), degree=st.integers(1, 45), seed=st.binary(max_size=16))
def test_the_graph_is_symmetric_with_about_the_degree_asked(
    count: int, degree: int, seed: bytes
) -> None:
    silos = IDS[:count]
    graph = neighbour_graph(silos, degree=degree, seed=seed)
    assert set(graph) == set(silos)
    for silo, neighbours in graph.items():
        assert silo not in neighbours
        assert all(silo in graph[peer] for peer in neighbours)
        expected = min(count - 1, degree + degree % 2)  # rounded up to even, at most everyone
        assert len(neighbours) == expected
    # Everyone computes the same graph, whatever order they list the silos in.
    assert neighbour_graph(list(reversed(silos)), degree=degree, seed=seed) == graph


def test_the_seed_decides_the_graph_and_none_means_complete() -> None:
    graphs = {
        tuple(sorted(neighbour_graph(IDS, degree=4, seed=bytes([i]))["s0"])) for i in range(8)
    }
    assert len(graphs) > 1
    complete = neighbour_graph(IDS[:5], degree=None, seed=b"")
    assert all(len(n) == 4 for n in complete.values())
