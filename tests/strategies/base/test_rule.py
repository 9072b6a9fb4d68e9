"""What a node is told (``NodeTask``)."""

from __future__ import annotations

from strategies import NodeTask


def test_leaving_out_neighbours_keeps_the_row_sum():
    laplacian_row = NodeTask(1, (2, 5, 7), (-0.25, -0.25, -0.25), 0.75)
    assert laplacian_row.without([5]) == NodeTask(1, (2, 7), (-0.25, -0.25), 0.5)
