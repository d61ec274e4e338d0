"""mefbench.report.compare and .stability: the generated sentences, on hand-made tables."""

import math

import pandas as pd
import pytest
from scipy import stats

from mefbench.report.compare import compare_rows, paired, what_this_shows
from mefbench.report.stability import claims, flag_frame, outcome_rows


def _runs(values: list[float], **cols) -> pd.DataFrame:
    """Finished runs of one row, seed i with values[i] as its test bits/dim."""
    n = len(values)
    return pd.DataFrame({"seed": range(n), "status": ["finished"] * n, "final_bpd": values, "test_bpd": values,
                         **{k: [v] * n for k, v in cols.items()}})  # fmt: skip


def test_rows_that_no_interval_separates_are_not_distinguishable():
    ref = _runs([4.00, 4.10, 3.90, 4.05, 3.95])
    noisy = _runs([4.02, 4.05, 3.97, 4.12, 3.91])  # differences +0.02, −0.05, +0.07, +0.07, −0.04
    rows = compare_rows([("standard", ref), ("plu", noisy)], "standard")
    assert rows[1].diff.n == 5 and rows[1].diff.low < 0 < rows[1].diff.high
    assert rows[0].rank == rows[1].rank == (1, 2)
    sentence = what_this_shows(rows, "standard")
    assert "not distinguishable from standard at this scale: plu" in sentence.lower()
    assert "share rank 1" in sentence and "measurably" not in sentence.split("t intervals.")[1].split("No row")[0]


def test_clearly_different_rows_are_called_so_and_ranked():
    ref = _runs([4.00, 4.10, 3.90, 4.05, 3.95])
    better = _runs([3.80, 3.91, 3.69, 3.86, 3.74])  # about −0.2 for every seed
    worse = _runs([4.30, 4.41, 4.18, 4.36, 4.26])  # about +0.3
    rows = compare_rows([("standard", ref), ("emerging", better), ("butterfly", worse)], "standard")
    by = {r.label: r for r in rows}
    assert by["emerging"].rank == (1, 1) and by["standard"].rank == (2, 2) and by["butterfly"].rank == (3, 3)
    want = stats.ttest_rel(better["final_bpd"], ref["final_bpd"]).confidence_interval(0.95)
    assert (by["emerging"].diff.low, by["emerging"].diff.high) == pytest.approx((want.low, want.high))
    sentence = what_this_shows(rows, "standard")
    assert "Measurably lower (better) than standard: emerging" in sentence
    assert "Measurably higher (worse) than standard: butterfly" in sentence
    assert "emerging is measurably best" in sentence


def test_pairing_uses_common_seeds_only():
    a, b = _runs([1.0, 2.0, 3.0]), _runs([0.5, 1.5])
    d = paired(a, b)
    assert d.n == 2 and d.estimate == pytest.approx(0.5)
    lonely = compare_rows([("ref", _runs([1.0])), ("x", _runs([2.0]))], "ref")
    assert "fewer than 2 paired seeds" in what_this_shows(lonely, "ref")


def _stab(coupling: str, variant: str, lr: float, outcomes: list[str]) -> pd.DataFrame:
    """Decided runs of a stability cell: each outcome 'fine', 'blow' (spike 3×), 'worse' or 'div'."""
    rows = []
    for seed, o in enumerate(outcomes):
        rows.append({"coupling": coupling, "variant": variant, "lr": lr, "seed": seed, "num_params": 1000,
                     "status": "diverged" if o == "div" else "finished", "diverged_step": 3 if o == "div" else math.nan,
                     "initial_loss": 8.0, "worst_spike": 3.0 if o == "blow" else 1.0, "spike_step": 5,
                     "final_valid_bpd": math.nan if o == "div" else 9.0 if o == "worse" else 5.0 + 0.01 * seed,
                     "best_valid_bpd": 5.0, "final_over_initial": 9.0 / 8 if o == "worse" else 5.0 / 8,
                     "test_bpd": 5.0, "final_bpd": 5.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_claims_say_indistinguishable_when_the_counts_are_alike():
    df = pd.concat([_stab("matexp", "default", 0.01, ["fine"] * 4 + ["blow"]),
                    _stab("affine", "tanh", 0.01, ["fine"] * 4 + ["blow"])])  # fmt: skip
    (claim,) = claims(df)
    assert claim.startswith("**lr 0.01 (the paper's rate):** matexp blew up in 1/5; affine (tanh) blew up in 1/5.")
    assert "failed 1/5 vs 1/5 (Fisher's exact p = 1.00, not distinguishable)" in claim
    assert "matexp − affine (tanh) = +0.000 [+0.000, +0.000] (paired t, 5 seeds): not distinguishable." in claim


def test_claims_say_distinguishable_when_they_are_clearly_different():
    df = pd.concat([_stab("matexp", "default", 0.1, ["fine"] * 5), _stab("affine", "tanh", 0.1, ["div"] * 5),
                    _stab("affine", "exp", 0.1, ["div"] * 5)])  # fmt: skip
    (claim,) = claims(df)
    p = stats.fisher_exact([[0, 5], [5, 0]]).pvalue
    assert "affine (tanh) diverged in 5/5 (at step 3, 3, 3, 3, 3)" in claim
    assert f"failed 0/5 vs 5/5 (Fisher's exact p = {p:.2f}, distinguishable at the 5% level)" in claim
    assert "too few paired seeds" in claim  # every affine (tanh) run diverged: no final bits/dim to pair
    assert "Unbounded scale (affine (exp)) vs every bounded coupling: failed 5/5 vs 5/10" in claim


def test_outcome_rows_count_each_outcome_apart():
    df = _stab("spline", "default", 0.03, ["fine", "blow", "worse", "div", "fine"])
    flags = flag_frame(df)
    assert list(flags["diverged"]) == [False, False, False, True, False]
    assert list(flags["blow-up"]) == [False, True, False, False, False]
    assert list(flags["worse than start"]) == [False, False, True, False, False]
    assert not flag_frame(df, blow_up=4.0)["blow-up"].any()  # the cut is a parameter
    row = outcome_rows(df.assign(epochs_done=1, unfinished=0)).iloc[0]
    assert (row["diverged"]["k"], row["blow-up"]["k"], row["worse than start"]["k"]) == (1, 1, 1)
    assert row["diverged"]["n"] == 5 and row["diverged at step"] == "3"
