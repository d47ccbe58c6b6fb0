"""
The machinery's tests: the run's safety (harness.py) through train.py's command line, resuming,
signals, the folder lock, a non-finite loss, the time budget, torchrun; the datasets fetched on
first use; bench.py, metatest.py's command lines and experiments.py; and every command line
fuzzed. The lesson's own tests are test_gpicl.py; helpers both share are conftest.py.
"""
import argparse
import csv
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import string
import tarfile
import threading
import time
import traceback
import zlib

import numpy as np
import pytest
import torch

import configurator
import data
import experiments
import gpicl
import harness
import metatest
import models
import train
from conftest import HERE, PY, TINY, TRAINED, blobs, run_train, tiny_checkpoint


# -----------------------------------------------------------------------------
# 1. train.py's command line and the run's safety (harness.py)

@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--num-tasks", "0"], ["--num-tasks", "lots"], ["--num-tasks", "2**-3"], ["--bias", "1.5"],
    ["--lr", "-1"], ["--lr", "nan"], ["--steps", "0"], ["--model", "gru"],
    ["--model", "transformer", "--state-size", "1001"], ["--batch-size", "7", "--grad-accum", "2"],
    ["--eval-datasets", "imagenet"], ["--image-size", "x"], ["--num-tasks", "2**70"],
    ["--seed", "99999999999999999999"], ["--device", "foo"], ["--device", "cuda:99"],
    ["--out-dir", "/dev/null/run"], ["--baselines", "maybe"],
])
def test_bad_flags_give_one_line_and_exit_2(flags, tmp_path):
    # a flag wrongly accepted trains 1 step
    p = run_train([*TINY, "--steps", "1", "--out-dir", str(tmp_path / "r"), *flags])
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in p.stderr, p.stderr


@pytest.mark.slow
def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    out = str(tmp_path / "r")
    assert run_train([*TINY, "--steps", "2", "--out-dir", out]).returncode == 0
    before = open(os.path.join(out, "log.jsonl")).read()
    p = run_train([*TINY, "--steps", "2", "--out-dir", out])
    assert p.returncode == 2 and "--resume" in p.stderr
    assert open(os.path.join(out, "log.jsonl")).read() == before
    # nor continue it as another run: the meta-batches would not be the ones it trained on
    p = run_train([*TINY, "--steps", "4", "--seed", "1", "--out-dir", out, "--resume"])
    assert p.returncode == 2 and "--seed 0" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert open(os.path.join(out, "log.jsonl")).read() == before


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "log.jsonl")))
            if "loss" in r]


@pytest.mark.slow
def test_resume_from_weights_only_is_one_line(tmp_path):
    out = tmp_path / "r"
    assert run_train([*TINY, "--steps", "1", "--out-dir", str(out)]).returncode == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer", "rng")}, out / "ckpt.pt")
    p = run_train([*TINY, "--steps", "2", "--out-dir", str(out), "--resume"])
    assert p.returncode == 2 and "weights only" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # a run made before the fixed-permutation bias and optax's Adam (no "format", format-1 keys)
    old = {k: v for k, v in ckpt.items() if k != "format"}
    old["flags"] = {k: v for k, v in ckpt["flags"].items()
                    if k not in ("bias_task", "seqs_per_task", "channels", "preset")}
    torch.save(old, out / "ckpt.pt")
    p = run_train([*TINY, "--steps", "2", "--out-dir", str(out), "--resume"])
    assert p.returncode == 2 and "older gpicl" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 4])  # 4: checkpoints fall between loss records
def test_killed_run_resumes_with_the_same_losses(tmp_path, log_every):
    args = [*TINY, "--steps", "60", "--log-every", str(log_every), "--ckpt-every", "5",
            "--eval-every", "1000"]
    whole = str(tmp_path / "whole")
    assert run_train([*args, "--out-dir", whole]).returncode == 0
    # the same run, killed (SIGKILL: no chance to save) after its first checkpoints
    cut = str(tmp_path / "cut")
    proc = subprocess.Popen([PY, os.path.join(HERE, "train.py"), *args, "--out-dir", cut],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(cut, "ckpt.pt")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(ckpt) and
                                          torch.load(ckpt, weights_only=True)["step"] >= 10):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= stopped < 60
    p = run_train([*args, "--out-dir", cut, "--resume"])
    assert p.returncode == 0, p.stderr
    assert losses(cut) == losses(whole)                                 # bit for bit, no duplicates
    assert [s for s, _ in losses(cut)] == list(range(log_every, 61, log_every))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_even_in_a_background_job(tmp_path):
    # a non-interactive shell starts background jobs with SIGINT ignored; train.py re-arms it
    out = str(tmp_path / "r")
    proc = subprocess.Popen([PY, os.path.join(HERE, "train.py"), *TINY, "--steps", "100000",
                             "--eval-every", "100000", "--out-dir", out], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 0):
        time.sleep(0.05)                                                 # it is training
    proc.send_signal(signal.SIGINT)
    try:
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()                                                      # never left running
    assert proc.returncode == 130 and "--resume" in stdout
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] >= 50


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_inside_a_step_finishes_it_and_resumes_exactly(tmp_path, monkeypatch, sig):
    args = [*TINY, "--steps", "6", "--log-every", "2", "--eval-every", "1000"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train.main([*args, "--out-dir", whole])
    adam_step, calls = train.Adam.step, []

    def interrupt_then_step(self):  # the signal inside step 3: its loss is summed, Adam not yet run
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return adam_step(self)
    monkeypatch.setattr(train.Adam, "step", interrupt_then_step)
    with pytest.raises(SystemExit) as stopped:
        train.main([*args, "--out-dir", cut])
    assert stopped.value.code == 128 + sig                      # 130 for Ctrl-C, 143 for SIGTERM
    assert torch.load(os.path.join(cut, "ckpt.pt"), weights_only=True)["step"] == 3
    monkeypatch.undo()
    train.main([*args, "--out-dir", cut, "--resume"])
    assert losses(cut) == losses(whole)                       # step 3 counted once, whole


@pytest.mark.slow
def test_time_budget_reads_durations_and_a_bad_one_is_one_line(tmp_path):
    assert [harness.duration(s) for s in ("300", "300s", "5m", "1.5h", " 2S ", ".5m")] == \
        [300, 300, 300, 5400, 2, 30]
    for bad in ("5x", "0", "-1", "1e3", "5ms", "inf", "nan", "", "m"):
        with pytest.raises(argparse.ArgumentTypeError):
            harness.duration(bad)
    p = run_train([*TINY, "--steps", "1", "--time-budget", "5x", "--out-dir", str(tmp_path / "r")])
    assert p.returncode == 2 and "'5x' is not a duration" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_time_budget_ends_the_run_as_its_last_step_would_and_resume_continues(tmp_path):
    # log, evaluation and checkpoint intervals far beyond the run: all three come from the budget
    out = tmp_path / "r"
    args = [*TINY, "--log-every", "100000", "--eval-every", "100000", "--out-dir", str(out)]
    p = run_train([*args, "--steps", "1000000", "--time-budget", "2s"])
    assert p.returncode == 0, p.stderr
    summary = json.load(open(out / "summary.json"))
    n = summary["step"]
    assert summary["stopped_by"] == "time_budget" and 0 < n < 1000000
    assert 2.0 <= summary["train_time_s"] < 10
    assert f"stopped on the time budget (2 s) at step {n} of 1000000" in p.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == n and ckpt["last_logged"] == n
    records = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == [n, n] and "loss" in records[0]
    assert records[1]["eval"]["unseen mnist"]["last"] == summary["results"]["unseen mnist"]["last"]
    # resumed without a budget, it runs on to --steps
    p = run_train([*args, "--steps", str(n + 3), "--resume"])
    assert p.returncode == 0, p.stderr
    summary = json.load(open(out / "summary.json"))
    assert summary["step"] == n + 3 and summary["stopped_by"] == "steps"
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl")) if "eval" in r] == [n, n + 3]
    # resumed with one, the budget counts from the resume, not from the run's first step
    p = run_train([*args, "--steps", "1000000", "--time-budget", "1", "--resume"])
    assert p.returncode == 0, p.stderr
    later = json.load(open(out / "summary.json"))
    assert later["stopped_by"] == "time_budget" and later["step"] >= n + 3 + 3
    assert later["train_time_s"] >= summary["train_time_s"] + 1


def test_presets_fill_what_no_flag_gives_and_flags_win():
    parse = lambda *a: configurator.get_parser().parse_args(list(a))
    for device, preset in (("cpu", "cpu"), ("cuda:0", "paper")):            # the device picks
        args = parse("--device", device)
        configurator.apply_preset(args)
        assert args.preset == preset
        filled = {**configurator.PRESETS[preset], **configurator.TRANSFORMER_PRESETS[preset]}
        assert all(getattr(args, k) == v for k, v in filled.items())    # nothing left unset
    args = parse("--preset", "paper", "--image-size", "9", "--steps", "5", "--width", "3")
    configurator.apply_preset(args)
    assert (args.image_size, args.steps, args.width) == (9, 5, 3)      # a flag given wins
    assert args.batch_size == configurator.PRESETS["paper"]["batch_size"]   # the rest: the preset
    args = parse("--preset", "cpu", "--model", "outer_lstm")     # sizes are the Transformer's
    configurator.apply_preset(args)
    assert args.width is None and args.n_head is None and args.batch_size is not None
    # the cpu preset's LSTM is 64 wide, unless a width or a state size is asked for
    widths = {}
    for extra in ((), ("--width", "128"), ("--state-size", "1024")):
        args = parse("--preset", "cpu", "--model", "lstm", *extra)
        configurator.apply_preset(args)
        widths[extra] = args.width
    assert list(widths.values()) == [64, 128, None]
    args = parse("--preset", "paper", "--model", "lstm")
    configurator.apply_preset(args)
    assert args.width is None                                    # the paper preset: its own
    args = parse("--preset", "cpu", "--state-size", "3200")       # the state picks the key size
    configurator.apply_preset(args)
    assert args.key_size is None and args.width is not None


class MakesAFile:
    """Unpickled, this calls open(path, "w"): a file appears if loading a pickle runs its code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_safe_load_refuses_checkpoints_that_would_run_code_or_are_cut_short(tmp_path, capsys):
    out, marker = tmp_path / "r", tmp_path / "pickle_ran"
    args = [*TINY, "--steps", "1", "--out-dir", str(out)]
    train.main(args)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # what train.py saves reads back safely
    ckpt["flags"]["note"] = MakesAFile(str(marker))
    evil, cut = tmp_path / "evil.pt", tmp_path / "cut.pt"
    torch.save(ckpt, evil)
    cut.write_bytes((out / "ckpt.pt").read_bytes()[:5000])              # a copy cut short
    capsys.readouterr()
    for bad, why in ((evil, "refused"), (cut, "truncated or corrupted")):
        shutil.copy(bad, out / "ckpt.pt")
        for main, argv in ((train.main, [*args, "--steps", "2", "--resume"]),
                           (metatest.main, ["table1", str(bad), "--out-dir", str(tmp_path)]),
                           (metatest.main, ["uci", "--ckpt", str(bad)])):
            with pytest.raises(SystemExit) as e:
                main(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and why in err and len(err.strip().splitlines()) == 1, err
        with pytest.raises(ValueError, match=why) as e:
            metatest.InContextClassifier(str(bad))
        assert "\n" not in str(e.value)
    assert not marker.exists()                       # nothing above ran the pickle's code...
    torch.load(evil, weights_only=False)
    assert marker.exists()                           # ...which an unsafe load would have run


@pytest.mark.parametrize("log_every, ckpt_every", [(3, 2), (100, 1)])
def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoint_before_it(tmp_path, monkeypatch, capsys,
                                                                     log_every, ckpt_every):
    # a constant learning rate: under the cpu preset's cosine decay it depends on --steps, and
    # the 4-step run would not be the 8-step run's first 4 steps
    args = [*TINY, "--eval-every", "1000", "--log-every", str(log_every),
            "--ckpt-every", str(ckpt_every), "--schedule", "constant"]
    train.main([*args, "--steps", "4", "--out-dir", str(tmp_path / "good")])
    make_tokens, calls = data.make_tokens, []

    def nan_at_step_5(*a):  # NaN tokens, so a NaN loss, at step 5 (no evaluation before it)
        calls.append(1)
        tokens = make_tokens(*a)
        return tokens * math.nan if len(calls) == 5 else tokens
    monkeypatch.setattr(data, "make_tokens", nan_at_step_5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--steps", "8", "--out-dir", str(tmp_path / "nan")])
    err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]  # not tqdm's bar
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("train.py: error: "), err
    assert "not finite" in err[0] and "at step 5" in err[0]
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    good = torch.load(tmp_path / "good" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4                        # never one of step 5 or later (log_every 3: 6)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in good["model"].items())
    assert all(s <= 4 for s, _ in losses(tmp_path / "nan"))       # no record of a NaN loss


def test_out_dir_lock_refuses_a_second_run_while_the_first_lives_not_after_a_kill(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*TINY, "--eval-every", "100000", "--ckpt-every", "5", "--out-dir", str(out)]
    proc = subprocess.Popen([PY, os.path.join(HERE, "train.py"), *args, "--steps", "100000"],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "ckpt.pt").exists():
            time.sleep(0.05)                                              # it is training
        for more in ([], ["--resume"]):  # a second run in its folder, new or continuing it
            with pytest.raises(SystemExit) as e:
                train.main([*args, "--steps", "100000", *more])
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"in use by a running train.py (pid {proc.pid})" in err
            assert len(err.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGKILL)                                  # no chance to unlock
        proc.wait()
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    train.main([*args, "--steps", str(step + 2), "--resume"])             # not stuck
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step + 2


def test_first_line_names_the_learner_trained_and_each_evaluation_prints_its_table(tmp_path, capsys):
    heads = TINY.index("--n-head")
    lstm = TINY[:heads] + TINY[heads + 2:]                              # an LSTM has no heads
    train.main([*lstm, "--model", "lstm", "--width", "8", "--n-layer", "1", "--steps", "2",
                "--eval-every", "1", "--baselines", "off", "--out-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("preset cpu: lstm (width 8, n_layer 1; state size 16 floats) on 7x7 ")
    header = gpicl.format_results(json.loads(open(tmp_path / "r" / "log.jsonl").readline())["eval"])
    at = out.index("step 1:")                                          # the evaluation at step 1
    assert out[at + 1:at + 1 + len(header.splitlines())] == header.splitlines()


def test_resume_refuses_format_2_whose_meta_batches_differ_but_its_weights_still_load(tmp_path):
    """Format 2 drew the bias per slot, format 3 per task id: a format-2 run cannot continue
    (its meta-batches would change under it), but its weights load for meta-testing, its keys
    renamed as format 3 names them ("config" -> "flags", "model_config" -> "learner", "cfg" ->
    "sizes")."""
    args = [*TINY, "--eval-every", "1000", "--log-every", "1", "--schedule", "constant", "--out-dir"]
    train.main([*args, str(tmp_path / "old"), "--steps", "2"])
    ckpt = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    learner = ckpt.pop("learner")
    ckpt.update(format=2, config=ckpt.pop("flags"),
                model_config=dict(kind=learner["kind"], n_in=learner["n_in"],
                                  n_out=learner["n_out"], cfg=learner["sizes"]))
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    p = run_train([*args, str(tmp_path / "old"), "--steps", "3", "--resume"])
    assert p.returncode == 2 and "older gpicl" in p.stderr and "Traceback" not in p.stderr, p.stderr
    model, old = gpicl.load_learner(str(tmp_path / "old" / "ckpt.pt"))
    assert old["format"] == 2 and old["learner"]["sizes"] == learner["sizes"]
    assert torch.equal(model.state_dict()["head.weight"], ckpt["model"]["head.weight"])


@pytest.mark.slow
def test_lstm_with_state_size_1024_starts_and_reports_it(tmp_path):
    p = run_train(["--model", "lstm", "--state-size", "1024", "--steps", "1", "--batch-size", "2",
                   "--seq-len", "10", "--eval-tasks", "1", "--eval-seqs", "2",
                   "--out-dir", str(tmp_path / "r")])
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith("preset cpu:") and "--preset paper" in first     # no GPU here
    # 7x7; the meta-parameters: 2,399,754 weights less the 2,048 of the frozen bias_hh
    assert "state size 1,024 floats" in p.stdout and "parameters 2,397,706" in p.stdout
    summary = json.load(open(tmp_path / "r" / "summary.json"))
    assert summary["state_size"] == 1024 and summary["sizes"]["width"] == 512



# -----------------------------------------------------------------------------
# 2. Data parallel: torchrun with two CPU processes (gloo) equals one process with the same batch

DDP_TINY = ["--model", "transformer", "--width", "32", "--n-layer", "1", "--n-head", "2",
            "--image-size", "7", "--seq-len", "10", "--batch-size", "8", "--steps", "2",
            "--log-every", "1", "--eval-every", "2", "--eval-tasks", "2", "--eval-seqs", "4",
            "--eval-datasets", "", "--threads", "1"]


@pytest.mark.slow
def test_two_processes_under_torchrun_train_like_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p1 = subprocess.run([PY, os.path.join(HERE, "train.py"), *DDP_TINY, "--out-dir", one],
                        capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p1.returncode == 0, p1.stderr
    p2 = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         os.path.join(HERE, "train.py"), *DDP_TINY, "--out-dir", two],
                        capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:]
    # the effective batch, said once (by rank 0 only)
    assert p2.stdout.count("meta-batch 8") == 1, p2.stdout
    assert "2 process(es) x 1 accumulation steps x 4 sequences = meta-batch 8" in p2.stdout
    # one record per step (only rank 0 writes), and the same losses: step 1 checks that the two
    # halves of the meta-batch are the single run's batch and that the loss is averaged over
    # ranks; step 2 that the gradients were averaged too (summed, or not reduced, it differs)
    a, b = losses(one), losses(two)
    assert [s for s, _ in b] == [1, 2] == [s for s, _ in a]
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-5), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_under_torchrun_stops_every_rank_at_one_step(tmp_path, sig):
    # torchrun passes SIGINT or SIGTERM on to the ranks; each may get it in a different step, so
    # they agree at the next loss record (an all-reduce): one checkpoint, no rank left waiting
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "r"
    run = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *DDP_TINY, "--log-every", "10", "--eval-every", "100000"]
    proc = subprocess.Popen([*run, "--steps", "100000", "--out-dir", str(out)], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and
                                          (out / "log.jsonl").stat().st_size > 0):
        time.sleep(0.05)                                                 # both ranks train
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert output.count("interrupted at step") == 1, output[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] % 10 == 0 and ckpt["last_logged"] == ckpt["step"] and ckpt["step"] >= 10
    p = subprocess.run([*run, "--steps", str(ckpt["step"] + 10), "--out-dir", str(out), "--resume"],
                       capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert [s for s, _ in losses(out)] == list(range(10, ckpt["step"] + 11, 10))


@pytest.mark.slow
def test_time_budget_under_torchrun_stops_every_rank_at_one_step(tmp_path):
    # rank 0 decides at a loss record's all-reduce; a rank that stopped alone would leave the
    # other waiting in the next all-reduce (the test's timeout)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "r"
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), *DDP_TINY, "--log-every", "10",
                        "--eval-every", "100000", "--steps", "100000", "--time-budget", "2",
                        "--out-dir", str(out)],
                       capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("stopped on the time budget") == 1, p.stdout[-2000:]
    summary = json.load(open(out / "summary.json"))
    n = summary["step"]
    assert summary["stopped_by"] == "time_budget" and n % 10 == 0 and 10 <= n < 100000
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == n
    records = [json.loads(l) for l in open(out / "log.jsonl")]
    assert records[-1]["step"] == n and "eval" in records[-1]
    assert [r["step"] for r in records if "loss" in r] == list(range(10, n + 1, 10))



# -----------------------------------------------------------------------------
# 3. Datasets fetched on first use, against a local HTTP server (data.py's appendix)

def idx_gz(array):
    dims = array.shape
    header = struct.pack(">I", 0x0800 | len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def cifar_tar(x_train, y_train, x_test, y_test):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, payload):
            raw = pickle.dumps(payload)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        rows = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)   # channels first, as CIFAR
        for i, part in enumerate(np.array_split(np.arange(len(x_train)), 5)):
            add(f"data_batch_{i + 1}", {b"data": rows(x_train[part]), b"labels": y_train[part].tolist()})
        add("test_batch", {b"data": rows(x_test), b"labels": y_test.tolist()})
        add("batches.meta", {b"label_names": [b"x"] * 10})
    return buf.getvalue()


def mat_v5(arrays):
    """A MATLAB v5 file with zlib-compressed matrices, as MATLAB writes SVHN's."""
    classes = {np.uint8: (9, 2), np.float64: (6, 9)}                  # (mx class, mi type)
    def el(kind, data):
        return struct.pack("<II", kind, len(data)) + data + b"\0" * (-len(data) % 8)
    out = (b"MATLAB 5.0 MAT-file, written by test_gpicl".ljust(116) + b"\0" * 8 +
           struct.pack("<H", 0x0100) + b"IM")
    for name, a in arrays.items():
        mx, mi = classes[a.dtype.type]
        body = (el(6, struct.pack("<II", mx, 0)) + el(5, struct.pack(f"<{a.ndim}i", *a.shape)) +
                el(1, name.encode()) + el(mi, a.tobytes(order="F")))
        packed = zlib.compress(el(14, body))
        out += struct.pack("<II", 15, len(packed)) + packed               # not padded at top level
    return out


def fake_dataset(name, rng):
    """Small files in the real format of each download, and the arrays they hold."""
    shape = (28, 28) if name in ("fashion_mnist", "kmnist") else (32, 32, 3)
    x_tr, x_te = (rng.integers(0, 256, (n, *shape), dtype=np.uint8) for n in (50, 20))
    y_tr, y_te = (rng.integers(0, 10, n).astype(np.uint8) for n in (50, 20))
    if name in ("fashion_mnist", "kmnist"):
        names = list(data.DOWNLOADS[name][1])
        files = dict(zip(names, (idx_gz(x_tr), idx_gz(y_tr), idx_gz(x_te), idx_gz(y_te))))
    elif name == "cifar10":
        files = {"cifar-10-python.tar.gz": cifar_tar(x_tr, y_tr, x_te, y_te)}
    else:  # svhn: X (32, 32, 3, N) uint8, y (N, 1) double with 10 for the digit 0
        mat = lambda x, y: mat_v5({"X": x.transpose(1, 2, 3, 0).copy(),
                                   "y": np.where(y == 0, 10, y).astype(np.float64)[:, None]})
        files = {"train_32x32.mat": mat(x_tr, y_tr), "test_32x32.mat": mat(x_te, y_te)}
    return files, (x_tr, y_tr, x_te, y_te)


class Server:
    """Serves {root}/{name}/{file} on 127.0.0.1; paths under /cut/ drop the connection midway."""
    def __init__(self, root):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.startswith("/cut/"):
                    body = open(os.path.join(root, self.path[5:]), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                super().do_GET()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Every download dataset, faked, served locally, with its checksums."""
    rng = np.random.default_rng(0)
    root, truth = tmp_path / "www", {}
    for name in data.DOWNLOADS:
        files, truth[name] = fake_dataset(name, rng)
        (root / name).mkdir(parents=True)
        for f, raw in files.items():
            (root / name / f).write_bytes(raw)
        md5s = {f: hashlib.md5(raw).hexdigest() for f, raw in files.items()}
        monkeypatch.setitem(data.DOWNLOADS, name, (data.DOWNLOADS[name][0], md5s))
    server = Server(root)
    monkeypatch.setenv("GPICL_MIRROR", server.url)
    yield server, root, truth
    server.close()


@pytest.mark.parametrize("name", list(data.DOWNLOADS))
def test_download_verifies_converts_and_caches(name, served, tmp_path):
    server, root, (truth) = served
    cache = tmp_path / "cache"
    path = data.fetch_dataset(name, str(cache))
    d = np.load(path)
    x_tr, y_tr, x_te, y_te = truth[name]
    assert np.array_equal(d["x_train"], x_tr) and np.array_equal(d["y_train"], y_tr)
    assert np.array_equal(d["x_test"], x_te) and np.array_equal(d["y_test"], y_te)
    assert not [p for p in cache.rglob("*") if p.name.endswith((".part", ".tmp.npz"))]
    server.close()                                                       # now offline: the cache serves
    splits = data.load_dataset(name, 14, cache_dir=str(cache))
    assert splits["train"][0].shape == (50, 196) and splits["test"][0].shape == (20, 196)
    assert abs(splits["train"][0].mean().item()) < 1e-5                  # z-normalised per dataset
    assert data.available(name, str(cache))


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "cut"])
def test_bad_downloads_leave_nothing_behind(damage, served, tmp_path):
    server, root, _ = served
    f = root / "kmnist" / "t10k-labels-idx1-ubyte.gz"
    raw = f.read_bytes()
    if damage == "corrupted":
        f.write_bytes(raw[:-5] + bytes(5))
    elif damage == "truncated":
        f.write_bytes(raw[:len(raw) // 2])
    url = f"{server.url}/cut/kmnist/" if damage == "cut" else None
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="python data.py fetch kmnist"):
        data.fetch_dataset("kmnist", str(cache), base_url=url)
    kept = {p.name for p in cache.rglob("*") if p.is_file()}
    assert "t10k-labels-idx1-ubyte.gz" not in kept and not any(k.endswith(".part") for k in kept)
    assert not (cache / "kmnist.npz").exists() and not data.available("kmnist", str(cache))


def test_mat_reader_agrees_with_scipy(tmp_path):
    sio = pytest.importorskip("scipy.io")                               # optional: only where installed
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)
    y = np.arange(1, 8, dtype=np.float64)[:, None]
    sio.savemat(tmp_path / "a.mat", {"X": x, "y": y}, do_compression=True)
    got = data.read_mat(str(tmp_path / "a.mat"))
    assert np.array_equal(got["X"], x) and np.array_equal(got["y"], y)
    (tmp_path / "b.mat").write_bytes(mat_v5({"X": x, "y": y}))
    theirs = sio.loadmat(tmp_path / "b.mat")
    assert np.array_equal(theirs["X"], x) and np.array_equal(theirs["y"], y)


@pytest.mark.slow
def test_missing_dataset_is_one_line_offline(tmp_path):
    env = dict(os.environ, GPICL_DATA=str(tmp_path / "empty"), GPICL_MIRROR="http://127.0.0.1:9")
    p = subprocess.run([PY, os.path.join(HERE, "train.py"), *TINY, "--steps", "1",
                        "--eval-datasets", "fashion_mnist", "--out-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "python data.py fetch fashion_mnist" in p.stderr



# -----------------------------------------------------------------------------
# 4. The benchmark (bench.py): runs at tiny sizes, and its numbers hang together

BENCH_TINY = ["--threads", "1", "--width", "32", "--n-layer", "1", "--n-head", "2",
              "--image-size", "7", "--seq-len", "10", "--batch-size", "4",
              "--steps", "2", "--warmup", "1", "--repeats", "3"]


@pytest.mark.slow
def test_bench_runs_and_reports_consistent_numbers(tmp_path):
    out = str(tmp_path / "bench.json")
    p = subprocess.run([PY, os.path.join(HERE, "bench.py"), *BENCH_TINY, "--out", out],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
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
                       cwd=HERE, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_reference_is_our_transformer_rebuilt_from_torch_nn():
    import bench
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
    import bench
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
    p = subprocess.run([PY, os.path.join(HERE, "bench.py"), "suite", "--out", str(out), "--dry-run",
                        "--thresholds", "0,0.99"], capture_output=True, text=True, cwd=HERE,
                       timeout=300)
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
    assert all(l in log for l in p.stdout.splitlines()) and "stopped on the time budget" in log


def test_suite_stage_that_fails_or_overruns_is_recorded_and_the_suite_goes_on(tmp_path):
    import bench
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
    (["--dry-run", "--", "--width", "-3"], "train.py (the flags after --)"),
    (["--dry-run", "--", "--no-such-flag"], "unrecognized arguments"),
])
def test_suite_bad_flags_give_one_line_and_exit_2(flags, message, tmp_path, capsys):
    import bench
    out = ["--out", str(tmp_path / "s")] if flags else []
    with pytest.raises(SystemExit) as stopped:
        bench.suite([*out, *flags])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_suite_refuses_a_folder_that_holds_a_suites_files(tmp_path, capsys):
    import bench
    (tmp_path / "suite.json").write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        bench.suite(["--out", str(tmp_path), "--dry-run"])
    assert stopped.value.code == 2 and "already holds suite.json" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["suite.json"]
    assert (tmp_path / "suite.json").read_text() == "{}"                # nothing written is lost



# -----------------------------------------------------------------------------
# 5. metatest.py's command lines: csv and table1

def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def run_metatest(args, **kw):
    return subprocess.run([PY, os.path.join(HERE, "metatest.py"), "--threads", "1", *args],
                          capture_output=True, text=True, cwd=HERE, timeout=120, **kw)


@pytest.mark.slow
def test_csv_command_prints_accuracies_and_writes_predictions(tmp_path):
    X, y = blobs(["a", "b", "c"], 30, d=4, seed=3)
    rows = [[*map(str, x), lab] for x, lab in zip(X, y)]
    train = write_csv(tmp_path / "train.csv", ["f1", "f2", "label", "f3"],
                      [[r[0], r[1], r[4], r[2]] for r in rows[:60]])   # label in the middle
    test = write_csv(tmp_path / "test.csv", ["f3", "label", "f1", "f2"],      # other order
                     [[r[2], r[4], r[0], r[1]] for r in rows[60:]])
    out = tmp_path / "preds.csv"
    p = run_metatest(["csv", "--ckpt", TRAINED, "--train", train, "--test", test, "--label", "label",
                   "--out", str(out), "--members", "4"])
    assert p.returncode == 0, p.stderr
    accs = [float(a) for a in re.findall(r"\b\d\.\d{3}\b", p.stdout)]   # GPICL, kNN, logreg
    assert len(accs) == 3 and all(a > 0.8 for a in accs), p.stdout
    got = list(csv.reader(open(out)))
    assert got[0] == ["prediction", "knn_k1", "logreg", "p_a", "p_b", "p_c"] and len(got) == 31
    for col, acc in enumerate(accs):  # the file holds the predictions whose accuracy was printed
        assert abs(np.mean([g[col] == lab for g, lab in zip(got[1:], y[60:])]) - acc) < 6e-4


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing", "cannot read"), ("label", "no column 'label'"), ("text", "'x' is not a number"),
    ("binary", "not a text CSV"), ("device", "--device foo")])
def test_csv_command_errors_are_one_line_exit_2(tmp_path, case, message):
    good = write_csv(tmp_path / "good.csv", ["f1", "label"], [["1", "a"], ["2", "b"]])
    (tmp_path / "binary.csv").write_bytes(b"f1,label\n\xff\xfe\x00,a\n")
    bad = {"missing": str(tmp_path / "nope.csv"),
           "label": write_csv(tmp_path / "nolabel.csv", ["f1", "y"], [["1", "a"], ["2", "b"]]),
           "text": write_csv(tmp_path / "text.csv", ["f1", "label"], [["1", "a"], ["x", "b"]]),
           "binary": str(tmp_path / "binary.csv"), "device": good}[case]
    device = ["--device", "foo"] if case == "device" else []
    p = run_metatest([*device, "csv", "--ckpt", TRAINED, "--train", bad, "--test", good,
                      "--label", "label", "--out", str(tmp_path / "p.csv")])
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_metatesting_reads_a_checkpoint_s_channels(tmp_path):
    # a learner trained with --channels 3 reads 3 x size^2 inputs: Table 1 and the UCI digits
    # comparison must feed it those, not the grayscale default
    ckpt = tiny_checkpoint(tmp_path / "c3.pt", width=16, n_layer=1, n_head=2, channels=3)
    metatest.table1([ckpt], eval_tasks=2, eval_seqs=4, out_dir=str(tmp_path))
    row = json.load(open(tmp_path / "table1.json"))["checkpoints"][0]["accuracy_pct"]
    assert row["MNIST"]["n"] == 8 and row["UCI digits"]["n"] == 8
    acc = metatest.compare_on_uci_digits(ckpt, splits=1, n_context=9, n_queries=5, members=2)
    assert 0 <= acc["GPICL image path, 2 tasks"][0] <= 1


@pytest.mark.slow
def test_table1_reports_missing_datasets_and_writes_the_right_values(tmp_path):
    def always_label_3(model):  # a learner whose accuracy the test can count by itself
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10) * 5.0)
    const = tiny_checkpoint(tmp_path / "const.pt", width=16, n_layer=1, n_head=2, tweak=always_label_3)
    sgd = tiny_checkpoint(tmp_path / "sgd.pt", kind="sgd", width=8)       # no parameters at all
    env = dict(os.environ, GPICL_DATA=str(tmp_path / "empty"), GPICL_MIRROR="http://127.0.0.1:9")
    p = run_metatest(["table1", const, sgd, "--tasks", "4", "--seqs", "8", "--out-dir",
                   str(tmp_path / "out")], env=env)
    assert p.returncode == 0, p.stderr
    md = open(tmp_path / "out" / "table1.md").read()
    res = json.load(open(tmp_path / "out" / "table1.json"))
    assert "| GPICL Transformer (paper) | 73.70 | 62.24 | 53.39 | 100.00 | 19.40 | 14.58 |" in md
    for name in ("fashion_mnist", "kmnist", "cifar10", "svhn"):
        assert f"missing — fetch with `python data.py fetch {name}`" in md
    row = res["checkpoints"][0]["accuracy_pct"]
    assert row["KMNIST"] == {"missing": "fetch with `python data.py fetch kmnist`"}
    # the expected accuracy: how often the label at position 10 of each unseen-task sequence is 3
    ids = data.unseen_task_ids(4).repeat_interleave(8)
    for column, name in (("MNIST", "mnist"), ("Random", "random"), ("UCI digits", "uci_digits")):
        x_all, y_all = data.load_dataset(name, 2)["test"]
        _, y = data.task_sequences(x_all, y_all, ids, 10, torch.arange(32), gpicl.EVAL_SEED)
        expect = 100 * (y[:, -1] == 3).float().mean().item()
        assert row[column]["n"] == 32 and abs(row[column]["acc"] - expect) < 0.01, (column, row)
        assert f"{row[column]['acc']:.2f} ± {row[column]['ci']:.2f}" in md
    # the sgd learner's column: its own predictions at position 10, counted here
    sgd_row, (model, _) = res["checkpoints"][1], gpicl.load_learner(sgd)
    x_all, y_all = data.load_dataset("random", 2)["test"]
    x, y = data.task_sequences(x_all, y_all, ids, 10, torch.arange(32), gpicl.EVAL_SEED)
    expect = 100 * (gpicl.learner_predict(model, x, y)[:, -1] == y[:, -1]).float().mean().item()
    assert sgd_row["learner"] == "sgd"
    assert abs(sgd_row["accuracy_pct"]["Random"]["acc"] - expect) < 0.01, (expect, sgd_row)



# -----------------------------------------------------------------------------
# 6. Every command line, fuzzed: a bad value for any flag is refused in one line, exit 2 (1 for a
# fault at run time), never a traceback, and before any expensive work starts

class ReachedWork(Exception):
    """Raised where a command's expensive work would start: its command line was accepted."""


def reach_work(*args, **kwargs):
    raise ReachedWork


NUMBERS = ["-1", "0", "-0", "1.5", "nan", "inf", "-inf", "1e400", "1e308", "-1e-320", "", " ", "abc",
           "0x10", "2**70", "1_0", "\0", "\u0663", str(2 ** 31), str(2 ** 63), str(10 ** 40)]


TEXTS = ["", " ", "\0", "-1", "nan", "x" * 1000, "\u00e9", "cuda:99", "../..", "/"]


PATH_KINDS = {"ckpt": "in", "ckpts": "in", "train": "in", "test": "in", "out": "out",
              "out_dir": "dir", "data_dir": "dir"}  # flags (by dest) that name files: which kind


def bad_paths(tmp_path, rng):
    """Paths no flag of their kind may take: files to read, files to write, folders to write in."""
    d = tmp_path / "paths"
    d.mkdir()
    (d / "a_folder").mkdir()
    (d / "a_file").write_text("x\n")
    (d / "empty").write_bytes(b"")
    (d / "garbage").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "cut.pt").write_bytes(open(tiny_checkpoint(d / "tiny.pt", width=8, n_layer=1, n_head=2),
                                    "rb").read()[:3000])
    torch.save({"model": MakesAFile(str(tmp_path / "pickle_ran"))}, d / "evil.pt")
    (d / "locked").write_bytes(b"x")
    os.chmod(d / "locked", 0)                           # unreadable, unless the tests run as root
    unusable = ["", "\0", "a\0b", str(d / "a_file" / "x"), str(d / ("x" * 300))]
    return {"in": unusable + [str(d / n) for n in ("missing", "a_folder", "empty", "garbage",
                                                   "cut.pt", "evil.pt", "locked")] + ["/dev/null"],
            "out": unusable + [str(d / "a_folder")], "dir": unusable + [str(d / "a_file")]}


def fuzz_values(action, rng, paths):
    """[(value, refused by definition)] for one flag or positional: fixed bad values and seeded
    random ones. A value is refused by definition when the flag's own type or choices refuse it,
    or when it names a path the flag cannot use; others (--lr 1e308) may run, never crash."""
    if action.dest in PATH_KINDS:
        return [(p, True) for p in paths[PATH_KINDS[action.dest]]]
    chars = list(string.printable + "\u00e9\u00df\u221e\u200b")
    randoms = [str(-int(rng.integers(1, 10))),                          # negative
               str(int(rng.choice([-1, 1])) * 2 ** int(rng.integers(31, 130))),  # beyond any size
               f"{rng.normal():.3f}e{int(rng.integers(-400, 400))}",    # tiny, huge, or inf
               "".join(rng.choice(chars, int(rng.integers(0, 12))))]    # garbage
    values = (NUMBERS if action.type else TEXTS) + randoms

    def refused(v):
        if action.choices is not None:
            return v not in action.choices
        try:
            action.type and action.type(v)
            return False
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return True
    return [(v, refused(v)) for v in values]


def fuzz_targets(tmp_path):
    """[(name, main, the parser whose flags are fuzzed, flags at the 'start' or 'end' of argv, a
    valid argv, {positional: its index in it}, the expensive work to stub)]"""
    import bench
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", width=8, n_layer=1, n_head=2)
    X, y = blobs(["a", "b"], 10, d=3)
    rows = [[*map(str, x), lab] for x, lab in zip(X, y)]
    context = write_csv(tmp_path / "context.csv", ["f1", "f2", "f3", "label"], rows[:12])
    queries = write_csv(tmp_path / "queries.csv", ["f1", "f2", "f3", "label"], rows[12:])
    csv_argv = ["csv", "--ckpt", ckpt, "--train", context, "--test", queries, "--label", "label",
                "--out", str(tmp_path / "preds.csv"), "--members", "1"]
    mt = metatest.get_parser()
    sub = next(a for a in mt._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [
        ("train.py", train.main, configurator.get_parser(), "end",
         [*TINY, "--steps", "1", "--out-dir", str(tmp_path / "run")], {}, [(data, "load_dataset")]),
        ("bench.py", bench.main, bench.get_parser(), "end",
         [*BENCH_TINY, "--out", str(tmp_path / "bench.json")], {}, [(data, "load_dataset")]),
        ("metatest.py", metatest.main, mt, "start", csv_argv, {"command": 0}, []),
        ("metatest.py csv", metatest.main, sub["csv"], "end", csv_argv, {}, []),  # cheap: runs
        ("metatest.py uci", metatest.main, sub["uci"], "end",
         ["uci", "--ckpt", ckpt, "--splits", "1", "--members", "1", "--context", "5", "--queries", "5"],
         {}, [(metatest, "compare_on_uci_digits")]),
        ("metatest.py table1", metatest.main, sub["table1"], "end",
         ["table1", ckpt, "--tasks", "1", "--seqs", "1", "--out-dir", str(tmp_path / "t1")],
         {"ckpts": 1}, [(metatest, "table1")]),
        ("experiments.py", experiments.main, experiments.get_parser(), "end",
         ["transitions", "--out", str(tmp_path / "exp.jsonl")], {"name": 0}, [(experiments, "run_all")]),
        ("data.py", data.main, data.get_parser(), "end",
         ["fetch", "svhn", "--data-dir", str(tmp_path / "cache")], {"command": 0, "names": 1},
         [(data, "fetch")]),                                              # the network
    ]


class TookTooLong(BaseException):  # not an Exception: no `except Exception` swallows it
    pass


def run_case(main, argv, capsys, seconds=20):
    """main(argv) in this process -> (its exit status, "work", "done", a traceback, or that it
    hangs: say a count refused nowhere, so a loop runs for ever; its stderr)."""
    def too_long(signum, frame):
        raise TookTooLong
    threads, old = torch.get_num_threads(), signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        main(argv)
        outcome = "done"
    except ReachedWork:
        outcome = "work"
    except SystemExit as e:
        outcome = e.code
    except TookTooLong:
        outcome = f"still running after {seconds} s"
    except Exception:
        outcome = traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        torch.set_num_threads(threads)                                    # --threads sets it
    return outcome, capsys.readouterr().err


def test_fuzz_every_flag_of_every_command_one_line_never_a_traceback(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    paths, targets = bad_paths(tmp_path, rng), fuzz_targets(tmp_path)
    for module, name in [stub for t in targets for stub in t[-1]]:
        monkeypatch.setattr(module, name, reach_work)
    cases, problems = 0, []
    for name, main, parser, where, base, positions, stubs in targets:
        outcome, err = run_case(main, base, capsys)
        # the valid line is accepted, and stops where its expensive work starts (where there is
        # some): a bad value that reached that point unrefused would have done the work
        assert outcome == ("work" if stubs else "done"), (name, base, outcome, err)
        for action in parser._actions:  # every flag it has, today's and tomorrow's
            if action.nargs == 0:                                         # --help, --resume, ...
                continue
            assert action.option_strings or action.dest in positions, f"fuzz {name}'s {action.dest}"
            for value, refuse in fuzz_values(action, rng, paths):
                if action.option_strings:
                    flag = f"{action.option_strings[-1]}={value}"
                    argv = [flag, *base] if where == "start" else [*base, flag]
                else:
                    argv = [value if i == positions[action.dest] else a for i, a in enumerate(base)]
                outcome, err = run_case(main, argv, capsys)
                cases += 1
                lines = err.strip().splitlines()
                if outcome in ("work", "done"):
                    ok = not refuse
                else:
                    ok = outcome in (1, 2) and len(lines) == 1 and "Traceback" not in err
                if not ok:
                    problems.append(f"{name} {action.dest}={value[:40]!r}: "
                                    f"{str(outcome).strip()[-300:]} | stderr {err[-300:]!r}")
    assert not problems, f"{len(problems)} of {cases} cases:\n" + "\n".join(problems[:40])
    assert not (tmp_path / "pickle_ran").exists()                      # no checkpoint ran code
    print(f"{cases} cases")


@pytest.mark.parametrize("prog", ["train", "bench"])
def test_out_of_memory_is_one_line_and_exit_1(prog, tmp_path, monkeypatch, capsys):
    import bench

    def allocate(*a, **k):  # what torch's CPU allocator raises for a learner too large to build
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 2199023255552 bytes.")
    monkeypatch.setattr(models, "build", allocate)
    main, argv = ((train.main, [*TINY, "--out-dir", str(tmp_path / "r")]) if prog == "train"
                  else (bench.main, BENCH_TINY))
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}.py: error: out of memory (can't allocate memory: you tried "
                          "to allocate 2199023255552 bytes.)")



# -----------------------------------------------------------------------------
# 7. Reproducing the findings (experiments.py): the sweep runner, the plateau rule, the figures

EXP_TINY = ["--device", "cpu", "--threads", "1", "--dataset", "random", "--image-size", "3",
        "--seq-len", "4", "--eval-datasets", "", "--eval-tasks", "1", "--eval-seqs", "2",
        "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--log-every", "1"]


def test_records_keep_small_flags_such_as_eps_root():
    # a record rounds its floats to stay small, but a flag of 1e-8 must not read 0
    r = experiments.rounded({"adam_eps_root": 1e-8, "loss": [2.28561, 0.0], "lr": 0.002})
    assert r == {"adam_eps_root": 1e-8, "loss": [2.2856, 0.0], "lr": 0.002}


@pytest.mark.slow
def test_sweep_writes_one_record_per_run_and_skips_finished_ones(tmp_path):
    out, runs_dir = str(tmp_path / "r.jsonl"), str(tmp_path / "runs")
    runs = [(dict(model="transformer", width=8, n_head=2, num_tasks=n), EXP_TINY) for n in (1, None)]
    # train.main, no torch start-up
    ran = experiments.run_sweep("tiny", runs, out, runs_dir, inprocess=True)
    assert sorted(ran) == sorted(experiments.run_id(p) for p, _ in runs)
    recs = experiments.read_records(out)
    assert [r["id"] for r in recs if r["params"]["num_tasks"] is None] == \
        ["model=transformer,width=8,n_head=2,num_tasks=fresh"]
    for r in recs:
        assert r["summary"]["step"] == 3 and [s for s, _ in r["loss"]] == [1, 2, 3]
        assert set(r["final"]) == {"seen random", "unseen random", "identity random"} and \
            len(r["final"]["seen random"]["curve"]) == 4
        assert r["evals"][-1]["step"] == 3 and "curve" not in r["evals"][-1]["results"]["seen random"]
    head = subprocess.run(["git", "-C", experiments.HERE, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if head:  # a git checkout (CI's clean clone is one): each record names the commit that ran
        assert all(r["commit"].split("+")[0] == head for r in recs)
    # resumable: nothing to do
    assert experiments.run_sweep("tiny", runs, out, runs_dir, inprocess=True) == []
    assert len(experiments.read_records(out)) == 2


def curve(plateau_end, n=200, every=20, low=1.0, high=math.log(10)):
    """A loss at chance until plateau_end (None: forever), then low."""
    return [[s, high if plateau_end is None or s < plateau_end else low]
            for s in range(every, every * n + 1, every)]


def test_plateau_rule():
    assert experiments.plateau_length(curve(2000)) == 2000          # a plateau of known length
    assert experiments.plateau_length(curve(None)) is None          # never escapes
    assert experiments.plateau_length(curve(0)) == 20               # no plateau: first record
    spiky = curve(None)
    spiky[50][1] = 2.0                                              # one low record is noise,
    assert experiments.plateau_length(spiky) is None                # not an escape (window 5)
    # a steady slide: the trailing mean (steps 980..1060, mean 1020) is the first 0.1 below
    slow = [[s, math.log(10) - 0.99e-4 * s] for s in range(20, 4001, 20)]
    assert experiments.plateau_length(slow) == 1060


def record(params, plateau_end, steps=4000, unseen_last=0.5, onset=None):
    res = {k: dict(first=0.1, last=unseen_last if k.startswith("unseen") else 0.9, last_ci=0.01,
                   improvement=unseen_last - 0.1, improvement_ci=0.02, n=64, curve=[0.1, unseen_last])
           for k in ("seen random", "unseen random", "unseen mnist")}
    evals = [dict(step=s, regime="x",
                  results={k: dict(v, last=0.1 if onset is None or s < onset else v["last"])
                           for k, v in res.items()})
             for s in range(200, steps + 1, 200)]
    return dict(id=experiments.run_id(params), params=params, flags=["--dataset", "random"],
                loss=curve(plateau_end), evals=evals, final=res,
                summary=dict(step=steps, regime="learning-to-learn", state_size=100,
                             parameters=1000, results=res))


def test_plateau_figure_data_fits_the_power_law():
    base = experiments.PLATEAU_BASE
    recs = [record(dict(base, batch_size=b), 20 * round(8000 * b ** -0.5 / 20), onset=2000)
            for b in (32, 128, 512)]
    recs += [record(dict(base, adam_eps_root=0.0), None), record(dict(base, bias=0.25), 200, onset=1400)]
    d = experiments.figure_data("plateaus", recs)
    assert d["batch_size"]["values"] == [32, 128, 512]
    assert d["batch_size"]["exponent"] == pytest.approx(-0.5, abs=0.01)
    assert d["adam_eps_root"]["values"] == [0.0, 1e-8] and d["adam_eps_root"]["plateau"][0] is None
    assert d["bias"]["values"] == [0.25, 0.5] and d["bias"]["plateau"] == [200, 700]
    assert d["bias"]["onset"] == [1400, 2000]
    assert d["batch_size"]["sequences"] == [p * b for p, b in zip(d["batch_size"]["plateau"],
                                                                   (32, 128, 512))]
    assert d["adam_eps_root"]["sequences"][0] is None       # censored: no plateau end, no count


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_lstm_levers_table_reads_each_run_against_the_base(scale):
    runs = experiments.lstm_levers(scale)
    ids = [experiments.run_id(p) for p, _ in runs]
    assert len(set(ids)) == len(ids) >= 6                   # at least six settings, each its own
    learner_keys = experiments.LEARNER_KEYS

    def parsed(params, flags):                               # as train.py: the preset fills the rest
        args = configurator.get_parser().parse_args(flags + experiments.flags_of(params))
        configurator.apply_preset(args)
        return vars(args)
    bases = {p["model"]: parsed(p, f) for p, f in runs if set(p) <= set(learner_keys)}
    assert set(bases) == {"lstm", "outer_lstm"}
    for params, flags in runs:                               # one lever at a time, on one base
        lever = {k for k in params if k not in learner_keys}
        args = parsed(params, flags)
        changed = {k for k, v in args.items() if v != bases[params["model"]][k]}
        assert changed <= lever and (changed or not lever), params  # the lever moves, nothing else
        if scale == "cpu":
            assert args["steps"] == 2000 and args["baselines"] == "off"
            assert args["time_budget"] > 2000 * 10, params   # no run stops on the clock
    recs = [record(dict(model="lstm", state_size=1024), None, unseen_last=0.1),
            record(dict(model="lstm", state_size=1024, lr=3e-3), 600, unseen_last=0.3)]
    rows = experiments.figure_data("lstm_levers", recs)
    assert [r["plateau"] for r in rows] == [None, 600]       # never leaves it; leaves at 600
    assert [r["last"] for r in rows] == [0.1, 0.3] and rows[1]["first"] == 0.1
    assert [(r["learner"], r["lever"]) for r in rows] == [("lstm", "base"), ("lstm", "lr=0.003")]


def test_transition_figure_data_is_a_grid():
    recs = [record(dict(model="transformer", width=w, num_tasks=n), 200,
                   unseen_last=0.1 + (n is None) * w / 100)
            for w in (16, 64) for n in (None, 4, 1)]
    d = experiments.figure_data("transitions", recs[:-1])                        # one cell missing
    g = d["transformer"]
    assert g["tasks"] == [1, 4, None] and g["widths"] == [16, 64]     # fresh sorts last
    assert g["unseen"][1] == [None, 0.1, pytest.approx(0.74)]
    assert set(g["improvement"]) == {"seen random", "unseen random", "unseen mnist"}


def with_baselines(rec, nn=(0.1, 0.3)):
    """rec with 1-NN and SGD summaries beside the learner in its final evaluation."""
    for v in rec["final"].values():
        v["baselines"] = {"1-NN": dict(v, curve=list(nn)), "SGD": dict(v, curve=[0.1, 0.2])}
    return rec


def test_learning_curve_figure_data_draws_each_baseline_once_per_set():
    recs = [with_baselines(record(dict(model="transformer", width=64), 200)),
            with_baselines(record(dict(model="lstm", width=128), 200), nn=(0.5, 0.5)),
            record(dict(model="sgd"), 200)]                                 # a run without them
    d = experiments.figure_data("learning_curves", recs)
    assert list(d["learners"]) == ["transformer d64", "lstm d128", "sgd"]
    assert d["learners"]["sgd"]["unseen random"] == [0.1, 0.5]
    assert d["baselines"]["unseen mnist"] == {"1-NN": [0.1, 0.3], "SGD": [0.1, 0.2]}  # the first
    assert experiments.figure_data("learning_curves", recs[2:])["baselines"] == {}


def test_plotting_before_any_results_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experiments.main(["transitions", "--plot", "--out", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "run `python experiments.py transitions`" in err[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("error::UserWarning")  # e.g. a legend on a panel with nothing in it
@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_figures_draw(name, tmp_path):
    pytest.importorskip("matplotlib")
    base = experiments.PLATEAU_BASE
    recs = {"plateaus": [record(dict(base, batch_size=b), 1000 // b * 20) for b in (16, 32)] +
                        [record(dict(base, bias=0.0), None)],
            "transitions": [record(dict(model="mlp", width=w, num_tasks=n), 200)
                            for w in (8, 16) for n in (1, None)],
            "state_size": [record(dict(model=m, width=8), 200) for m in ("lstm", "transformer")],
            "learning_curves": [with_baselines(record(dict(model="sgd"), 200))],
            "lstm_levers": [record(dict(model="lstm", state_size=1024, **lever), end)
                            for lever, end in (({}, None), (dict(lr=3e-3), 400))]}[name]
    path = experiments.plot(name, recs, str(tmp_path / f"{name}.png"))
    assert os.path.getsize(path) > 1000


def test_plateau_stop_rule_waits_for_both_ends_and_the_margin():
    stop = experiments.plateau_stop("random", margin=300)
    rec = record(dict(batch_size=32), 2000, steps=4000, onset=2400)
    log = lambda upto: ([dict(step=s, loss=l) for s, l in rec["loss"] if s <= upto] +
                        [dict(step=e["step"], eval=e["results"]) for e in rec["evals"]
                         if e["step"] <= upto])
    assert not stop(log(2200))          # the loss has escaped, unseen accuracy not yet
    assert not stop(log(2680))          # both have, but only 280 steps ago
    assert stop(log(2700))
    never = record(dict(batch_size=32), 2000, steps=4000, onset=None)
    never["evals"] = [dict(e, results={k: dict(v, last=0.1) for k, v in e["results"].items()})
                      for e in never["evals"]]
    assert not stop([dict(step=s, loss=l) for s, l in never["loss"]] +
                    [dict(step=e["step"], eval=e["results"]) for e in never["evals"]])


def test_experiments_run_figure_draws_a_tiny_log_with_its_baselines(tmp_path):
    pytest.importorskip("matplotlib")
    curve = lambda a: dict(curve=[0.1, a], last=a, first=0.1)
    ev = {"unseen mnist": dict(curve(0.6), baselines={"1-NN": curve(0.5), "SGD": curve(0.3)}),
          "seen mnist": curve(0.9), "unseen random": curve(0.8)}
    records = [dict(step=50, loss=2.3), dict(step=100, loss=1.5), dict(step=100, eval=ev)]
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    d = experiments.run_figure_data(records)
    assert d["loss"] == [(50, 2.3), (100, 1.5)] and d["by_step"] == [(100, 0.6)]
    assert list(d["curves"]) == ["unseen mnist", "unseen random"]         # unseen sets only
    assert d["curves"]["unseen mnist"] == {"learner": [0.1, 0.6], "1-NN": [0.1, 0.5],
                                           "SGD": [0.1, 0.3]}
    experiments.main(["run", str(tmp_path)])
    png = open(tmp_path / "curves.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with open(tmp_path / "log.jsonl", "w") as f:                          # no evaluation yet
        f.write(json.dumps(records[0]) + "\n")
    with pytest.raises(SystemExit) as e:
        experiments.main(["run", str(tmp_path), "--out", str(tmp_path / "b.png")])
    assert e.value.code == 2


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_sweep_names_its_preset_and_its_layout(scale):
    # without --preset a sweep would inherit the machine's (paper on a GPU, cpu elsewhere)
    for name, sweep in experiments.EXPERIMENTS.items():
        for params, flags in sweep(scale):
            args = configurator.get_parser().parse_args(flags + experiments.flags_of(params))
            assert args.preset == ("cpu" if scale == "cpu" else "paper"), (name, params)
            configurator.apply_preset(args)
            if scale == "gpu":  # 16 task slots at batch 128 as the authors', not 128 / 32 = 4
                assert args.seqs_per_task == 8, (name, params)


def test_state_size_sweep_moves_state_and_parameters_apart():
    # paper 4.2: to tell the state from the parameters, the sweep needs a pair of learners of
    # one kind where the one with more state has fewer parameters, and learners of about one
    # state with far apart parameter counts; built as train.py builds them
    built = []
    for params, flags in experiments.state_size("cpu"):
        args = configurator.get_parser().parse_args(flags + experiments.flags_of(params))
        configurator.apply_preset(args)
        n_in = args.image_size ** 2 + 10
        sizes = models.learner_sizes(args.model, n_in, args.seq_len, width=args.width,
                                     n_layer=args.n_layer, n_head=args.n_head,
                                     state_size=args.state_size, key_size=args.key_size)
        m = models.build(args.model, n_in, 10, **sizes)
        built.append((args.model, m.state_size(args.seq_len), models.num_params(m)))
    tf = [(s, p) for k, s, p in built if k == "transformer"]
    assert any(s1 >= 4 * s2 and 4 * p1 <= p2 for s1, p1 in tf for s2, p2 in tf)
    assert len({s for s, _ in tf}) >= 3                         # the state at three sizes at least
    lstm = [(s, p) for k, s, p in built if k == "lstm"]
    # and an LSTM with less state than a Transformer and ten times its parameters
    assert any(s_l < s_t and p_l > 10 * p_t for s_t, p_t in tf for s_l, p_l in lstm)
