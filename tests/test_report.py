"""mefbench.report: the numbers in README.md come from the fixture records, figures open."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from test_results import make_record, write_record

from mefbench.presets import PRESETS
from mefbench.report import load_published, markdown_table, paper_parameter_counts, write_report
from mefbench.results import CorruptRecordWarning


def _line(text: str, *starts: str) -> str:
    """The one markdown table row that starts with '| a | b |...'."""
    prefix = "| " + " | ".join(starts) + " |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    m1, m2 = (5.0, 1.0, 7.0, 4.0, 10), (7.0, 2.0, 9.0, 5.0, 30)
    write_record(root, "t2-s0", make_record("cpu-t2-mef", 0, 4.10, m=m1))
    write_record(root, "t2-s1", make_record("cpu-t2-mef", 1, 4.20, m=m2))
    for coupling, lr, bpds in (("affine", 0.01, (4.30, 4.50)), ("affine", 0.001, (4.60, 4.80)),
                               ("matexp", 0.001, (4.25, 4.35))):  # fmt: skip
        for seed, bpd in enumerate(bpds):
            write_record(root / "t4", f"{coupling}-lr{lr}-s{seed}", make_record(f"cpu-t4-{coupling}-lr{lr}", seed, bpd))
    write_record(root / "t4", "matexp-lr0.01-s0", make_record("cpu-t4-matexp-lr0.01", 0, 4.20))
    write_record(root / "t4", "matexp-lr0.01-s1", make_record(
        "cpu-t4-matexp-lr0.01", 1, 4.7, epochs_done=1, status="diverged",
        diverged={"epoch": 2, "step": 47, "loss": float("nan")}))  # fmt: skip
    for conv, bpds, times in (("standard", (4.40, 4.60), (10.0, 12.0)), ("plu", (4.45, 4.45), (11.0, 11.0)),
                              ("matexp", (4.30, 4.40), (20.0, 24.0))):  # fmt: skip
        for seed, (bpd, t) in enumerate(zip(bpds, times, strict=True)):
            write_record(root / "t5", f"{conv}-s{seed}", make_record(f"cpu-t5-{conv}", seed, bpd, epoch_time=t))
    write_record(root / "t5", "plu-s2", make_record("cpu-t5-plu", 2, 4.9, epochs_done=1, status="interrupted"))
    bad = root / "broken" / "record.json"
    bad.parent.mkdir()
    bad.write_text('{"status": "finished", "model": ')
    return root


@pytest.fixture(scope="module")
def report(runs_dir, tmp_path_factory) -> tuple[str, Path, list]:
    out = tmp_path_factory.mktemp("report")
    bench = out / "bench.json"
    bench.write_text(json.dumps({
        "rows": [{"what": "expm_action fwd+bwd", "shape": "16384×6×6", "measured": 1.234, "target": "< 2",
                  "unit": "ms", "ok": True, "note": "level 1"}],
        "machine": {"cpu": "test-cpu"}, "versions": {"torch": "2.13.0"}, "command": "mefbench bench --quick",
    }))  # fmt: skip
    with pytest.warns(CorruptRecordWarning) as caught:
        readme = write_report(runs_dir, out, bench_file=bench, command="mefbench report runs", samples=False)
    return readme.read_text(), out, [str(w.message) for w in caught]


def test_header_status_and_corrupt(report, runs_dir):
    text, _, warned = report
    bad = str(runs_dir / "broken" / "record.json")
    assert any(bad in w for w in warned)
    assert f"`{bad}`" in text  # listed in the report too
    assert "`mefbench report runs`" in text and f"`{runs_dir}`" in text
    assert "- Runs: 17 (" in text and "15 finished" in text and "1 diverged" in text
    status = next(line for line in text.splitlines() if line.startswith("**Status:**"))
    assert "2 of 17 runs not finished" in status
    assert "`matexp-lr0.01-s1` diverged at epoch 2, step 47" in status and "`plu-s2` interrupted after 1/4 epochs" in status
    assert "| torch | 2.13.0 |" in text and "Linux-test" in text
    assert "NOT comparable" in text


def test_table2_numbers_beside_published(report):
    text, _, _ = report
    mef = _line(text, "MEF", "3.32", "4.05", "3.73")
    assert mef.endswith("|  |")  # the published row has no value of ours
    assert _line(text, "Glow", "3.35", "4.09", "3.81")
    assert _line(text, "RealNVP", "3.49", "4.28", "3.98")
    assert _line(text, "Flow++", "3.08", "3.86", "3.69")
    assert "| published: CIFAR-10 | published: ImageNet32 | published: ImageNet64 | ours: patches16, cpu scale |" in text
    assert _line(text, "MEF (ours, this benchmark)").endswith("| 4.150 ± 0.071 |")
    detail = _line(text, "patches16, cpu scale", "cpu-t2-mef", "2", "2", "0", "0", "0, 1")
    assert "| 4.160 ± 0.071 |" in detail  # raw weights: + 0.01 in the fixture


def test_table3_counts(report):
    text, _, _ = report
    counts = paper_parameter_counts().set_index("preset")["num_params"]
    assert 37.65e6 < counts["paper-t2-mef-cifar10"] < 37.75e6  # the paper's 37.7M
    assert _line(text, "MEF", "`paper-t2-mef-cifar10`").endswith(f"({counts['paper-t2-mef-cifar10']:,}) | 37.7M |")
    assert _line(text, "Glow", "–", "not built (baseline)", "44.0M")
    assert _line(text, "Emerging", "–", "not built (baseline)", "44.7M")
    assert _line(text, "Flow++", "–", "not built (baseline)", "31.4M")
    assert f"({counts['paper-t4-affine-lr0.01']:,})" in text and f"({counts['paper-t5-plu']:,})" in text
    # configs actually run, from the records
    assert _line(text, "cpu-t5-plu", "cpu", "patches16", "plu", "matexp", "32", "1", "3", "0.01M (12,345)")


def test_table4_mean_std_and_diverged(report):
    text, _, _ = report
    assert _line(text, "affine", "0.001", "16", "2", "2", "0", "0", "4.700 ± 0.141", "see paper")
    assert _line(text, "affine", "0.01", "4", "2", "2", "0", "0", "4.400 ± 0.141", "see paper")
    assert _line(text, "matexp", "0.001", "16", "2", "2", "0", "0", "4.300 ± 0.071", "see paper")
    # the diverged seed is counted but left out of the mean
    assert _line(text, "matexp", "0.01", "4", "2", "1", "1", "0", "4.200", "see paper")


def test_table5_bpd_time_ratio(report):
    text, _, _ = report
    assert _line(text, "standard", "2", "2", "0", "0", "4.500 ± 0.141", "11.00 ± 1.41", "1.00", "cpu", "see paper")
    # the interrupted third PLU run is counted, its epoch time (10 s) is included, its bpd is not
    assert _line(text, "plu", "3", "2", "0", "1", "4.450 ± 0.000", "10.67 ± 0.58", "0.97", "cpu")
    assert _line(text, "matexp", "2", "2", "0", "0", "4.350 ± 0.071", "22.00 ± 2.83", "2.00", "cpu")


def test_table6_pooled(report):
    text, _, _ = report
    # run 1: 4 epochs × (10 calls, mean 5, std 1); run 2: 4 × (30, mean 7, std 2): pooled mean 6.5, std 2
    assert _line(text, "m", "6.500", "2.000", "9", "4", "160", "2", "see paper")
    assert _line(text, "s", "2.000", "0.500", "3", "1", "160", "2", "–")


def test_figures_and_sections(report):
    text, out, _ = report
    figs = {p.name for p in (out / "figures").glob("*.png")}
    for name in ("curves_table2.png", "curves_table4.png", "curves_table5.png", "curves_table6.png",
                 "table4_bpd_vs_lr_patches16-cpu-scale.png", "table5_epoch_time_patches16-cpu-scale.png",
                 "table6_m_patches16-cpu-scale.png"):  # fmt: skip
        assert name in figs and f"(figures/{name})" in text
        with Image.open(out / "figures" / name) as im:
            assert im.size[0] > 100
    assert not any(n.startswith("samples") for n in figs) and "Not drawn (`samples=False`)" in text
    assert _line(text, "expm_action fwd+bwd", "16384×6×6", "1.234", "ms", "< 2", "yes", "level 1")
    assert "produced by `mefbench bench --quick`" in text
    assert "Not included: no asv results directory was given." in text
    assert "## All runs" in text and "arXiv 2007.09651" in text and "check every value against the paper" in text


def test_published_json_has_source_and_no_guesses():
    pub = load_published()
    assert pub["source"]["arxiv"] == "2007.09651" and "check" in pub["note"]
    assert pub["table2"]["models"]["MEF"] == {"cifar10": 3.32, "imagenet32": 4.05, "imagenet64": 3.73}
    assert pub["table3"]["models"] == {"Glow": 44.0, "Emerging": 44.7, "Flow++": 31.4, "MEF": 37.7}
    # Tables 4-6 are not transcribed: every value is null ("see paper")
    assert all(c["mean"] is None and c["std"] is None for t in ("table4", "table5") for c in pub[t]["cells"])
    assert all(v is None for v in pub["table6"]["m"].values())


def test_empty_runs_dir(tmp_path):
    (tmp_path / "runs").mkdir()
    text = write_report(tmp_path / "runs", tmp_path / "out", samples=False).read_text()
    assert "There are no runs" in text and "- Runs: 0" in text
    assert "No runs for Table 4" in text and "| MEF | 3.32 | 4.05 | 3.73 |" in text
    text = write_report(tmp_path / "missing", tmp_path / "out2", samples=False).read_text()
    assert "does not exist" in text and "There are no runs" in text


def test_asv_section(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    asv_dir = tmp_path / "asv"
    asv_dir.mkdir()
    fake = types.ModuleType("mefbench.asv_results")
    fake.load_asv_results = lambda d: pd.DataFrame({"benchmark": ["linalg.Expm.time"], "value": [0.5]})

    def speed_table(df):  # like the real one: indexed by benchmark, the commits in attrs
        table = df.set_index("benchmark").rename(columns={"value": "vm"})
        table.attrs["commits"] = {"vm": "0123456789abcdef"}
        return table

    def no_history(df, path):
        raise ValueError("none of the key benchmarks has results")

    fake.asv_speed_table = speed_table
    fake.plot_asv_history = lambda df, path: Image.new("RGB", (10, 10)).save(path)
    monkeypatch.setitem(sys.modules, "mefbench.asv_results", fake)
    text = write_report(tmp_path / "runs", tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "| linalg.Expm.time | 0.5 |" in text and "(figures/asv_history.png)" in text
    assert "(vm: `0123456789`)" in text
    fake.plot_asv_history = no_history  # the table stays, the figure is explained
    text = write_report(tmp_path / "runs", tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "| linalg.Expm.time | 0.5 |" in text and "History figure not drawn: ValueError: none of" in text
    fake.load_asv_results = lambda d: pd.DataFrame()
    text = write_report(tmp_path / "runs", tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "Not included: no asv results in" in text
    monkeypatch.setitem(sys.modules, "mefbench.asv_results", None)  # import fails
    text = write_report(tmp_path / "runs", tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "Not included: `mefbench.asv_results` cannot be imported" in text


def test_markdown_table_escapes_and_aligns():
    text = markdown_table(pd.DataFrame({"a": ["x|y", None], "n": [1.5, float("nan")]}))
    assert text.splitlines() == ["| a | n |", "|---|---:|", "| x\\|y | 1.5 |", "| – | – |"]


@pytest.mark.slow
def test_real_run_report_with_samples(tmp_path):
    from mefbench.training import train

    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float32)
    p = PRESETS["smoke"]
    train(p.model, p.train, tmp_path / "runs" / "r", progress=False, tables=(2, 6), scale="smoke", preset="smoke")
    readme = write_report(tmp_path / "runs", tmp_path / "out", command="pytest")
    text = readme.read_text()
    assert "**Status:** all runs finished." in text and "ours: patches16, smoke scale" in text
    assert "from the best finished Table 2 run, `r` (patches16, smoke scale" in text
    for t in ("0.5", "0.7", "1"):
        path = tmp_path / "out" / "figures" / f"samples_t{t}.png"
        assert f"(figures/samples_t{t}.png)" in text
        with Image.open(path) as im:
            im.load()
            assert im.mode == "RGB" and im.size[0] >= 4 * 64
    for name in ("curves_table2.png", "curves_table6.png", "table6_m_patches16-smoke-scale.png"):
        with Image.open(tmp_path / "out" / "figures" / name) as im:
            im.load()
