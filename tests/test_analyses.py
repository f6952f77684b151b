"""engine/analyses.py: the unbiased pass@k estimator against brute-force enumeration, the benchmark means, GF curves."""

import itertools
import math

import pytest

from engine.analyses import benchmark_means, gf_curves, pass_at_k, pass_at_k_table, plot_gf_curves
from engine.gf import generalization_factor


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (7, 3, 4), (4, 4, 2)])
def test_pass_at_k_equals_enumeration(n, c, k):
    """The share of all k-subsets of the n samples that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    want = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert math.isclose(pass_at_k(n, c, k), want, rel_tol=1e-12)


def test_pass_at_k_large_n_and_bad_input():
    assert math.isclose(pass_at_k(64, 1, 64), 1.0) and math.isclose(pass_at_k(64, 1, 1), 1 / 64)
    assert math.isclose(pass_at_k(64, 10, 8), 1 - math.comb(54, 8) / math.comb(64, 8), rel_tol=1e-12)
    with pytest.raises(ValueError, match="n >= max"):
        pass_at_k(4, 1, 8)
    table = pass_at_k_table([[True, False, False, False], [False] * 4], [1, 2, 4])
    assert table == pytest.approx({1: 12.5, 2: 25.0, 4: 50.0})
    with pytest.raises(ValueError, match="same number of samples"):
        pass_at_k_table([[True], [True, False]], [1])


def test_benchmark_means_and_gf_curves(tmp_path):
    groups = {"A": "id", "B": "id", "C": "ood", "D": "none"}
    base = {"A": 50.0, "B": 40.0, "C": 30.0, "D": 20.0}
    assert benchmark_means(base, groups) == pytest.approx({"avg": 35.0, "id": 45.0, "ood": 30.0})
    scores = {"model": base,
              "dpo@10": {"A": 52.0, "B": 42.0, "C": 31.0, "D": 20.0}, "dpo@20": {"A": 54.0, "B": 44.0, "C": 33.0,
                                                                                  "D": 21.0},
              "sft@20": {"A": 60.0, "B": 50.0, "C": 29.0, "D": 20.0}, "sft@10": {"A": 55.0, "B": 45.0, "C": 30.5,
                                                                                  "D": 20.0},
              "dpo": {"A": 0.0, "B": 0.0, "C": 0.0, "D": 0.0}}
    curves = gf_curves(scores, "model", groups)
    assert list(curves) == ["dpo", "sft"] and [s for s, _ in curves["sft"]] == [10, 20]
    assert curves["dpo"][0][1] == pytest.approx(generalization_factor(2.0, 1.0))
    assert curves["sft"][1][1] == pytest.approx(-1.0)  # OOD regressed: min(G_ID, G_OOD)
    plot_gf_curves(curves, str(tmp_path / "gf.png"))
    assert (tmp_path / "gf.png").stat().st_size > 1000
