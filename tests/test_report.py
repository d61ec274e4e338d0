"""mefbench.report: the numbers in README.md come from the fixture records, figures open, nothing
recorded is destroyed."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from scipy import stats
from test_results import make_record, write_record

from mefbench.data import split_sizes
from mefbench.layers import COUPLING, MIXING, registry_variants
from mefbench.models import MODEL_REVISION
from mefbench.presets import PRESETS, STABILITY_COUPLINGS, STABILITY_LRS
from mefbench.record import RunRecord
from mefbench.report import MANIFEST, TABLES, load_published, markdown_table, paper_parameter_counts, write_report
from mefbench.report.tables import paper_count_presets
from mefbench.results import CorruptRecordWarning
from mefbench.sweep import plan


def _line(text: str, *starts: str) -> str:
    """The one markdown table row that starts with '| a | b |...'."""
    prefix = "| " + " | ".join(starts) + " |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _group(section: str, group: str = "patches16, cpu scale") -> str:
    """The part of a table's section for one data group ("Runs on <group>:" up to the next group)."""
    start = section.index(f"Runs on {group}:")
    ends = [e for e in (section.find("Runs on ", start + 1), section.find("\nPublished (", start)) if e > 0]
    return section[start : min(ends) if ends else None]


def record(
    preset: str, seed: int, bpd: float, *, revision: int = MODEL_REVISION, final: dict | None = None, **kw
) -> dict:
    """A record of today's schema for the preset, with the tables and cells a sweep gives it (a
    run shared by several presets lists all their tables), at the given model revision."""
    rec = RunRecord.from_dict(json.loads(json.dumps(make_record(preset, seed, bpd, **kw)))).to_dict()
    p = PRESETS[preset]
    spec = next(s for s in plan(tuple(TABLES), p.scale, seeds=1) if preset in s.presets)
    rec.update(model_revision=revision, model=json.loads(p.model.to_json()), tables=list(spec.tables), cells=spec.cells)
    if final and rec.get("final"):
        rec["final"].update(final)
    return rec


def stability_record(preset: str, seed: int, outcome: str) -> dict:
    """A stability run with per-epoch loss summaries and validation bits/dim: initial loss 8, initial
    validation 8; "fine" falls to 5, "blow-up" spikes to 20 at step 33 and recovers, "worse" ends
    at 9, "diverged" becomes non-finite at step 12 after a first epoch (loss max 9 at step 5)."""
    status = "diverged" if outcome == "diverged" else "finished"
    rec = record(preset, seed, 5.0, status=status, epochs_done=1 if status == "diverged" else 2,
                 diverged={"epoch": 2, "step": 12, "loss": float("inf"), "loss_first": 7.0, "loss_max": 7.5,
                           "loss_max_step": 11} if status == "diverged" else None)  # fmt: skip
    finals = {"fine": 5.0, "blow-up": 6.0, "worse": 9.0, "diverged": 7.0}
    for e in rec["epochs"]:
        first = 8.0 if e["epoch"] == 1 else 6.0
        peak = 20.0 if outcome == "blow-up" and e["epoch"] == 2 else 9.0 if outcome == "diverged" else first
        e.update(loss_first=first, loss_max=peak, loss_max_step=33 if peak == 20.0 else 5 if peak == 9.0 else
                 (e["epoch"] - 1) * 30 + 1, valid_bpd=finals[outcome] + (0.5 if e["epoch"] == 1 else 0.0))  # fmt: skip
    rec["initial_valid_bpd"] = 8.0
    return rec


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    m1, m2 = (5.0, 1.0, 7.0, 4.0, 10), (7.0, 2.0, 9.0, 5.0, 30)
    # MEF at lr 0.01: one run each for Table 2, Table 4's cell, Table 5's row, Table 6 and its mixing row
    mef0 = record("cpu-t2-mef", 0, 4.10, m=m1, epoch_time=20.0)
    mef0["stop"] = {"reason": "plateau", "epoch": 4, "step": 120, "best_epoch": 2, "best_valid_bpd": 4.5}
    mef0["final"].update(test_bpd_full=4.05, test_images_full=2448)  # the whole test split: the tables' number
    write_record(root, "mef-s0", mef0)
    write_record(root, "mef-s1", record("cpu-t2-mef", 1, 4.20, m=m2, epoch_time=24.0))
    write_record(root, "mef-s2", record("cpu-t2-mef", 2, 4.7, epoch_time=22.0, epochs_done=1, status="diverged",
                                        diverged={"epoch": 2, "step": 47, "loss": float("nan")}))  # fmt: skip
    for coupling, lr, bpds in (("affine", 0.01, (4.30, 4.50)), ("affine", 0.001, (4.60, 4.80)),
                               ("matexp", 0.001, (4.25, 4.35))):  # fmt: skip
        for seed, bpd in enumerate(bpds):
            write_record(root / "t4", f"{coupling}-lr{lr}-s{seed}", record(f"cpu-t4-{coupling}-lr{lr}", seed, bpd))
    for conv, bpds, times in (("standard", (4.40, 4.60), (10.0, 12.0)), ("plu", (4.45, 4.45), (11.0, 11.0))):
        for seed, (bpd, t) in enumerate(zip(bpds, times, strict=True)):
            write_record(root / "t5", f"{conv}-s{seed}", record(f"cpu-t5-{conv}", seed, bpd, epoch_time=t))
    write_record(root / "t5", "plu-s2", record("cpu-t5-plu", 2, 4.9, epochs_done=1, status="interrupted"))
    # the same preset and seed again from another sweep: one seed, not two
    again = record("cpu-t5-standard", 0, 9.99, epoch_time=99.0)
    again["updated_at"] = "2025-01-01T00:00:00+00:00"  # the older of the two: the newer one is kept
    write_record(root / "again", "standard-s0", again)
    # a run of the older model revision: grouped apart, never averaged with today's
    write_record(root / "old", "mef-old", make_record("cpu-t2-mef", 2, 3.00))  # schema 1: revision 1
    # the zoo tables: two mixing layers and a coupling's stability over two rates
    mixing_final = {"sample_time_per_image_s": 0.002, "roundtrip_error": 3e-6, "peak_memory_bytes": 2**21}
    write_record(root / "mix", "emerging-s0", record("cpu-mix-emerging", 0, 4.5, epoch_time=15.0, final=mixing_final))
    write_record(root / "mix", "emerging-s1", record("cpu-mix-emerging", 1, 4.7, epoch_time=17.0, final=mixing_final))
    # the stability benchmark: matexp and affine (tanh) at lr 0.001 (all fine) and lr 0.1, where matexp
    # has one fine run, one blow-up (a loss 2.5 × its initial one) and one divergence (step 12), and
    # affine (tanh) two fine runs and one that ends worse than it started (valid 9.0 > 8.0)
    for coupling, lr, runs in (
        ("matexp", 0.001, ("fine", "fine", "fine")), ("affine-tanh", 0.001, ("fine", "fine", "fine")),
        ("matexp", 0.1, ("fine", "blow-up", "diverged")), ("affine-tanh", 0.1, ("worse", "fine", "fine")),
        ("matexp", 0.01, ("fine", "blow-up")),
    ):  # fmt: skip
        for seed, outcome in enumerate(runs):
            write_record(root / "stab", f"{coupling}-lr{lr}-s{seed}", stability_record(
                f"cpu-stab-{coupling}-lr{lr}", seed, outcome))  # fmt: skip
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


def test_header_status_duplicates_and_corrupt(report, runs_dir):
    text, out, warned = report
    bad = str(runs_dir / "broken" / "record.json")
    assert any(bad in w for w in warned)
    assert f"`{bad}`" in text  # listed in the report too
    assert "`mefbench report runs`" in text and f"`{runs_dir}`" in text
    # 33 records: one unreadable, the duplicate counted once
    assert "- Runs: 31 (" in text and "2 diverged" in text
    sizes = split_sizes("patches16")
    assert f"- Data `patches16`: train {sizes['train']['images']:,} tiles of 5 photographs (astronaut," in text
    assert f"test {sizes['test']['images']:,} tiles of 3 photographs (chelsea, coffee, immunohistochemistry)" in text
    assert (
        "- Time: runs recorded from 2026-01-01T00:00+00:00 to 2026-01-01T01:00+00:00 (1.00 h, pauses included)" in text
    )
    status = next(line for line in text.splitlines() if line.startswith("**Status:**"))
    assert "`mef-s2` diverged at epoch 2, step 47" in status and "`plu-s2` interrupted after 1/10 epochs" in status
    dup = text[text.index("**Duplicates") :].splitlines()[2]
    assert "(preset `cpu-t5-standard`, seed 0)" in dup and "`standard-s0`" in dup
    assert "**Older model revisions:** 1 runs" in text
    assert "| torch | 2.13.0 |" in text and "Linux-test" in text and "NOT comparable" in text
    # only its own files are written (the bench file it read stays), no temporary is left
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "README.md", "bench.json", "figures"]


def _ci(a: list[float], b: list[float]) -> str:
    """The difference column for rows a and b paired by seed, from scipy."""
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    mean = sum(a) / len(a) - sum(b) / len(b)
    return f"{mean:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"


def test_table2_published_apart_and_ours(report):
    text, _, _ = report
    t2 = _section(text, "Table 2")
    published = t2[: t2.index("Runs on")]
    assert _line(published, "MEF", "3.32 (unverified)", "4.05 (unverified)", "3.73 (unverified)")
    assert "*(unverified)*: not checked against the paper" in published
    ours = _line(_group(t2), "cpu-t2-mef", "3", "2", "1", "0", "0, 1")
    # stopped: one run recorded its plateau, the schema-1 one did not; EMA: the whole-test-split number
    # of seed 0 (4.05) and seed 1's last epoch (4.20); raw: each epoch's subset (+ 0.01 in the fixture)
    assert "| plateau 1/2 (steps 120); not recorded 1/2 | 4.125 ± 0.106 | 4.160 ± 0.071 |" in ours
    assert "3.32" not in _group(t2)  # never beside a published number
    old = _line(_group(t2, "patches16, cpu scale, model revision 1"), "cpu-t2-mef", "1", "1")
    assert "| 3.000 |" in old  # the old revision's run stands apart, never in today's mean


def test_table3_counts_from_the_presets_and_the_matcher(report):
    text, _, _ = report
    counts = paper_parameter_counts().set_index("preset")["num_params"]
    assert list(counts.index) == [name for _, name in paper_count_presets()]
    assert counts["paper-t2-mef-cifar10"] == 37_683_752  # the official code's count
    t3 = _section(text, "Table 3")
    assert _line(t3, "MEF", "`paper-t2-mef-cifar10`").endswith("(37,683,752) | 37.7 (unverified) |")
    assert _line(t3, "Glow", "–", "not built (baseline)", "44.0 (unverified)")
    assert f"({counts['paper-t5-plu']:,})" in t3 and counts["paper-t5-plu"] == 37_691_816
    assert _line(t3, "affine", "132", "37.76M (37,756,808)", "1.0019")  # the matcher picks the paper's width
    hidden = PRESETS["cpu-t5-plu"].model.hidden_channels
    assert _line(t3, "cpu-t5-plu", "cpu", "patches16", "plu", "matexp", str(hidden), "1", "3", "0.01M (12,345)")


def test_table4_paired_differences_ranks_and_sentence(report):
    t4 = _group(_section(report[0], "Table 4"))
    ref = [4.05, 4.20]  # matexp at lr 0.01, seeds 0 and 1 (seed 2 diverged)
    aff = _line(t4, "affine", "0.01")
    assert "| 2 | 2 | 0 | 0 | 2/2 | not recorded 2/2 | 4.400 ± 0.141 |" in aff
    # rank 1–3: affine at 1e-3 (4.60, 4.80) is 0.30 worse for both seeds, measurably; no row is measurably better
    assert f"| {_ci([4.30, 4.50], ref)} | 1–3 |" in aff
    assert _line(t4, "matexp", "0.01").endswith("| 3 | 2 | 1 | 0 | 2/3 | plateau 1/2 (steps 120); not recorded 1/2 "
                                                 "| 4.125 ± 0.106 | reference | 1–3 |")  # fmt: skip
    assert "params / matexp, lr 0.01" in t4 and "| 1.000 |" in aff
    sentence = next(line for line in t4.splitlines() if line.startswith("**What this shows:**"))
    assert f"at lr 0.01, affine − matexp = {_ci([4.30, 4.50], ref)}: not distinguishable at this scale" in sentence
    assert f"matexp at lr 0.001 − at lr 0.01 = {_ci([4.25, 4.35], ref)}" in sentence
    published = _section(report[0], "Table 4")
    assert "Published (the paper's Table 4" in published and "| affine | 0.001 | 200 | not transcribed |" in published


def test_table5_time_ratio_interval_and_sentence(report):
    t5 = _group(_section(report[0], "Table 5"))
    # the duplicate standard-s0 (9.99 bits/dim, 99 s) is not a third seed
    std = _line(t5, "standard", "default")
    assert "| 4.500 ± 0.141 | reference | " in std and "| 11.00 ± 1.41 | reference |" in std
    # the interrupted third PLU run is counted, its epoch time (10 s) is included, its bpd is not
    plu = _line(t5, "plu", "free")
    assert "| 3 | 2 | 0 | 1 | 2/3 |" in plu and "| 4.450 ± 0.000 |" in plu
    ratio = stats.ttest_1samp([math.log(11 / 10), math.log(11 / 12)], 0).confidence_interval(0.95)
    gm = math.exp((math.log(11 / 10) + math.log(11 / 12)) / 2)
    assert f"| 10.67 ± 0.58 | {gm:.2f} [{math.exp(ratio.low):.2f}, {math.exp(ratio.high):.2f}] |" in plu
    sentence = next(line for line in t5.splitlines() if line.startswith("**What this shows:**"))
    assert "paired over 2 seeds" in sentence and "distinguishable from standard at this scale: plu" in sentence
    assert "timed one after another on one machine" in t5


def test_table6_pooled(report):
    t6 = _group(_section(report[0], "Table 6"))
    # 4 epochs × (10 calls, mean 5, std 1), 4 × (30, mean 7, std 2) and 1 × (100, mean 6, std 1): pooled
    # mean 1640/260, second moment 11100/260
    assert _line(t6, "m", "6.308", "1.705", "9", "4", "260", "3", "see paper")
    assert _line(t6, "s", "2.000", "0.500", "3", "1", "260", "3", "–")


def test_mixing_table(report):
    section = _section(report[0], "Every mixing layer")
    mixing = _group(section)
    row = _line(mixing, "emerging", "default", "spatial", "0.01M (12,345)", "1.000", "2", "2", "0", "0", "2/2")
    cells = row.split(" | ")
    assert "4.600 ± 0.141" in cells and "16.00 ± 1.41" in cells  # bits/dim, s/epoch
    assert row.endswith("| 2.000 ± 0.000 | 3.0e-06 | 2.0 ± 0.0 |")  # ms/image, round trip, MiB
    assert "peak memory (MiB)" in mixing and "(MB)" not in mixing
    assert "3.34" not in mixing  # the published numbers have their own table
    assert _line(section, "emerging", "all", "3.34 (unverified)")
    # the three Table 5 convs are rows of it: their runs are shared
    assert _line(mixing, "standard", "default", "per-pixel")
    assert "**What this shows:**" in mixing


def test_stability_outcomes_sensitivity_and_claims(report):
    stab = _group(_section(report[0], "Stability"))
    fine = _line(stab, "affine", "tanh", "0.001")
    assert "| 0/3 [0.00–0.56] | 0/3 [0.00–0.56] | 0/3 [0.00–0.56] |" in fine
    mat = _line(stab, "matexp", "default", "0.1")
    assert "| 1/3 [0.06–0.79] | 1/3 [0.06–0.79] | 0/3 [0.00–0.56] | 12 |" in mat  # diverged, blow-up, worse; step
    # worst spike × initial loss, median [min, max] (fine 1, diverged 9/8 before it diverged, blow-up 20/8), the step
    assert "| 1.12 [1.00, 2.50] | 33 |" in mat
    aff = _line(stab, "affine", "tanh", "0.1")
    assert "| 0/3 [0.00–0.56] | 0/3 [0.00–0.56] | 1/3 [0.06–0.79] |" in aff
    assert "- **Sensitivity of blow-up (loss > k × initial loss)**" in stab and "k = 2 (the cut used)" in stab
    assert "k = 4: lr 0.001: 0, lr 0.01: 0, lr 0.1: 0" in stab  # at k = 4 the 2.5× spike is no blow-up
    claim = next(line for line in stab.splitlines() if line.startswith("- **lr 0.1:**"))
    p = stats.fisher_exact([[2, 1], [0, 3]]).pvalue  # matexp failed 2/3 (diverged or blew up), affine 0/3
    assert "matexp diverged in 1/3 (at step 12); matexp blew up in 1/3" in claim
    assert f"failed 2/3 vs 0/3 (Fisher's exact p = {p:.2f}, not distinguishable)" in claim
    assert "**What the proxy scale cannot show:**" in stab


def test_figures_and_sections(report):
    text, out, _ = report
    figs = {p.name for p in (out / "figures").glob("*.png")}
    group = "patches16-cpu-scale"
    for name in (f"table2_curves_{group}.png", f"table4_bpd_vs_lr_{group}.png", f"table5_epoch_time_{group}.png",
                 f"table6_m_{group}.png", f"mixing_bpd_vs_time_{group}.png", f"stability_outcomes_vs_lr_{group}.png",
                 f"stability_loss_curves_{group}.png"):  # fmt: skip
        assert name in figs and f"(figures/{name})" in text
        with Image.open(out / "figures" / name) as im:
            assert im.size[0] > 100
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["figures"]) == figs  # every figure made is listed, and shown
    assert not any(n.startswith("samples") for n in figs) and "Not drawn (`samples=False`)" in text
    assert _line(text, "expm_action fwd+bwd", "16384×6×6", "1.234", "ms", "< 2", "yes", "level 1")
    assert "produced by `mefbench bench --quick`" in text
    assert "Not included: no asv results directory was given." in text
    assert "## All runs" in text and "arXiv 2007.09651" in text and "checked against the paper" in text
    assert "No GPU results" in text or "no GPU results folder was given" in text


def test_every_table_spec_is_rendered(report):
    for spec in TABLES.values():
        assert f"## {spec.title}" in report[0]


def _numbers(value):
    """Every number of published.json with the object holding it (None for a bare number)."""
    if isinstance(value, dict):
        if "value" in value:
            yield value
            return
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield None


def test_published_json_labels_every_value_and_guesses_none():
    pub = load_published()
    assert pub["source"]["arxiv"] == "2007.09651" and "never replace it with a guess" in pub["note"]
    entries = [
        e
        for section in ("table2", "table3", "mixing")
        for e in _numbers(pub[section]["models" if section != "mixing" else "layers"])
    ]
    assert entries and None not in entries  # no bare number
    for e in entries:
        assert e["status"] in ("verified", "unverified")
        assert e.get("read_from") if e["status"] == "verified" else e.get("source") in pub["sources"]
    assert {k: v["value"] for k, v in pub["table2"]["models"]["MEF"].items()} == {
        "cifar10": 3.32, "imagenet32": 4.05, "imagenet64": 3.73}  # fmt: skip
    assert {k: v["value"] for k, v in pub["table3"]["models"].items()} == {
        "Glow": 44.0, "Emerging": 44.7, "Flow++": 31.4, "MEF": 37.7}  # fmt: skip
    assert all(c["mean"] is None and c["std"] is None for t in ("table4", "table5") for c in pub[t]["cells"])
    assert all(v is None for v in pub["table6"]["m"].values())
    layers = pub["mixing"]["layers"]
    assert set(layers) <= set(MIXING) and all(v["paper"] for v in layers.values())
    assert layers["woodbury"]["cifar10"]["status"] == "unverified"


def test_a_missing_or_empty_runs_dir_is_refused_and_nothing_is_written(tmp_path, runs_dir):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    out.mkdir()
    (out / "README.md").write_text("a good report")
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(ValueError, match="nothing was written"):
            write_report(bad, out, samples=False)
    assert (out / "README.md").read_text() == "a good report" and not (out / "figures").exists()


def test_regenerating_removes_only_its_own_stale_figures(tmp_path, runs_dir):
    out = tmp_path / "out"
    with pytest.warns(CorruptRecordWarning):
        write_report(runs_dir, out, samples=False)
    figs = out / "figures"
    mine = sorted(p.name for p in figs.glob("*.png"))
    (figs / "my_own.png").write_bytes(b"user's file")
    only_t2 = tmp_path / "only-t2"
    only_t2.mkdir()
    alone = record("cpu-t2-mef", 0, 4.1)
    alone.update(tables=["2"], cells={"2": alone["cells"]["2"]})  # a run of Table 2 alone
    write_record(only_t2, "t2-s0", alone)
    write_report(only_t2, out, samples=False)
    left = {p.name for p in figs.glob("*.png")}
    assert "my_own.png" in left  # not the report's: kept
    assert "table2_curves_patches16-cpu-scale.png" in left and "table4_bpd_vs_lr_patches16-cpu-scale.png" not in left
    assert set(mine) - left  # the previous report's figures that this one does not make are gone


def test_a_folder_the_report_does_not_own_is_refused(tmp_path, monkeypatch, capsys):
    """`report --out .` in a clone replaced the project's own README.md; now only a folder with the
    report's manifest, a new one, or one holding only the report's inputs is written to."""
    from mefbench.cli import main

    runs = tmp_path / "project" / "runs"
    write_record(runs, "t2-s0", record("cpu-t2-mef", 0, 4.1))
    project = tmp_path / "project"
    (project / "README.md").write_text("the project's own README")
    monkeypatch.chdir(project)
    assert main(["report", "--runs", "runs", "--out", ".", "--no-samples"]) == 2
    err = capsys.readouterr().err
    assert "refused --out .: it is not a report folder" in err and "would replace README.md" in err
    assert "pick another --out" in err and "Traceback" not in err
    assert (project / "README.md").read_text() == "the project's own README"
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "runs"]
    # reproduce refuses before it sweeps anything
    assert main(["reproduce", "--table", "5", "--scale", "smoke", "--runs", "new-runs", "--out", "."]) == 2
    assert "refused --out ." in capsys.readouterr().err and not (project / "new-runs").exists()
    # other files, or a file for a folder: refused, naming them
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"refused --out .*notes: .* it already holds todo.txt; pick another --out"):
        write_report(runs, notes, samples=False)
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    with pytest.raises(ValueError, match="is a file, not a folder"):
        write_report(runs, notes / "todo.txt", samples=False)
    # a folder holding only the report's inputs (its runs, as reports/ holds reports/runs) is written,
    # and then it is the report's: written again, keeping a file of the user's
    (project / "README.md").unlink()
    killed = project / ".figures.tmp999999999"  # the figures of a first report killed half-way (no such pid)
    killed.mkdir()
    (killed / "table2_curves.png").write_bytes(b"half")
    write_report(runs, project, samples=False)
    assert not killed.exists() and not list(project.glob(".figures.tmp*"))
    (project / "notes.txt").write_text("mine")
    write_report(runs, project, samples=False)
    assert (project / "notes.txt").read_text() == "mine" and (project / MANIFEST).is_file()


def test_a_failure_half_way_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    """A full disk while the figures or the README are written: the previous README and every
    previous figure are left byte for byte; no temporary is left behind."""
    import errno

    from matplotlib.figure import Figure

    import mefbench.report as report_module

    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    write_record(first, "t2-s0", record("cpu-t2-mef", 0, 4.1, epoch_time=20.0))
    write_record(second, "t2-s0", record("cpu-t2-mef", 0, 5.3, epoch_time=40.0))
    write_report(first, out, samples=False)

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    assert sum(name.startswith("figures/") for name in before) >= 2
    save = Figure.savefig
    calls = []

    def full_disk_at_the_second_figure(self, fname, *args, **kwargs):
        calls.append(fname)
        if len(calls) == 2:
            Path(fname).write_bytes(b"\x89PNG cut off")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_disk_at_the_second_figure)
    with pytest.raises(OSError, match=r"No space left on device.*previous report there, README and figures, is left"):
        write_report(second, out, samples=False)
    assert snapshot() == before
    monkeypatch.undo()

    replace = report_module.replace_atomic

    def full_disk_in_the_readme(path, write, hook=None):
        def cut(f):
            f.write(b"half a README")
            raise OSError(errno.ENOSPC, "No space left on device")

        return replace(path, cut, hook)

    monkeypatch.setattr(report_module, "replace_atomic", full_disk_in_the_readme)
    with pytest.raises(OSError, match="No space left on device"):
        write_report(second, out, samples=False)
    assert snapshot() == before
    monkeypatch.undo()
    write_report(second, out, samples=False)  # with room, the new report replaces the old one
    after = snapshot()
    assert after["README.md"] != before["README.md"] and set(after) == set(before)
    assert any(after[n] != before[n] for n in before if n.startswith("figures/"))


@pytest.mark.slow
def test_asv_section(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_record(runs, "t2-s0", record("cpu-t2-mef", 0, 4.1))
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
    text = write_report(runs, tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "| linalg.Expm.time | 0.5 |" in text and "(figures/asv_history.png)" in text
    assert "(vm: `0123456789`)" in text
    fake.plot_asv_history = no_history  # the table stays, the figure is explained
    text = write_report(runs, tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "| linalg.Expm.time | 0.5 |" in text and "History figure not drawn: ValueError: none of" in text
    fake.load_asv_results = lambda d: pd.DataFrame()
    text = write_report(runs, tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "Not included: no asv results in" in text
    monkeypatch.setitem(sys.modules, "mefbench.asv_results", None)  # import fails
    text = write_report(runs, tmp_path / "out", asv_dir=asv_dir, samples=False).read_text()
    assert "Not included: `mefbench.asv_results` cannot be imported" in text


def test_gpu_section(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, "t2-s0", record("cpu-t2-mef", 0, 4.1))
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "h200.json").write_text(json.dumps({
        "environment": {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0"}, "date": "2026-11-28",
        "bench": {"rows": [{"what": "expm_action", "shape": "s", "measured": 20.0, "unit": "×", "target": "≥ 10×", "ok": True}]},
        "train_step": [{"model": "MEF", "precision": "bf16", "images_per_s": 1234.56}],
    }))  # fmt: skip
    text = write_report(runs, tmp_path / "out", gpu_dir=gpu, samples=False).read_text()
    section = _section(text, "On a GPU")
    assert "NVIDIA H200, torch 2.11.0, CUDA 13.0, 2026-11-28" in section
    assert _line(section, "MEF", "bf16", "1235") and _line(section, "expm_action", "s", "20")  # 4 digits


def test_markdown_table_escapes_and_aligns():
    text = markdown_table(pd.DataFrame({"a": ["x|y", None], "n": [1.5, float("nan")]}))
    assert text.splitlines() == ["| a | n |", "|---|---:|", "| x\\|y | 1.5 |", "| – | – |"]


def test_report_cli_needs_runs_and_out(capsys):
    from mefbench.cli import main

    with pytest.raises(SystemExit):
        main(["report", "--bench", "reports/bench.json"])  # the old README line: no silent defaults
    assert "--runs" in capsys.readouterr().err


@pytest.mark.slow
def test_real_run_report_with_samples(tmp_path):
    from mefbench.training import train

    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float32)
    p = PRESETS["smoke"]
    train(p.model, p.train, tmp_path / "runs" / "r", progress=False, tables=("2", "6"), scale="smoke", preset="smoke")
    readme = write_report(tmp_path / "runs", tmp_path / "out", command="pytest")
    text = readme.read_text()
    assert "**Status:** all runs finished." in text and "patches16, smoke scale" in text
    assert "from the best finished Table 2 run, `r` (patches16, smoke scale" in text
    for t in ("0.5", "0.7", "1"):
        path = tmp_path / "out" / "figures" / f"samples_t{t}.png"
        assert f"(figures/samples_t{t}.png)" in text
        with Image.open(path) as im:
            im.load()
            assert im.mode == "RGB" and im.size[0] >= 4 * 64


def test_layers_of_the_zoo_tables_come_from_the_registries():
    stress = {(p.cell["coupling"], p.cell["variant"]) for p in PRESETS.values() if "stress" in p.tables}
    assert stress == {(n, v) for n, v, _ in registry_variants(COUPLING)}
    stab = {(p.cell["coupling"], p.cell["variant"]) for p in PRESETS.values() if "stability" in p.tables}
    assert stab == set(STABILITY_COUPLINGS) and len(stab) >= 5
    for table in ("stability", "stress"):
        lrs = {p.cell["lr"] for p in PRESETS.values() if table in p.tables and p.scale == "cpu"}
        assert lrs == set(STABILITY_LRS)
