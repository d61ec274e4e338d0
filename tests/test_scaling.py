"""mefbench.scaling: stated costs read as formulas, exponents fitted, caps honoured, the bench part,
its JSON and the report's scaling table and figure."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import sympy

import mefbench.scaling as S
from mefbench.layers import Cost
from mefbench.layers.base import LayerInfo

C, n = sympy.symbols("C n")


def test_every_registered_layer_states_a_cost_that_reads_as_a_formula_in_c_and_n():
    """A layer whose cost names a symbol without a value (or does not parse) fails here, naming it."""
    for kind, name, cls in S.layers():
        for part in S.PARTS:
            values = S.expected_cost(cls.info.cost, part)(np.array([12.0, 192.0]), np.array([64.0, 4096.0]))
            assert np.all(np.isfinite(values)) and values[1] > values[0], (kind, name, part)


@pytest.mark.parametrize(
    ("text", "symbols", "expected"),
    [
        ("O(C³ + C²·n)", {}, C**3 + C**2 * n),
        ("net + O(c·n)", {}, C * n / 2),  # the net is left out; c = C/2
        ("O(L·D), D = C·n", {"L": "2"}, 2 * C * n),  # a trailing definition; the layer's symbol wins
        ("O(K·C² + C²·n)", {"K": "C"}, C**3 + C**2 * n),
        ("O(C²·n + C·n·log n)", {}, C**2 * n + C * n * sympy.log(n)),
        ("O(k²·C²·n) in (r + 1)(H − 1) + W sequential steps", {}, 9 * C**2 * n),  # the remark is left out
        ("O(1)", {}, sympy.Integer(1)),
        ("0", {}, sympy.Integer(0)),
    ],
)
def test_a_cost_reads_as_a_formula(text, symbols, expected):
    assert sympy.simplify(S.cost_expression(text, symbols) - expected) == 0


def test_a_cost_that_cannot_be_read_says_why():
    with pytest.raises(ValueError, match="names q without a value"):
        S.cost_expression("O(q·C·n)")
    with pytest.raises(ValueError, match="has no O"):
        S.cost_expression("linear")
    with pytest.raises(ValueError, match="unbalanced"):
        S.cost_expression("O(C·(n")


def test_fit_recovers_known_exponents_with_an_interval_that_holds_them():
    rng = np.random.default_rng(0)
    grid = [(c, h * h) for c in S.GRID.channels for h in S.GRID.sizes]
    Cs, ns = np.array(grid, float).T
    t = 1e-9 * Cs**2 * ns * np.exp(rng.normal(0, 0.05, len(Cs)))
    (a, b), (se_a, se_b), dof = S.fit_exponents(Cs, ns, t)
    assert dof == len(t) - 3 and abs(a - 2) < 0.05 and abs(b - 1) < 0.05
    assert abs(a - 2) < 3 * se_a and abs(b - 1) < 3 * se_b


def _points(layer: str, time) -> list[S.Point]:
    points = []
    for c, h in S.GRID.points():
        p = S.Point("mixing", layer, "fwd+bwd", c, h, h * h, time_s=float(time(c, h * h)), repeats=3)
        points.append(p)
    return points


def test_fit_layer_judges_against_the_stated_cost_on_the_points_above_the_floor():
    stated = Cost("O(C²·n)", "O(C)", "O(C²·n)")
    # a fixed per-call cost of 1 ms plus C²·n work: the floor leaves the small points out
    agree = S.fit_layer(_points("x", lambda c, m: 1e-3 + 1e-9 * c**2 * m), stated, "stated")
    assert agree.problem is None and agree.points_fitted < agree.points_measured == 20
    assert not agree.C.disagrees and not agree.n.disagrees
    assert agree.C.expected == pytest.approx(2, abs=0.01) and agree.n.expected == pytest.approx(1, abs=0.01)
    assert agree.C.low < agree.C.value < agree.C.high
    # time growing as C³·n against a stated C²·n: the C exponent disagrees, the n exponent does not
    worse = S.fit_layer(_points("y", lambda c, m: 1e-11 * c**3 * m), stated, "stated")
    assert worse.C.disagrees and not worse.n.disagrees and worse.C.value == pytest.approx(3, abs=0.01)
    # flat time: the per-call cost dominates everywhere, no fit
    flat = S.fit_layer(_points("z", lambda c, m: 1e-3), stated, "stated")
    assert flat.C is None and "per-call cost dominates" in flat.problem
    assert json.loads(json.dumps(worse.to_dict()))["C"]["disagrees"] is True


TINY = S.Grid(channels=(4, 8), sizes=(4, 8), batch=1, time_cap=10.0, repeats=1, layer_budget=60.0)


@pytest.mark.parametrize(("kind", "name"), [("mixing", "standard"), ("coupling", "matexp")])
def test_measure_layer_times_every_point_and_part(kind, name):
    points = S.measure_layer(kind, name, TINY)
    assert len(points) == len(TINY.points()) * len(S.PARTS)
    assert {p.part for p in points} == set(S.PARTS)
    assert all(p.time_s is not None and p.time_s > 0 and p.repeats == 1 and p.skipped is None for p in points)


def test_caps_end_a_layer_at_every_larger_point_and_say_why(monkeypatch):
    over = S.Grid(channels=(4, 8), sizes=(4, 8), batch=1, time_cap=1e-12, repeats=1, layer_budget=60.0)
    points = S.measure_layer("mixing", "standard", over)
    first = [p for p in points if (p.C, p.H) == (4, 4)]
    assert all(p.time_s is None and "over 5× the 1e-12 s cap" in p.skipped for p in first)
    rest = [p for p in points if (p.C, p.H) != (4, 4)]
    assert rest and all(p.time_s is None and "beyond the 1e-12 s time cap at C=4, 4×4" in p.skipped for p in rest)
    monkeypatch.setattr(S, "WORK_CAP", 1.0)
    capped = S.measure_layer("mixing", "standard", TINY)
    assert all(p.time_s is None and "work cap" in p.skipped for p in capped)
    monkeypatch.undo()
    spent = S.measure_layer("mixing", "standard", S.Grid((4, 8), (4, 8), 1, 10.0, 1, layer_budget=0.0))
    assert all(p.time_s is not None for p in spent[:2])  # the first point: nothing spent yet
    assert all(p.skipped == "the layer's 0 s budget was spent" for p in spent[2:])


def test_a_point_where_the_layer_cannot_be_built_is_skipped_alone():
    # emerging's 3×3 kernel does not fit a 1×1 image; the 4×4 points are measured
    grid = S.Grid(channels=(4,), sizes=(1, 4), batch=1, time_cap=10.0, repeats=1, layer_budget=60.0)
    points = S.measure_layer("mixing", "emerging", grid)
    assert all(p.skipped.startswith("not built:") for p in points if p.H == 1)
    assert all(p.time_s is not None for p in points if p.H == 4)


def test_bench_scaling_part_rows_json_and_report(monkeypatch, tmp_path, capsys):
    """`mefbench bench --scaling --json`: two rows per layer and timed call, each with its data;
    the report turns them into the scaling table and its figures."""
    from mefbench.bench import _parts, row_count
    from mefbench.cli import main
    from mefbench.report.tables import TABLES, render_table

    assert _parts(None, True)[-1] == "scaling" and _parts("model", True) == ("model", "scaling")
    assert "scaling" not in _parts(None, False) and _parts("scaling", False) == ("scaling",)
    monkeypatch.setattr(
        S, "QUICK_GRID", S.Grid(channels=(4, 8), sizes=(4, 8), batch=1, time_cap=10.0, repeats=1, layer_budget=60.0)
    )
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--only", "scaling", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "--only scaling" in data["command"]
    rows = data["rows"]
    assert len(rows) == row_count("scaling") == 4 * len(S.layers())
    assert all(r["ok"] is None for r in rows)  # --quick sizes are not judged
    assert all("scaling" in r["data"] and len(r["data"]["scaling"]["points"]) == 4 for r in rows)
    printed = capsys.readouterr().out
    assert "scaling coupling matexp: inverse time ∝ n^a" in printed

    lines = render_table(TABLES["scaling"], None, None, {}, tmp_path, data)
    text = "\n".join(lines)
    table = [line for line in text.splitlines() if line.startswith("| mixing | standard | fwd+bwd |")]
    assert len(table) == 1 and ("not judged (--quick)" in table[0] or "no fit:" in table[0])
    assert sum(line.startswith(("| mixing |", "| coupling |")) for line in text.splitlines()) == 2 * len(S.layers())
    assert "(figures/scaling_fwd-bwd.png)" in text and (tmp_path / "scaling_inverse.png").stat().st_size > 1000
    empty = "\n".join(render_table(TABLES["scaling"], None, None, {}, tmp_path, {"rows": []}))
    assert "Not included" in empty


def test_the_report_names_the_layers_whose_measured_exponents_disagree(tmp_path):
    """Full-size rows (judged), built as the bench part builds them from measured points: a layer
    whose time grows as C³·n against a stated C²·n is named, one that follows its cost is not."""
    import torch

    from mefbench.bench import Setting, _scaling_part_rows
    from mefbench.report.tables import TABLES, render_table

    setting = Setting(torch.device("cpu"), quick=False)
    stated = Cost("O(C²·n)", "O(C)", "O(C²·n)")
    rows = []
    for layer, time in (("follows", lambda c, m: 1e-3 + 1e-9 * c**2 * m), ("grows", lambda c, m: 1e-11 * c**3 * m)):
        points = _points(layer, time)
        rows += _scaling_part_rows("mixing", layer, stated, "fwd+bwd", points, S.GRID, "grid", setting)
    assert [r.ok for r in rows] == [True, True, False, True]  # grows: C disagrees, n agrees
    data = {"rows": [dataclasses.asdict(r) for r in rows], "quick": False, "command": "mefbench bench --scaling"}
    text = "\n".join(render_table(TABLES["scaling"], None, None, {}, tmp_path, data))
    assert "wholly outside expected ± 0.3): grows fwd+bwd." in text
    assert "| mixing | grows | fwd+bwd |" in text and text.count("| disagrees |") == 1


def test_a_layer_info_whose_cost_has_symbols_stays_hashable():
    a = LayerInfo("per-pixel", "ref", Cost("O(K·C²)", "O(1)", "O(K·C²)", symbols={"K": "C"}))
    assert hash(a) == hash(LayerInfo("per-pixel", "ref", Cost("O(K·C²)", "O(1)", "O(K·C²)", symbols={"K": "C"})))
