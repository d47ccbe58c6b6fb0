"""
bench.py: the benchmark runs at tiny sizes and its numbers hang together; the GPU suite's
stages, files and flags (its dry run on the CPU).
"""
import json
import os
import subprocess
import time

import pytest
import torch

import bench
import models
from conftest import BENCH_TINY, HERE, PY, ROOT


@pytest.mark.slow
def test_bench_runs_and_reports_consistent_numbers(tmp_path):
    out = str(tmp_path / "bench.json")
    p = subprocess.run([PY, os.path.join(HERE, "bench.py"), *BENCH_TINY, "--out", out],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)  # from anywhere
    assert p.returncode == 0, p.stderr
    r = json.load(open(out))
    assert r["flags"]["batch_size"] == 4 and r["flags"]["n_x"] == 49
    assert r["max_abs_logit_diff"] < 1e-5          # the reference is the same network, same weights
    for name in ("ours", "ref"):
        s = r["step"][name]
        assert len(s["ms_repeats"]) == 3 and all(t > 0 for t in s["ms_repeats"])
        assert s["ms"] == sorted(s["ms_repeats"])[1]                     # the median of 3
        assert s["seq_per_s"] == pytest.approx(4 / (s["ms"] / 1e3))
        assert s["tok_per_s"] == pytest.approx(10 * s["seq_per_s"])
        assert s["tflops"] > 0 and s["mfu"] is None and s["peak_mib"] is None   # CPU: no MFU
    assert set(r["tasks_ms"]) == {"ours_sample_sequences", "ours_apply_tasks", "ref_per_sequence"}
    assert all(v > 0 for v in r["tasks_ms"].values())
    assert r["step_ratio"] > 0 and r["task_ratio"] > 0
    t, s = r["tasks_ms"]["ours_sample_sequences"], r["step"]["ours"]["ms"]
    assert r["task_share"] == pytest.approx(t / (t + s)) and 0 < r["task_share"] < 1
    assert r["process_peak_rss_mib"] > 0
    assert "ratio ours/ref" in p.stdout and "share of a step" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--repeats", "0"], ["--width", "30"], ["--device", "nonsense"],
                                   ["--out", "/nonexistent/bench.json"], ["--num-tasks", "2**63"]])
def test_bench_bad_flags_give_one_line_and_exit_2(flags):
    p = subprocess.run([PY, os.path.join(HERE, "bench.py"), *flags], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_reference_is_our_transformer_rebuilt_from_torch_nn():
    torch.manual_seed(0)
    ours = models.build("transformer", 59, 10,
                        **models.learner_sizes("transformer", 59, 10, width=32, n_layer=2, n_head=2,
                                               key_size=16))
    ref = bench.Reference(59, 10, 10, 32, 2, 2)
    tokens = torch.randn(3, 10, 59)
    with torch.no_grad():
        assert (ours(tokens) - ref(tokens)).abs().max() > 1e-2             # different until copied
        ref.copy_from(ours)
        assert torch.allclose(ours(tokens), ref(tokens), atol=1e-6)
        later = tokens.clone()
        later[:, 5:] += 1                                                 # and causal, like ours
        assert torch.equal(ref(tokens)[:, :5], ref(later)[:, :5])


def test_time_to_accuracy_is_the_first_evaluation_that_reaches_each_threshold():
    evaluation = lambda t, acc: {"step": 1, "time": t, "eval": {"unseen mnist": {"last": acc}}}
    records = [{"step": 1, "loss": 2.0, "time": 0.5}, evaluation(1.0, 0.3), evaluation(2.0, 0.6),
               evaluation(3.0, 0.5), evaluation(4.0, 0.7)]
    assert bench.time_to_accuracy(records, [0.5, 0.65, 0.737]) == \
        {"0.5": 2.0, "0.65": 4.0, "0.737": None}


SUITE_FILES = ["bench.json", "log.jsonl", "suite.json", "suite.log", "summary.json", "table1.json",
               "table1.md"]


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_its_files_and_numbers_that_agree(tmp_path):
    out = tmp_path / "suite"
    p = subprocess.run([PY, os.path.join(HERE, "bench.py"), "suite", "--out", "suite", "--dry-run",
                        "--thresholds", "0,0.99"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)                     # from anywhere, --out relative to there
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(os.listdir(out)) == SUITE_FILES                       # at most 8, nothing else
    r = json.load(open(out / "suite.json"))
    assert {k: v["status"] for k, v in r["stages"].items()} == \
        {"bench eager": "ok", "train": "ok", "table1": "ok", "bench compiled": "ok"}
    assert 0 < r["wall_s"] <= r["limit_s"]
    # meta-training stopped on its budget, with a final evaluation at its last step
    summary = json.load(open(out / "summary.json"))
    records = [json.loads(l) for l in open(out / "log.jsonl")]
    evals = [x for x in records if "eval" in x]
    assert summary["stopped_by"] == "time_budget" and r["train"]["step"] == summary["step"]
    assert evals[-1]["step"] == summary["step"] and "--time-budget" in r["train"]["argv"]
    # times to accuracy, recomputed here from the log: 0 is reached at the first evaluation
    reached = {str(t): next((x["time"] for x in evals if x["eval"]["unseen mnist"]["last"] >= t),
                            None) for t in (0.0, 0.99)}
    assert r["time_to_unseen_mnist_acc_at_last"] == reached and reached["0.0"] == evals[0]["time"]
    for t in reached.values():
        assert t is None or 0 < t <= r["train"]["log_wall_s"] <= summary["train_time_s"] + 0.1
    # the benchmark: two widths x two batch sizes, eager and compiled, each beside the reference
    b = json.load(open(out / "bench.json"))
    assert sorted((x["width"], x["batch_size"], x["compiled"]) for x in b["runs"]) == \
        sorted((w, n, c) for w in (16, 32) for n in (4, 8) for c in (False, True))
    for x in b["runs"]:
        flags = x["full"]["flags"]
        assert (flags["width"], flags["batch_size"], flags["compile"]) == \
            (x["width"], x["batch_size"], x["compiled"])
        assert x["ours_ms"] > 0 and x["ref_ms"] > 0 and x["step_ratio"] > 0 and x["task_ratio"] > 0
        assert x["ours_tok_per_s"] == pytest.approx(x["batch_size"] * 10 / (x["ours_ms"] / 1e3))
        assert 0 < x["task_share"] < 1 and x["max_abs_logit_diff"] < 1e-5
    assert [{k: v for k, v in x.items() if k != "full"} for x in b["runs"]] == r["bench"]
    # Table 1 of the run's checkpoint on the shipped datasets
    row = json.load(open(out / "table1.json"))["checkpoints"][0]
    md = open(out / "table1.md").read()
    assert row["step"] == summary["step"] and row["seq_len"] == r["train"]["seq_len"] == 10
    for k in ("MNIST", "UCI digits", "Random"):
        c = row["accuracy_pct"][k]
        assert r["table1_pct"][k] == c and 0 <= c["acc"] <= 100 and f"{c['acc']:.2f} ± " in md
    # one screen at the end, and every console line in suite.log with the stages' output
    screen = p.stdout[p.stdout.index("=== GPU suite"):].splitlines()
    assert len(screen) <= 25 and any(l.startswith("stages: bench eager ok") for l in screen)
    log = open(out / "suite.log").read()
    assert all(l in log for l in p.stdout.splitlines()) and f"| {summary['step']} steps in" in log


def test_suite_stage_that_fails_or_overruns_is_recorded_and_the_suite_goes_on(tmp_path):
    stages = bench.Stages(str(tmp_path / "suite.log"), minutes=1)
    t = time.time()
    stages.run("slow", [PY, "-c", "import time; print('working'); time.sleep(60)"], limit=1)
    assert time.time() - t < 20                                          # ended at its limit
    stages.run("bad", [PY, "-c", "import sys; print('oops'); sys.exit(3)"], limit=30)
    stages.run("good", [PY, "-c", "print('fine')"], limit=30)
    report = stages.report
    assert report["slow"]["status"] == "timed out after 1 s" and report["slow"]["tail"] == ["working"]
    assert report["bad"]["status"] == "failed (exit 3)" and report["bad"]["tail"] == ["oops"]
    assert report["good"]["status"] == "ok" and "tail" not in report["good"]
    assert "fine" in open(tmp_path / "suite.log").read()


@pytest.mark.parametrize("flags, message", [
    ([], "--out"), (["--thresholds", "0.5,2"], "accuracy in [0, 1]"),
    (["--thresholds", "0.5,high"], "accuracy in [0, 1]"), (["--minutes", "nan"], "--minutes nan"),
    (["--dry-run", "--", "--width", "-3"], "train.py (the flags after --)"),
    (["--dry-run", "--", "--no-such-flag"], "unrecognized arguments"),
])
def test_suite_bad_flags_give_one_line_and_exit_2(flags, message, tmp_path, capsys):
    out = ["--out", str(tmp_path / "s")] if flags else []
    with pytest.raises(SystemExit) as stopped:
        bench.suite([*out, *flags])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_suite_refuses_a_folder_that_holds_a_suites_files(tmp_path, capsys):
    (tmp_path / "suite.json").write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        bench.suite(["--out", str(tmp_path), "--dry-run"])
    assert stopped.value.code == 2 and "already holds suite.json" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["suite.json"]
    assert (tmp_path / "suite.json").read_text() == "{}"                # nothing written is lost
