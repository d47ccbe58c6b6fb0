"""
findings.py: the sweeps (what each runs, and that it runs what its records say), the runner, the
plateau rule, the figures' numbers and the figures.
"""
import json
import math
import os
import struct
import subprocess
import sys

import pytest

import data
import findings
import models
import train
from conftest import ROOT

TINY = ["--device", "cpu", "--threads", "1", "--dataset", "random", "--image-size", "3",
        "--seq-len", "4", "--eval-datasets", "", "--eval-tasks", "1", "--eval-seqs", "2",
        "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--log-every", "1"]


def resolved(params, flags):
    """A sweep's run as train.py reads it: its flags, then the preset fills what is unset."""
    args = train.get_parser().parse_args(flags + findings.flags_of(params))
    train.apply_preset(args)
    return vars(args)


# -----------------------------------------------------------------------------
# The sweeps

# What each cpu sweep's docstring says it runs, flag by flag (a swept value overrides these)
CPU_RECIPE = dict(preset="cpu", device="cpu", threads=1, dataset="mnist", image_size=7,
                  seq_len=100, num_tasks=data.FRESH, bias=0.5, seqs_per_task=1, eval_tasks=16,
                  eval_seqs=32, log_every=20, eval_datasets="uci_digits")
TRANSFORMER_RECIPE = dict(CPU_RECIPE, n_layer=2, n_head=4, key_size=32, batch_size=128,
                          lr=2e-3, warmup=100, adam_eps_root=0.0, time_budget=None)
RECIPES = {
    "transitions": dict(TRANSFORMER_RECIPE, steps=3000, schedule="wsd", eval_every=1000,
                        baselines="off"),
    "state_size": dict(TRANSFORMER_RECIPE, steps=3000, schedule="wsd", eval_every=1000,
                       baselines="off"),
    "plateaus": dict(TRANSFORMER_RECIPE, width=64, steps=4000, schedule="constant",
                     eval_every=250, eval_datasets="", baselines="off"),
    "lstm_levers": dict(CPU_RECIPE, batch_size=64, lr=1e-3, warmup=0, schedule="constant",
                        steps=2000, time_budget=10 * 3600, eval_every=500, baselines="off"),
    "window": dict(TRANSFORMER_RECIPE, steps=3000, schedule="wsd", eval_every=1000,
                   baselines="off", width=128, num_tasks=data.FRESH),
}
# the other learners of the state-size sweep, on the cpu preset's 13-minute budget
OTHER_LEARNER_RECIPE = dict(CPU_RECIPE, batch_size=64, lr=1e-3, warmup=0, schedule="constant",
                            steps=20_000, time_budget=13 * 60, eval_every=1000, baselines="off")


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_cpu_sweep_runs_the_recipe_its_docstring_states(name):
    for params, flags in findings.EXPERIMENTS[name]("cpu"):
        args = resolved(params, flags)
        other = name == "state_size" and params["model"] != "transformer"
        expect = dict(OTHER_LEARNER_RECIPE if other else RECIPES[name],
                      **{k: data.FRESH if v is None else v for k, v in params.items()})
        assert {k: args[k] for k in expect} == expect, (name, params)


def test_the_learning_curves_sweep_runs_the_cpu_preset_as_it_is():
    # `python train.py --model M` on a CPU, every flag from the preset
    for params, flags in findings.learning_curves("cpu"):
        plain = resolved(params, ["--device", "cpu"])
        assert resolved(params, flags) == dict(plain, preset="cpu", log_every=50), params


def test_every_gpu_sweep_runs_the_paper_preset_in_16_task_slots_of_128_sequences():
    # without --preset a sweep would inherit the machine's (paper on a GPU, cpu elsewhere)
    for name, sweep in findings.EXPERIMENTS.items():
        for params, flags in sweep("gpu"):
            args = resolved(params, flags)
            assert (args["preset"], args["image_size"], args["seq_len"], args["steps"]) == \
                ("paper", 14, 100, 50_000), (name, params)
            if "batch_size" not in params:  # the authors' 16 slots at batch 128, not 128 / 32 = 4
                assert (args["batch_size"], args["seqs_per_task"]) == (128, 8), (name, params)


# the sweeps with results recorded so far (a new sweep has none until its first run ends)
RECORDED = [n for n in findings.EXPERIMENTS if os.path.exists(os.path.join(ROOT, "results",
                                                                            f"{n}.jsonl"))]


@pytest.mark.parametrize("name", RECORDED)
def test_every_recorded_run_is_one_its_sweep_runs_today_with_the_same_flags(name):
    # the results files are the sweeps' memory: a run whose id is recorded is skipped, so each
    # id must still be one of the sweep's, and what it ran must be what the sweep runs now
    today = {findings.run_id(p): (p, f) for p, f in findings.EXPERIMENTS[name]("cpu")}
    records = findings.read_records(os.path.join(ROOT, "results", f"{name}.jsonl"))
    assert records and {r["id"] for r in records} <= set(today)
    for r in records:
        then, now = resolved(r["params"], r["flags"]), resolved(*today[r["id"]])
        changed = {k for k in then if then[k] != now[k]}
        if r["summary"]["stopped_by"] == "steps":  # a budget the run never reached changed nothing
            changed -= {"time_budget"}
        assert not changed, (r["id"], {k: (then[k], now[k]) for k in changed})


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_lstm_levers_table_reads_each_run_against_the_base(scale):
    runs = findings.lstm_levers(scale)
    ids = [findings.run_id(p) for p, _ in runs]
    assert len(set(ids)) == len(ids) >= 6                   # at least six settings, each its own
    bases = {p["model"]: resolved(p, f) for p, f in runs if set(p) <= set(findings.LEARNER_KEYS)}
    assert set(bases) == {"lstm", "outer_lstm"}
    for params, flags in runs:                               # one lever at a time, on one base
        lever = {k for k in params if k not in findings.LEARNER_KEYS}
        args = resolved(params, flags)
        changed = {k for k, v in args.items() if v != bases[params["model"]][k]}
        assert changed <= lever and (changed or not lever), params  # the lever moves, nothing else
        if scale == "cpu":
            assert args["steps"] == 2000 and args["baselines"] == "off"
            assert args["time_budget"] > 2000 * 10, params   # no run stops on the clock
    recs = [record(dict(model="lstm", state_size=1024), None, unseen_last=0.1),
            record(dict(model="lstm", state_size=1024, lr=3e-3), 600, unseen_last=0.3)]
    rows = findings.figure_data("lstm_levers", recs)
    assert [r["plateau"] for r in rows] == [None, 600]       # never leaves it; leaves at 600
    assert [r["last"] for r in rows] == [0.1, 0.3] and rows[1]["first"] == 0.1
    assert rows[1]["gain"] == pytest.approx(0.2) and rows[1]["state_size"] == 100
    assert [(r["learner"], r["lever"]) for r in rows] == [("lstm", "base"), ("lstm", "lr=0.003")]


def test_state_size_sweep_moves_state_and_parameters_apart():
    # paper 4.2: to tell the state from the parameters, the sweep needs a pair of learners of
    # one kind where the one with more state has fewer parameters, and learners of about one
    # state with far apart parameter counts; built as train.py builds them
    built = []
    for params, flags in findings.state_size("cpu"):
        args = resolved(params, flags)
        n_in = args["image_size"] ** 2 + 10
        sizes = models.learner_sizes(args["model"], n_in, args["seq_len"], width=args["width"],
                                     n_layer=args["n_layer"], n_head=args["n_head"],
                                     state_size=args["state_size"], key_size=args["key_size"])
        m = models.build(args["model"], n_in, 10, **sizes)
        built.append((args["model"], m.state_size(args["seq_len"]), models.num_params(m)))
    tf = [(s, p) for k, s, p in built if k == "transformer"]
    assert any(s1 >= 4 * s2 and 4 * p1 <= p2 for s1, p1 in tf for s2, p2 in tf)
    assert len({s for s, _ in tf}) >= 3                         # the state at three sizes at least
    lstm = [(s, p) for k, s, p in built if k == "lstm"]
    # and an LSTM with less state than a Transformer and ten times its parameters
    assert any(s_l < s_t and p_l > 10 * p_t for s_t, p_t in tf for s_l, p_l in lstm)


# -----------------------------------------------------------------------------
# The runner

def test_records_keep_small_flags_such_as_eps_root():
    # a record rounds its floats to stay small, but a flag of 1e-8 must not read 0
    r = findings.rounded({"adam_eps_root": 1e-8, "loss": [2.28561, 0.0], "lr": 0.002})
    assert r == {"adam_eps_root": 1e-8, "loss": [2.2856, 0.0], "lr": 0.002}


@pytest.mark.slow
def test_sweep_writes_one_record_per_run_and_skips_finished_ones(tmp_path):
    out, runs_dir = str(tmp_path / "r.jsonl"), str(tmp_path / "runs")
    items = [("tiny", "cpu", out, runs_dir, dict(model="transformer", width=8, n_head=2, num_tasks=n),
              TINY, None) for n in (1, None)]
    ran = findings.run_all(items, inprocess=True)                   # train.main, no torch start-up
    assert sorted(ran) == sorted(findings.run_id(it[4]) for it in items)
    recs = findings.read_records(out)
    assert [r["id"] for r in recs if r["params"]["num_tasks"] is None] == \
        ["model=transformer,width=8,n_head=2,num_tasks=fresh"]
    for r in recs:
        assert r["summary"]["step"] == 3 and [s for s, _ in r["loss"]] == [1, 2, 3]
        assert set(r["final"]) == {"seen random", "unseen random", "identity random"} and \
            len(r["final"]["seen random"]["curve"]) == 4
        assert r["evals"][-1]["step"] == 3 and "curve" not in r["evals"][-1]["results"]["seen random"]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if head:  # a git checkout (CI's clean clone is one): each record names the commit that ran
        assert all(r["commit"].split("+")[0] == head for r in recs)
    # resumable: nothing to do
    assert findings.run_all(items, inprocess=True) == []
    assert len(findings.read_records(out)) == 2


# -----------------------------------------------------------------------------
# The plateau rule

def curve(plateau_end, n=200, every=20, low=1.0, high=math.log(10)):
    """A loss at chance until plateau_end (None: forever), then low."""
    return [[s, high if plateau_end is None or s < plateau_end else low]
            for s in range(every, every * n + 1, every)]


def test_plateau_rule():
    assert findings.plateau_length(curve(2000)) == 2000          # a plateau of known length
    assert findings.plateau_length(curve(None)) is None          # never escapes
    assert findings.plateau_length(curve(0)) == 20               # no plateau: first record
    spiky = curve(None)
    spiky[50][1] = 2.0                                           # one low record is noise,
    assert findings.plateau_length(spiky) is None                # not an escape (window 5)
    # a steady slide: the trailing mean (steps 980..1060, mean 1020) is the first 0.1 below
    slow = [[s, math.log(10) - 0.99e-4 * s] for s in range(20, 4001, 20)]
    assert findings.plateau_length(slow) == 1060


def record(params, plateau_end, steps=4000, unseen_last=0.5, onset=None):
    res = {k: dict(first=0.1, last=unseen_last if k.startswith("unseen") else 0.9, last_ci=0.01,
                   improvement=unseen_last - 0.1, improvement_ci=0.02, n=64, curve=[0.1, unseen_last])
           for k in ("seen random", "unseen random", "unseen mnist")}
    evals = [dict(step=s, regime="x",
                  results={k: dict(v, last=0.1 if onset is None or s < onset else v["last"])
                           for k, v in res.items()})
             for s in range(200, steps + 1, 200)]
    return dict(id=findings.run_id(params), params=params, flags=["--dataset", "random"],
                loss=curve(plateau_end), evals=evals, final=res,
                summary=dict(step=steps, regime="learning-to-learn", state_size=100,
                             parameters=1000, results=res))


def test_plateau_stop_rule_waits_for_both_ends_and_the_margin():
    stop = findings.plateau_stop("random", margin=300)
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


# -----------------------------------------------------------------------------
# The figures: their numbers (pure), then drawn

def test_plateau_figure_data_fits_the_power_law():
    base = findings.PLATEAU_BASE
    recs = [record(dict(base, batch_size=b), 20 * round(8000 * b ** -0.5 / 20), onset=2000)
            for b in (32, 128, 512)]
    recs += [record(dict(base, adam_eps_root=0.0), None), record(dict(base, bias=0.25), 200, onset=1400)]
    d = findings.figure_data("plateaus", recs)
    assert d["batch_size"]["values"] == [32, 128, 512]
    assert d["batch_size"]["exponent"] == pytest.approx(-0.5, abs=0.01)
    assert d["batch_size"]["intercept"] == pytest.approx(math.log(8000), abs=0.05)  # the line
    assert d["adam_eps_root"]["values"] == [0.0, 1e-8] and d["adam_eps_root"]["plateau"][0] is None
    assert d["bias"]["values"] == [0.25, 0.5] and d["bias"]["plateau"] == [200, 700]
    assert d["bias"]["onset"] == [1400, 2000]
    assert d["batch_size"]["sequences"] == [p * b for p, b in zip(d["batch_size"]["plateau"],
                                                                   (32, 128, 512))]
    assert d["adam_eps_root"]["sequences"][0] is None       # censored: no plateau end, no count


def test_transition_figure_data_is_a_grid():
    recs = [record(dict(model="transformer", width=w, num_tasks=n), 200,
                   unseen_last=0.1 + (n is None) * w / 100)
            for w in (16, 64) for n in (None, 4, 1)]
    d = findings.figure_data("transitions", recs[:-1])                        # one cell missing
    g = d["transformer"]
    assert g["tasks"] == [1, 4, None] and g["widths"] == [16, 64]     # fresh sorts last
    assert g["unseen"][1] == [None, 0.1, pytest.approx(0.74)]
    assert set(g["improvement"]) == {"seen random", "unseen random", "unseen mnist"}


def with_baselines(rec, nn=(0.1, 0.3)):
    """rec with 1-NN and SGD summaries beside the learner in its final evaluation."""
    for v in rec["final"].values():
        v["baselines"] = {"1-NN": dict(v, curve=list(nn)), "SGD": dict(v, curve=[0.1, 0.2])}
    return rec


def test_learning_curve_figure_data_draws_each_baseline_and_sgd_once_per_set():
    recs = [with_baselines(record(dict(model="transformer", width=64), 200)),
            with_baselines(record(dict(model="lstm", state_size=100), 200), nn=(0.5, 0.5)),
            record(dict(model="sgd"), 200)]                                 # a run without them
    d = findings.figure_data("learning_curves", recs)
    # the SGD run is SGD the baseline: drawn once, as the baseline; the LSTM says which it is
    assert list(d["learners"]) == ["Transformer 64 wide, state 100",
                                   "LSTM, state 100 (not the preset's 64-wide)"]
    assert d["learners"]["LSTM, state 100 (not the preset's 64-wide)"]["unseen random"] == [0.1, 0.5]
    assert d["baselines"]["unseen mnist"] == {"1-NN": [0.1, 0.3], "SGD": [0.1, 0.2]}  # the first
    alone = findings.figure_data("learning_curves", recs[2:])
    assert alone["baselines"] == {} and list(alone["learners"]) == ["SGD (no meta-training)"]


def test_plotting_before_any_results_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        findings.main(["transitions", "--plot", "--out", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "run `python experiments/findings.py transitions`" in err[0]


def fake_records(name):
    """A few records of experiment `name`, as its sweep writes them."""
    base = findings.PLATEAU_BASE
    return {"plateaus": [record(dict(base, batch_size=b), 1000 // b * 20) for b in (16, 32)] +
                        [record(dict(base, bias=0.0), None)],
            "transitions": [record(dict(model="mlp", width=w, num_tasks=n), 200)
                            for w in (8, 16) for n in (1, None)],
            "state_size": [record(dict(model=m, width=8), 200) for m in ("lstm", "transformer")],
            "learning_curves": [with_baselines(record(dict(model="sgd"), 200))],
            "lstm_levers": [record(dict(model="lstm", state_size=1024, **lever), end)
                            for lever, end in (({}, None), (dict(lr=3e-3), 400))],
            "window": [record(dict(model="transformer", width=8, window=w), 200)
                       for w in (1, 4)]}[name]


def png_size_and_dpi(path):
    """A PNG's pixel size (its IHDR chunk) and the dpi its pHYs chunk records (None without)."""
    png = open(path, "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    size = struct.unpack(">II", png[16:24])
    at = png.find(b"pHYs")
    if at < 0:
        return size, None
    x, y, unit = struct.unpack(">IIB", png[at + 4:at + 13])
    return size, x * 0.0254 if unit == 1 else None     # unit 1: pixels per metre


def assert_readable(path, min_dpi=150, max_inches=14):
    """Saved at min_dpi or more, and at most max_inches wide at that dpi (the size it is meant to
    be shown at, where its text is the size the style gives it)."""
    (width, height), dpi = png_size_and_dpi(path)
    assert dpi is not None and dpi >= min_dpi - 0.5, (path, dpi)
    assert width / dpi <= max_inches, (path, width / dpi)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::UserWarning")  # e.g. a legend on a panel with nothing in it
@pytest.mark.parametrize("name", list(findings.EXPERIMENTS))
def test_figures_draw(name, tmp_path):
    pytest.importorskip("matplotlib")
    path = findings.plot(name, fake_records(name), str(tmp_path / f"{name}.png"))
    assert os.path.getsize(path) > 1000
    assert_readable(path)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("name", list(findings.EXPERIMENTS))
def test_figures_text_is_9_pt_or_more_and_no_legend_covers_a_panel(name):
    pytest.importorskip("matplotlib")
    from matplotlib.legend import Legend
    from matplotlib.text import Text
    plt = findings.pyplot()
    # the shipped records where there are some, else fake ones
    recs = findings.read_records(os.path.join(ROOT, "results", f"{name}.jsonl")) or \
        fake_records(name)
    with plt.rc_context(findings.STYLE):
        fig = findings.FIGURES[name][1](plt, findings.figure_data(name, recs))
        fig.canvas.draw()
        small = [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text().strip() and t.get_fontsize() < 9]
        assert not small, small
        panels = [a.get_window_extent() for a in fig.get_axes() if a.axison]
        for lg in fig.findobj(Legend):
            box = lg.get_window_extent()
            covered = [p for p in panels if min(box.x1, p.x1) - max(box.x0, p.x0) > 1 and
                       min(box.y1, p.y1) - max(box.y0, p.y0) > 1]
            assert not covered, (name, [t.get_text() for t in lg.get_texts()][:3])
    plt.close(fig)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECORDED)
def test_every_figure_regenerates_from_its_results_file(name, tmp_path):
    # `python experiments/findings.py NAME --plot` on the shipped results/NAME.jsonl, from
    # another folder (copied, so that the shipped figure is not touched)
    pytest.importorskip("matplotlib")
    results = tmp_path / f"{name}.jsonl"
    results.write_text(open(os.path.join(ROOT, "results", f"{name}.jsonl")).read())
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "findings.py"),
                        name, "--plot", "--out", str(results)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    png = open(tmp_path / f"{name}.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert_readable(tmp_path / f"{name}.png")


def test_run_figure_draws_a_tiny_log_with_its_baselines(tmp_path):
    pytest.importorskip("matplotlib")
    curve = lambda a: dict(curve=[0.1, a], last=a, first=0.1)
    ev = {"unseen mnist": dict(curve(0.6), baselines={"1-NN": curve(0.5), "SGD": curve(0.3)}),
          "seen mnist": curve(0.9), "unseen random": curve(0.8)}
    records = [dict(step=50, loss=2.3), dict(step=100, loss=1.5), dict(step=100, eval=ev)]
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    d = findings.run_figure_data(records)
    assert d["loss"] == [(50, 2.3), (100, 1.5)] and d["by_step"] == [(100, 0.6)]
    assert list(d["curves"]) == ["unseen mnist", "unseen random"]         # unseen sets only
    assert d["curves"]["unseen mnist"] == {"learner": [0.1, 0.6], "1-NN": [0.1, 0.5],
                                           "SGD": [0.1, 0.3]}
    findings.main(["run", str(tmp_path)])
    png = open(tmp_path / "curves.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert_readable(tmp_path / "curves.png")
    with open(tmp_path / "log.jsonl", "w") as f:                          # no evaluation yet
        f.write(json.dumps(records[0]) + "\n")
    with pytest.raises(SystemExit) as e:
        findings.main(["run", str(tmp_path), "--out", str(tmp_path / "b.png")])
    assert e.value.code == 2


def test_default_paths_are_the_repository_s_wherever_the_command_runs(tmp_path, monkeypatch):
    # results/ and runs/ stay at the top level: run from another folder, a sweep still writes
    # there (run_all stubbed: only the paths it is given are looked at)
    monkeypatch.chdir(tmp_path)
    given = []
    monkeypatch.setattr(findings, "run_all", lambda items, jobs: given.extend(items))
    findings.main(["plateaus"])
    assert {it[2] for it in given} == {os.path.join(ROOT, "results", "plateaus.jsonl")}
    assert {it[3] for it in given} == {os.path.join(ROOT, "runs", "exp", "plateaus")}
    assert not os.listdir(tmp_path)


def test_window_sweep_moves_the_state_and_keeps_every_parameter():
    runs = findings.window("cpu")
    full = next(f for p, f in findings.transitions("cpu")
                if p == dict(model="transformer", width=128, num_tasks=None))
    sizes = []
    for params, flags in runs:
        args = resolved(params, flags)
        assert dict(args, window=None) == \
            resolved(dict(model="transformer", width=128, num_tasks=None), full)  # the full run
        sizes.append(models.learner_sizes("transformer", 59, 100, width=128, n_layer=2,
                                          n_head=4, key_size=32, window=args["window"]))
    built = [models.build("transformer", 59, 10, **s) for s in sizes]
    states = [m.state_size(100) for m in built]
    assert len(set(states)) == len(runs) and max(states) < 2 * 2 * 4 * 32 * 100
    assert len({models.num_params(m) for m in built}) == 1                # the same parameters


def test_loss_after_plateau_reads_the_loss_a_fixed_number_of_steps_after_the_plateau_ends():
    flat = [[s, 2.3] for s in range(20, 1001, 20)]                     # never leaves ln 10
    assert findings.loss_after_plateau(flat) is None
    falls = [[s, 2.3 if s < 400 else 1.0] for s in range(20, 2001, 20)]
    end = findings.plateau_length(falls)
    assert end == 400                                                  # the first step below
    assert findings.loss_after_plateau(falls, steps=700) == (1100, 1.0)
    assert findings.loss_after_plateau(falls, steps=1700) is None      # past the run's end


@pytest.mark.slow
def test_the_cpu_preset_run_figure_regenerates_from_its_record(tmp_path):
    # results/cpu_preset_run.png is the learning_curves sweep's model=transformer record drawn
    pytest.importorskip("matplotlib")
    out = tmp_path / "run.png"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "findings.py"), "run",
                        os.path.join(ROOT, "results", "learning_curves.jsonl"),
                        "--record", "model=transformer", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert_readable(str(out))
    rec = findings.read_records(os.path.join(ROOT, "results", "learning_curves.jsonl"))[0]
    d = findings.run_figure_data(findings.log_of(rec))
    assert d["step"] == 3000 and d["by_step"][-1][1] == rec["final"]["unseen mnist"]["last"]
