"""The solvers (kvpack.allocation.solver): a width per group within a budget."""

import pytest
import torch

from kvpack.allocation.solver import WidthTable, allocate_bits


def test_lagrangian_allocation_is_optimal_on_a_small_case():
    """Two groups, widths 0-2, errors convex in the bits: the solver finds the best split of every
    budget (checked by enumeration)."""
    errors = torch.tensor([[10.0, 4.0, 1.0], [3.0, 1.0, 0.1]], dtype=torch.float64)
    table = WidthTable((0, 1, 2), errors, torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64), 1.0)
    for budget in (0, 2, 4, 6, 8):
        (widths,) = allocate_bits([table], budget)
        best = min((errors[0, a] + errors[1, b], (a, b)) for a in range(3) for b in range(3) if 2 * (a + b) <= budget)
        assert float(errors[0, widths[0]] + errors[1, widths[1]]) == pytest.approx(float(best[0])), budget
