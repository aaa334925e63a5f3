"""The benchmark harness runs end to end in its quick mode and every agreement check passes.

No timing assertions: quick mode runs every benchmark once at tiny sizes on whatever machine runs the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = [f"B{i}" for i in range(1, 12)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, str]:
    out = tmp_path_factory.mktemp("bench")
    report, data = out / "RESULTS.md", out / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(report), "--json", str(data)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert data.exists(), proc.stderr[-4000:]
    return proc, json.loads(data.read_text()), report.read_text()


@pytest.mark.slow
def test_quick_mode_runs_every_benchmark_and_checks_agree(quick_run):
    proc, data, _ = quick_run
    failed_checks = [c for c in data["checks"] if not c["ok"]]
    failed_rows = [r for r in data["rows"] if r["status"] == "FAILED"]
    assert not failed_checks, failed_checks
    assert not failed_rows, (failed_rows, proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert data["benches"] == BENCHES
    for bench in BENCHES:
        rows = [r for r in data["rows"] if r["bench"] == bench]
        assert rows, f"{bench} produced no result row"
        measured = [r for r in rows if r["status"] != "skipped"]
        if bench == "B7" and not measured:  # the prompt/prefix plugins are not installed
            assert all("not installed" in r["ours"] for r in rows), rows
            continue
        assert [c for c in data["checks"] if c["bench"] == bench], f"{bench} ran no agreement check"
        assert any(r["target"] for r in measured), f"{bench} judged no target"
    for bench in ("B1", "B2", "B3", "B4", "B5", "B6", "B8"):  # targets with a ratio or a yes/no answer
        assert all(r["status"] in ("met", "missed", "info") for r in data["rows"] if r["bench"] == bench)


@pytest.mark.slow
def test_quick_report_names_machine_versions_and_targets(quick_run):
    _, data, report = quick_run
    assert "python -m benchmarks --quick" in report
    for name in ("torch", "transformers", "peft", "peft-core"):
        assert f"{name} " in report and data["meta"]["versions"][name]
    assert "## Targets" in report and "## Agreement checks" in report
    assert "torch CPU capability" in report and data["meta"]["machine"]["flags"]
    for row in data["rows"]:
        if row["status"] == "missed":
            assert row["note"].startswith("missed by"), row


@pytest.mark.slow
def test_quick_run_sweeps_the_timed_benchmarks_over_its_grid(quick_run):
    _, data, report = quick_run
    points = [g["name"] for g in data["meta"]["grid"]]
    assert points == ["base", "h128"]
    for bench in ("B1", "B3", "B4", "B7"):
        rows = [r for r in data["rows"] if r["bench"] == bench and r["status"] != "skipped"]
        if bench == "B7" and not rows:
            continue
        assert {r["point"] for r in rows} == set(points), bench
        assert all(r["case"].endswith(f" @ {r['point']}") for r in rows), bench
    for bench in ("B2", "B5", "B6", "B8", "B9", "B10", "B11"):  # one point only
        assert {r["point"] for r in data["rows"] if r["bench"] == bench} == {""}, bench
    # the worst-case section comes first and judges every target once, over every point it ran at
    assert report.index("## Targets, worst case over the grid") < report.index("## Targets at each grid point")
    lines = {(w["bench"], w["case"], w["metric"], w["reference"]): w for w in data["worst"]}
    b1 = lines[("B1", "fp32 dropout=0", "train step", "frozen floor")]
    assert b1["target"] == "≤1.05x" and len(b1["points"]) == 2 and b1["worst_point"] in points
    assert b1["worst_ratio"] == max(r["ratio"] for r in data["rows"] if r["bench"] == "B1"
                                    and r["group"] == "fp32 dropout=0" and r["ref_name"] == "frozen floor")
    # issue 15's targets
    assert lines[("B3", "fp32", "decode (1 token, KV cache)", "peft")]["target"] == "≤0.9x"
    assert lines[("B3", "bf16", "prefill", "peft")]["target"] == "≤0.92x"
    b4 = {w["metric"]: w["target"] for w in data["worst"] if w["bench"] == "B4"}
    assert b4 == {"mixed prefill": "≥2x faster", "mixed decode": "≥4x faster"}
    # the bounds the targets are up against
    refs = {(r["bench"], r["ref_name"]) for r in data["rows"] if r["metric"].endswith("(reference)")}
    assert ("B4", "base model (no adapters)") in refs
    if any(r["bench"] == "B7" and r["status"] != "skipped" for r in data["rows"]):
        assert ("B7", "frozen floor at seq + 200") in refs and ("B7", "frozen floor at seq") in refs


def test_full_grid_covers_every_value_issue_15_lists(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from benchmarks.common import FULL, grid_points
    from benchmarks.runner import points_for

    grid = grid_points(FULL)
    assert grid[0].is_base and grid[0].name == "base"
    assert {p.hidden for p in grid} >= {512, 1024}
    assert {p.r for p in grid} >= {8, 64}
    assert {p.kv_heads == p.heads for p in grid} == {True, False}  # MHA and GQA
    assert {(p.batch, p.seq) for p in grid} >= {(4, 256), (1, 1024)}
    def factors(p):  # hidden size scales the heads too (head dim 64), keeping GQA's 2:1 grouping
        return {"hidden": p.hidden, "r": p.r, "attention": p.heads // p.kv_heads, "batch": p.batch, "seq": p.seq}

    for p in grid:  # one factor at a time: each point differs from the base in the factor it names only
        differs = {k for k, v in factors(p).items() if v != factors(grid[0])[k]}
        assert differs <= {"hidden": {"hidden"}, "r": {"r"}, "attention": {"attention"}, "shape": {"batch", "seq"},
                           "": set()}[p.varies], p
    assert len(points_for("B1", grid)) == len(points_for("B3", grid)) == len(grid)
    assert "shape" not in {p.varies for p in points_for("B4", grid)}  # B4 has its own batch x seq
    assert {p.varies for p in points_for("B7", grid)} == {"", "hidden", "shape"}  # no rank, always MHA
    assert points_for("B2", grid) == [None]
    assert grid_points(FULL, "base") == grid[:1]


def test_worst_case_judges_a_target_on_its_worst_grid_point(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from benchmarks.common import Row, Target
    from benchmarks.report import worst_case

    def row(point: str, ratio: float, target: Target | None = None) -> Row:
        return Row("B1", f"fp32 @ {point}", "train step", "1 s", "1 s", "peft", ratio=ratio,
                   target=target or Target.at_most(0.95), point=point, group="fp32")

    rows = [row("base", 0.90), row("h1024", 0.99), row("r8", 0.80),
            row("base", 0.40, Target.speedup(2.0)), row("h1024", 0.55, Target.speedup(2.0)),
            Row("B3", "bf16 @ mha", "(error)", "", "", "", status="FAILED", note="boom", point="mha", group="bf16"),
            Row("B3", "bf16 @ base", "prefill", "1 s", "1 s", "peft", ratio=0.5, target=Target.at_most(0.92),
                point="base", group="bf16"),
            Row("B6", "bf16", "bit-exact", "yes", "no", "peft", target=Target.exact("bit-exact"), ok=True)]
    w = {(x.bench, x.target): x for x in worst_case(rows)}
    b1 = w[("B1", "≤0.95x")]
    assert (b1.worst_ratio, b1.worst_point, b1.median_ratio, b1.status) == (0.99, "h1024", 0.90, "missed")
    assert b1.note.startswith("missed by 4%")
    fast = w[("B1", "≥2x faster")]
    assert (fast.worst_ratio, fast.worst_point, fast.status) == (0.55, "h1024", "missed")
    b3 = w[("B3", "≤0.92x")]  # met at the base point, but the case failed at another: failed
    assert b3.status == "FAILED" and b3.failed_points == ["mha"]
    assert w[("B6", "bit-exact")].status == "met"


@pytest.mark.slow
def test_gpu_script_smoke_test_on_cpu(tmp_path):
    report, data_path = tmp_path / "RESULTS-GPU.md", tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu", "--quick", "--out", str(report),
                           "--json", str(data_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists() and data_path.exists(), proc.stderr[-4000:]
    data = json.loads(data_path.read_text())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert data["checks"] and all(c["ok"] for c in data["checks"]), [c for c in data["checks"] if not c["ok"]]
    assert not [r for r in data["rows"] if r["status"] == "FAILED"]
    assert data["benches"] == ["B1", "B3", "B4", "B6"]
    assert {r["bench"] for r in data["rows"]} == set(data["benches"])
    assert {r["point"] for r in data["rows"] if r["bench"] == "B1"} == {"base", "h128"}
    assert "on a GPU" in report.read_text() and "cpu (smoke test)" in report.read_text()


def test_gpu_script_without_cuda_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.syspath_prepend(REPO)
    import torch

    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_targets_say_by_how_much_they_are_missed(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from benchmarks.common import Target

    assert Target.at_most(0.95).judge(0.90) == ("met", "")
    status, off = Target.at_most(0.70).judge(0.84)
    assert status == "missed" and off.startswith("by 20%")
    assert Target.speedup(2.5).judge(0.5)[0] == "missed"
    assert Target.speedup(2.5).judge(0.4)[0] == "met"
    assert Target.exact("bit-exact").judge(None, ok=True) == ("met", "")
