import json

from mefbench.cli import main
from mefbench.sweep import parse_tables, plan


def test_plan_shares_runs_between_tables():
    specs = plan((2, 4, 5, 6), "cpu", seeds=3)
    names = sorted({s.name.rsplit("-seed", 1)[0] for s in specs})
    # MEF at lr 0.01 fills tables 2, 4, 5 and 6 once; 5 other distinct configurations
    assert len(names) == 6 and len(specs) == 18
    mef = [s for s in specs if set(s.tables) == {2, 4, 5, 6}]
    assert len(mef) == 3 and sorted(s.train.seed for s in mef) == [0, 1, 2]
    assert plan((3,), "cpu") == []  # parameter counts need no runs
    assert parse_tables("all") == (2, 3, 4, 5, 6) and parse_tables("4,2") == (2, 4)


def test_paper_plan_takes_data_dirs():
    specs = plan((2,), "paper", seeds=1, data_dirs={"cifar10": "/data/c", "*": "/data/any"})
    dirs = {s.train.dataset: s.train.data_dir for s in specs}
    assert dirs == {"cifar10": "/data/c", "imagenet32": "/data/any", "imagenet64": "/data/any"}


def test_sweep_runs_skips_and_resumes(tmp_path, capsys):
    args = ["sweep", "--table", "5", "--scale", "smoke", "--seeds", "1", "--runs", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    records = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/record.json")}
    assert len(records) == 3 and all(r["status"] == "finished" for r in records.values())
    assert {r["model"]["conv"] for r in records.values()} == {"standard", "plu", "matexp"}
    # mark one as interrupted mid-way: a rerun resumes only that one and keeps the others
    name = sorted(records)[0]
    path = tmp_path / name / "record.json"
    record = records[name]
    record["status"] = "running"
    record["epochs"] = record["epochs"][:1]
    path.write_text(json.dumps(record))
    (tmp_path / name / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 runs" in out and "3 finished" in out
    assert json.loads(path.read_text())["resumes"]
    for other in sorted(records)[1:]:
        assert json.loads((tmp_path / other / "record.json").read_text()) == records[other]
