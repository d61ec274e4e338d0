import json

import pytest

from mefbench.bench import measure, run_bench
from mefbench.cli import main


def test_measure_times_each_candidate():
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    t = measure({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeats=3, warmup=1)
    assert set(t) == {"a", "b"} and calls == {"a": 4, "b": 4}


def test_accuracy_rows_meet_their_target():
    rows = run_bench(quick=True, threads=1, only=("accuracy",))
    assert [r.what.split()[0] for r in rows] == ["expm", "expm_action"]
    assert all(r.ok for r in rows), rows


def test_bench_cli_quick_writes_json(tmp_path, capsys, monkeypatch):
    import mefbench.bench as bench

    monkeypatch.setattr(bench.Setting, "times", lambda self, fns, repeats: {k: [1e-3] * repeats for k in fns})
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--only", "accuracy,action", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expm_action fwd+bwd speed-up" in printed
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 5 and data["quick"] is True
    assert {"what", "shape", "measured", "target", "unit", "ok", "note"} <= set(data["rows"][0])
    assert data["command"] == "mefbench bench --quick --threads 1 --only accuracy,action"
    assert {"platform", "processor", "cpu_count", "torch_threads"} <= set(data["machine"])
    assert {"mefbench", "torch", "python", "git_commit"} <= set(data["versions"])
    assert main(["bench", "--only", "nothing"]) == 2


def test_bench_device_errors_are_clear(capsys):
    import torch

    assert main(["bench", "--quick", "--only", "accuracy", "--device", "tpu"]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--quick", "--only", "accuracy", "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err


def test_setting_batch_and_sync_follow_the_device():
    import torch

    from mefbench.bench import Setting

    cpu = Setting(torch.device("cpu"), quick=True)
    assert cpu.batch == 16 and cpu.sync() is None
    assert Setting(torch.device("cuda"), quick=False).batch == 64


def test_paired_ratio_follows_each_repeat():
    from mefbench.bench import paired_ratio, time_interleaved

    times = {"a": [1.0, 2.0, 10.0], "b": [2.0, 4.0, 20.0]}  # the machine slows down; b stays twice a
    assert paired_ratio(times, "b", "a") == 2.0
    t = time_interleaved({"x": lambda: None, "y": lambda: None}, repeats=4, warmup=0)
    assert [len(v) for v in t.values()] == [4, 4]


def test_quick_rows_are_not_judged_against_the_full_size_targets(monkeypatch):
    """--quick runs small sizes: a speed-up of 0.7× there says nothing about the 10× target (the
    timings are stubbed: the verdict does not depend on them)."""
    import mefbench.bench as bench

    monkeypatch.setattr(bench.Setting, "times", lambda self, fns, repeats: {k: [1e-3] * repeats for k in fns})
    rows = run_bench(quick=True, threads=1, only=("action", "coupling"))
    assert rows and all(r.ok is None for r in rows)
    from mefbench.bench import QUICK, _format

    assert QUICK in _format(rows) and " NO" not in _format(rows)


def test_a_negative_overhead_is_shown_not_clamped(monkeypatch):
    """When noise makes the layer measure faster than its net alone, the row says so (no '0 %')."""
    import mefbench.bench as bench

    def fake_times(self, fns, repeats):
        return (
            {"layer": [1.0] * repeats, "net": [1.2] * repeats} if "net" in fns else {k: [1e-3] * repeats for k in fns}
        )

    monkeypatch.setattr(bench.Setting, "times", fake_times)
    rows = bench._coupling_rows(bench.Setting(__import__("torch").device("cpu"), quick=False))
    assert all(r.measured < 0 for r in rows) and all("no slower than its net" in r.note for r in rows)
    assert all(r.ok for r in rows)  # −20 % is within ≤ 15 %


def test_every_registered_layer_and_coupling_has_a_bench_row():
    from mefbench.bench import row_count
    from mefbench.layers import COUPLING, MIXING, registry_variants

    assert row_count("layers") == len(registry_variants(MIXING)) and row_count("couplings") == len(
        registry_variants(COUPLING)
    )


def test_every_part_prints_the_rows_row_count_promises(monkeypatch):
    """Every part builds and runs what it times; with the timings stubbed (the scaling part times
    its own points), only the row counts (which the asv targets rely on) and the rows' fields are
    checked."""
    import math

    import mefbench.bench as bench

    monkeypatch.setattr(bench.Setting, "times", lambda self, fns, repeats: {k: [1e-3] * repeats for k in fns})
    for part in bench.PARTS:
        rows = run_bench(quick=True, threads=1, only=(part,))
        assert len(rows) == bench.row_count(part, quick=True), part
        # a scaling fit can be refused (too few points above the per-call floor): NaN, saying why
        assert all((math.isfinite(r.measured) or "no fit" in r.note) and r.what and r.target for r in rows), part
    assert len(run_bench(quick=False, threads=1, only=("coupling",))) == bench.row_count("coupling", quick=False)


@pytest.mark.slow
def test_every_part_measures_at_quick_sizes():
    """The real measurements of every part at --quick sizes (what asv's targets track)."""
    import math

    from mefbench.bench import PARTS, row_count

    for part in PARTS:
        rows = run_bench(quick=True, threads=2, only=(part,))
        assert len(rows) == row_count(part, quick=True), part
        # a scaling fit can be refused at --quick sizes (too few points above the per-call floor): NaN, saying why
        bad = [r for r in rows if not (math.isfinite(r.measured) or "no fit" in r.note)]
        assert not bad, bad
