"""The Generalization Factor on hand-computed cases, and its definition for zero and negative gains."""

import math

import pytest

from engine.gf import generalization_factor, group_gain


@pytest.mark.parametrize("g_id, g_ood, want", [
    (10.0, 10.0, 10.0),                      # equal gains: GF is that gain
    (4.0, 1.0, 5 * 4 * 1 / (4 * 4 + 1)),     # 20/17: an ID-only gain is worth little
    (1.0, 4.0, 5 * 1 * 4 / (4 * 1 + 4)),     # 2.5: the same gains the other way round count more
    (2.0, 3.0, 5 * 6 / (8 + 3)),             # 30/11
])
def test_formula(g_id, g_ood, want):
    assert math.isclose(generalization_factor(g_id, g_ood), want, rel_tol=1e-12)


def test_beta_one_is_the_harmonic_mean():
    assert math.isclose(generalization_factor(2.0, 6.0, beta=1.0), 2 * 2 * 6 / 8)


@pytest.mark.parametrize("g_id, g_ood, want", [(0.0, 5.0, 0.0), (5.0, 0.0, 0.0), (5.0, -1.0, -1.0),
                                               (-2.0, 3.0, -2.0), (-2.0, -3.0, -3.0), (0.0, 0.0, 0.0)])
def test_zero_or_negative_gain_gives_the_smaller_gain(g_id, g_ood, want):
    assert generalization_factor(g_id, g_ood) == want


def test_continuous_at_zero():
    assert generalization_factor(5.0, 1e-9) < 1e-8 and generalization_factor(1e-9, 5.0) < 1e-8


def test_group_gain_and_errors():
    base = {"a": 10.0, "b": 20.0, "c": 30.0}
    model = {"a": 12.0, "b": 26.0, "c": 29.0}
    assert group_gain(model, base, ["a", "b"]) == 4.0 and group_gain(model, base, ["c"]) == -1.0
    with pytest.raises(ValueError, match=r"no score for \['d'\]"):
        group_gain(model, base, ["a", "d"])
    with pytest.raises(ValueError, match="group is empty"):
        group_gain(model, base, [])
    with pytest.raises(ValueError, match="beta"):
        generalization_factor(1.0, 1.0, beta=0.0)
