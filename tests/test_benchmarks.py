"""The asv plumbing: the suite imports, every benchmark is found with consistent params, and runs
once at the smallest point of its grid through setup, the benchmark methods and teardown.

Numeric parameters take their smallest value; named ones (method, conv, coupling, level, preset)
take every value, so a renamed layer or preset breaks here rather than in a long asv run. The
measurements that are themselves long (the rows of ``mefbench bench --quick`` behind
``targets.Targets``, the paper-size models behind ``model.ParameterCount``) are stubbed here: the
real ones are measured in ``tests/test_bench.py`` and ``tests/test_fidelity.py``.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import numbers
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODULES = ["linalg", "mixing", "coupling", "model", "scaling", "targets"]
PREFIXES = ("time_", "timeraw_", "peakmem_", "mem_", "track_")


def _module(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _methods(cls) -> list[str]:
    return sorted(name for name in dir(cls) if name.startswith(PREFIXES) and callable(getattr(cls, name)))


def _classes(module) -> list[type]:
    return [
        cls
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__ and not name.startswith("_") and _methods(cls)
    ]


def _small_points(cls) -> list[tuple]:
    axes = []
    for values in getattr(cls, "params", []):
        if all(isinstance(v, numbers.Number) for v in values):
            axes.append([min(values)])
        else:
            axes.append(list(values))
    return list(itertools.product(*axes))


def _cases() -> list:
    cases = []
    for name in MODULES:
        for cls in _classes(_module(name)):
            for point in _small_points(cls):
                cases.append(pytest.param(name, cls.__name__, point, id=f"{name}.{cls.__name__}{list(point)}"))
    return cases


def _stub_bench(monkeypatch) -> list[tuple]:
    """targets.Targets measures through mefbench.bench.run_bench: stub it with as many rows as the
    bench's grids say (mefbench.bench.row_count), each measuring its own index; returns the calls."""
    from mefbench.bench import Row, row_count

    targets = _module("targets")
    calls = []

    def run_bench(quick: bool, threads: int, only: tuple[str, ...]) -> list:
        calls.append((quick, threads, only))
        (part,) = only
        return [Row(f"{part} row {i}", "", float(i), "report", "", None) for i in range(row_count(part, quick))]

    monkeypatch.setattr(targets, "run_bench", run_bench)
    monkeypatch.setattr(targets, "_MEASURED", {})
    return calls


def _stub_models(monkeypatch) -> None:
    """model.ParameterCount builds paper-size models (tens of millions of parameters): count those
    of a small stand-in instead (the counts themselves are checked in test_fidelity.py)."""
    monkeypatch.setattr(_module("model"), "MultiScaleFlow", lambda config: torch.nn.Linear(config.image_shape[0], 1))


STUBS = {"targets.Targets": _stub_bench, "model.ParameterCount": _stub_models}


def test_every_module_has_benchmarks():
    for name in MODULES:
        classes = _classes(_module(name))
        assert classes, f"benchmarks/{name}.py defines no benchmark class"
        for cls in classes:
            params = getattr(cls, "params", [])
            names = getattr(cls, "param_names", [])
            assert len(params) == len(names), f"{cls.__name__}: params and param_names differ in length"
            for method in _methods(cls):
                if method.startswith("track_"):
                    assert getattr(getattr(cls, method), "unit", None), f"{cls.__name__}.{method} has no unit"


@pytest.mark.parametrize(("module", "cls_name", "point"), _cases())
def test_benchmark_runs(module: str, cls_name: str, point: tuple, monkeypatch):
    if f"{module}.{cls_name}" in STUBS:
        STUBS[f"{module}.{cls_name}"](monkeypatch)
    cls = getattr(_module(module), cls_name)
    bench = cls()
    if hasattr(bench, "setup"):
        bench.setup(*point)
        assert torch.get_default_dtype() == torch.float32, "benchmarks run in float32"
    try:
        for method in _methods(cls):
            result = getattr(bench, method)(*point)
            if method.startswith("track_"):
                assert isinstance(result, numbers.Real) and math.isfinite(result), f"{method} returned {result!r}"
    finally:
        if hasattr(bench, "teardown"):
            bench.teardown(*point)


def test_targets_track_every_quick_bench_row(monkeypatch):
    from mefbench.bench import DEFAULT_PARTS, row_count

    targets = _module("targets")
    calls = _stub_bench(monkeypatch)
    assert targets.ROWS_PER_PART == {part: row_count(part, quick=True) for part in DEFAULT_PARTS}
    assert targets.Targets.params == [list(DEFAULT_PARTS), list(range(max(targets.ROWS_PER_PART.values())))]
    for part, rows in targets.ROWS_PER_PART.items():
        for row in range(len(targets.Targets.params[1])):
            bench = targets.Targets()
            if row >= rows:  # beyond the part's rows: asv skips the point
                with pytest.raises(NotImplementedError, match=f"has {rows} rows"):
                    bench.setup(part, row)
                continue
            bench.setup(part, row)
            assert bench.row.what == f"{part} row {row}" and bench.track_measured(part, row) == float(row)
    # each part measured once, at --quick sizes with the bench's 2 threads, whatever the points
    assert calls == [(True, 2, (part,)) for part in DEFAULT_PARTS]


def test_targets_refuse_a_part_that_prints_other_rows_than_promised(monkeypatch):
    targets = _module("targets")
    _stub_bench(monkeypatch)
    monkeypatch.setitem(targets.ROWS_PER_PART, "accuracy", targets.ROWS_PER_PART["accuracy"] + 1)
    with pytest.raises(RuntimeError, match="printed 2 rows; ROWS_PER_PART says 3"):
        targets.Targets().setup("accuracy", 0)


def test_slow_gradient_cases_are_skipped():
    linalg = _module("linalg")
    for method, n, batch in linalg.SLOW_GRAD:
        with pytest.raises(NotImplementedError):
            linalg.ExpmGrad().setup(method, n, batch)
    linalg.Expm().setup("torch", 6, 1)  # forward is not skipped


def test_global_series_matches_torch():
    linalg = _module("linalg")
    X = torch.randn(5, 6, 6, dtype=torch.float64) * 2
    torch.testing.assert_close(linalg.global_series_expm(X, tol=1e-16), torch.linalg.matrix_exp(X))


def test_short_training_is_reproducible():
    model = _module("model")
    a = model.short_training_bpd(steps=2, test_images=16)
    b = model.short_training_bpd(steps=2, test_images=16)
    assert a == b and 0 < a < 16


@pytest.mark.slow
def test_parameter_count_of_the_paper_model():
    bench = _module("model").ParameterCount()
    bench.setup("paper-t2-mef-cifar10")
    assert bench.track_parameters("paper-t2-mef-cifar10") == 37_683_752  # the official code's count


def test_asv_conf_keeps_the_torch_pin():
    conf = json.loads((ROOT / "asv.conf.json").read_text())
    assert conf["environment_type"] == "virtualenv"
    assert conf["repo"] == "." and conf["branches"] == ["main"]
    assert conf["matrix"]["req"]["torch"] == ["2.13.0"]
    assert "torch==2.13.0" in conf["install_command"][0]
    assert all("--force-reinstall" not in c or "--no-deps" in c for c in conf["install_command"])
    assert all("--no-deps" in c for c in conf["build_command"])
    for key in ("env_dir", "results_dir", "html_dir"):
        assert conf[key].startswith(".asv/")
    assert conf["benchmark_dir"] == "benchmarks"


def test_scaling_twin_skips_points_beyond_the_work_cap():
    scaling = _module("scaling")
    assert set(scaling.LAYERS) == {f"{k} {n}" for k, n, _ in __import__("mefbench.scaling").scaling.layers()}
    with pytest.raises(NotImplementedError, match="stated cost"):
        scaling.Scaling().setup("mixing periodic", 192, 64)  # C³·n = 2.9e9 per sample, × batch 8
