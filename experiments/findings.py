"""
Reproduce the paper's findings, one command each (Kirsch et al. 2022, sections 3-4).

    python experiments/findings.py transitions  [--scale cpu|gpu] [--jobs 2] [--out FILE.jsonl]
    python experiments/findings.py state_size   ...
    python experiments/findings.py plateaus     ...
    python experiments/findings.py learning_curves ...
    python experiments/findings.py lstm_levers  ...  # the search for an LSTM that learns on a CPU
    python experiments/findings.py window       ...  # the state moved alone, parameters kept
    python experiments/findings.py NAME --plot  # results/NAME.png, drawn from the JSONL alone
    python experiments/findings.py run RUN_DIR  # one run's learning curves: RUN_DIR/curves.png

results/ and runs/ are the repository's (the folder above this one), wherever the command runs.
Every run is `train.py` in a subprocess (one CPU thread at the cpu scale) writing into
runs/exp/NAME[_gpu]/RUN_ID; when it finishes, one JSON record goes into the results file: the
sweep's variables, the flags, summary.json, the loss curve (at most 1,000 points) and the
evaluations (every eval of training: first, last, improvement; the final one in full, with
its per-position curves). A run whose id is already in the file is skipped, and an interrupted
run is continued with --resume, so a sweep is resumable by just running the command again.

Scales. `cpu`: the cpu preset's recipe (train.PRESETS["cpu"]), the one that learns MNIST in
context on 2 cores (7x7 MNIST, sequences of 100, fresh tasks unless swept, a 2-layer Transformer
128 wide unless swept, batch 128, lr 2e-3 after 100 warm-up steps, 3,000 steps), one thread per
run, two runs at a time (--jobs 2). A Transformer run of 3,000 steps is about 13 minutes alone
on 2 threads; with one thread each and two at a time it trained 9-15 minutes at width 16, 15-28
at width 64 and 27-42 at width 128 (measured: train_time_s in every sweep's results/ records).
The other learners get the preset's budget instead of steps (train.OTHER_LEARNERS_CPU: batch
64, 13 minutes each). Every run's record lists every flag it used (summary.json's "flags").
`gpu`: the paper preset, the authors' code defaults where known, ours elsewhere (MNIST 14x14,
sequences of 100, meta-batch 128 in 16 task slots, 50k steps, Transformer 4 layers unless
swept); run it with --jobs 1 on one GPU.
The GPU times in each docstring are ESTIMATES (one H100, ~10-20 ms per step at d256/B128/T100
with bf16), not measured.

The plateau rule (used for every plateau number and in tests): smooth the logged training
loss with a trailing mean over WINDOW=5 records (100 steps at --log-every 20); the plateau
ends at the first logged step where the smoothed loss is below ln(10) - DELTA, DELTA = 0.1
nats (chance level for 10 classes is ln 10 = 2.303). None = never within the run (censored;
drawn as an open marker at the run's length). Because a biased batch lowers the loss simply by
memorising its fixed task, plateau runs also report the generalisation onset: the first
evaluation where the unseen-task accuracy at the last position is above chance + 0.1.
"""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules live one folder up
import data
import models
import train
from metatest import check_out_file  # the folder's checks of a command line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py, results/, runs/
WINDOW, DELTA, CHANCE = 5, 0.1, 0.1
PLATEAU_LOSS = math.log(10)

# -----------------------------------------------------------------------------
# The sweeps: each returns [(params, flags)]; params are the swept variables (they name the run)


def flags_of(params):
    """{'num_tasks': 16, 'width': 64} -> ['--num-tasks', '16', '--width', '64']; None and
    data.FRESH are 'fresh', a new task for every sequence."""
    out = []
    for k, v in params.items():
        out += [f"--{k.replace('_', '-')}", "fresh" if v is None or v == data.FRESH else str(v)]
    return out


# Every sweep names its preset and passes the preset's recipe as explicit flags, so that it runs
# the same on any machine (without --preset, train.py picks paper on a GPU and cpu elsewhere).
# The values are train.py's (train.PRESETS), written there once; a sweep adds how it runs them:
# on one CPU thread, UCI digits as the other dataset, a loss record every 20 steps.
CPU_PRESET, PAPER_PRESET = train.PRESETS["cpu"], train.PRESETS["paper"]
TRANSFORMER_SIZES = models.Transformer.defaults  # width, layers, heads, key size: not the others'
CPU = ["--preset", "cpu", "--device", "cpu", "--threads", "1", "--dataset", "mnist",
       "--seq-len", "100", "--eval-datasets", "uci_digits", "--log-every", "20",
       *flags_of({k: v for k, v in CPU_PRESET.items() if k not in TRANSFORMER_SIZES})]
# the Transformer's layers and heads at every width (the other learners take neither)
SMALL_TRANSFORMER = {k: CPU_PRESET[k] for k in ("n_layer", "n_head")}
# the cpu preset's budget for a learner other than the Transformer: 13 minutes at batch 64
OTHER_LEARNER = {k: train.OTHER_LEARNERS_CPU[k]
                 for k in ("batch_size", "steps", "time_budget", "schedule", "lr", "warmup")}
# gpu: the paper preset's images, schedule and steps, in 16 task slots of 8 sequences (the
# authors' 16 slots, at batch 128: ours)
GPU = ["--preset", "paper", "--dataset", "mnist", "--seq-len", "100",
       "--eval-datasets", "uci_digits,random", "--log-every", "50", "--batch-size", "128",
       "--seqs-per-task", "8", "--eval-every", "2500",
       *flags_of({k: PAPER_PRESET[k] for k in ("image_size", "schedule", "steps")})]


def transitions(scale):
    """Paper Figure 4 and the heatmaps of Figure 3/5: sweep the number of tasks x model size.
    Paper: with few tasks the learner memorises instances (seen accuracy high, no improvement
    within the sequence); then it memorises tasks (seen tasks improve along the sequence, unseen
    do not); from ~2^13-2^14 MNIST tasks and width >= 64 it learns-to-learn (unseen tasks
    improve, ~0.6 on MNIST, ~0.4 on FashionMNIST). cpu: the cpu recipe, 2^0, 2^2, ..., 2^16 and
    fresh tasks x Transformer width 16/64/128 (30 runs; one thread each, two at a time, a run
    trained 9-15 / 16-28 / 32-42 minutes at width 16 / 64 / 128, measured: the 30 runs took 11.1
    hours of training, about 5.5 hours two at a time).
    gpu: MNIST, 2^0..2^24 (every second power) and fresh x Transformer width 16/64/256 and MLP
    64/256/1024, 50k steps: 84 runs of ~10-15 min on an H100 (~15-20 GPU hours, estimate)."""
    if scale == "cpu":
        # the two ends and the paper's transition first (2^12, 2^16, then 2^14 between them),
        # then the powers below, so that a sweep stopped halfway still draws a heatmap; the
        # baselines are off: the evaluation's sequences are the same in every run, and the cpu
        # preset's run reports them for all
        tasks = [1, None] + [2 ** k for k in (12, 16, 14, 8, 10, 4, 6, 2)]
        sizes = {"transformer": [16, 64, 128]}
        extra = CPU + flags_of(SMALL_TRANSFORMER) + ["--baselines", "off"]
    else:
        tasks = [2 ** k for k in range(0, 25, 2)] + [None]
        sizes, extra = {"transformer": [16, 64, 256], "mlp": [64, 256, 1024]}, GPU
    return [(dict(model=m, width=w, num_tasks=n), extra) for n in tasks
            for m, ws in sizes.items() for w in ws]


def state_size(scale):
    """Paper section 4.2, Figures 7-8: learners of many kinds and sizes; meta-test accuracy
    follows the state size (floats carried from one step to the next), not the parameter count.
    The two are decoupled: the Transformer's key size moves its state (the KV cache, 2 x layers
    x T x heads x key size) and hardly its parameters, its width the other way round; the LSTM,
    the outer-product LSTM and the fast-weight memory are widened. cpu: the cpu recipe on fresh
    MNIST tasks (3,000 steps of 128 sequences). Transformers of 2 layers and 4 heads:
        width 64, key size 1 / 4 / 32:  state 1,600 / 6,400 / 51,200, parameters 80k / 86k / 144k
        width 128, key size 8:          state 12,800, parameters 320k
        width 32, key size 32:          state 51,200, parameters 56k
    so that the width-32 learner has 4x the state and a sixth of the parameters of the
    width-128 one, and the LSTM of state 1,024 has 2.4M parameters. The others on the preset's
    13-minute budget (so their training is not equal: at one thread the LSTM of state 1,024
    gets ~670 steps of batch 64 in it, the outer-product LSTM ~4,600, the Transformers 3,000 of
    batch 128; a learner at chance here may only be slow): the LSTM at state 128 and 1,024
    (width 64, 512), the outer-product LSTM at 272 and 1,056 (16, 32), the fast-weight memory
    at 576 and 4,224 (8, 16), the MLP (no state).
    12 runs; measured: their training times sum to 164 minutes (9-27 minutes a run, one thread
    each), about 1.5 hours two at a time on 2 cores. gpu: MNIST with 2^24 tasks, the same
    kinds at 4 widths each, 50k steps (16 runs, ~4 GPU h, an estimate)."""
    if scale == "cpu":
        transformers = [dict(width=64, key_size=1), dict(width=128, key_size=8),
                        dict(width=64, key_size=4), dict(width=32, key_size=32),
                        dict(width=64, key_size=32)]
        others = [("lstm", 512), ("outer_lstm", 32), ("fwm", 16), ("mlp", 256), ("lstm", 64),
                  ("outer_lstm", 16), ("fwm", 8)]
        extra = CPU + ["--baselines", "off"]
        return [(dict(model="transformer", **SMALL_TRANSFORMER, **t), extra) for t in transformers] + \
            [(dict(model=m, width=w), extra + flags_of(OTHER_LEARNER)) for m, w in others]
    widths = {"lstm": [64, 256, 1024, 2048], "outer_lstm": [4, 8, 16, 32], "fwm": [8, 16, 32, 64]}
    extra = GPU + ["--num-tasks", str(2 ** 24)]
    return [(dict(model="transformer", width=256, key_size=k), extra) for k in (4, 8, 16, 32)] + \
        [(dict(model=m, width=w), extra) for m, ws in widths.items() for w in ws]


PLATEAU_BASE = dict(batch_size=128, adam_eps_root=1e-8, bias=0.5)  # varied one at a time


def plateaus(scale):
    """Paper section 4.3, Figures 9-11: the loss sits at chance for a long time before in-context
    learning appears. Plateau length falls as a power law in the batch size; a smaller Adam
    epsilon shortens it; "we bias towards a specific permutation by using a fixed permutation for
    a fraction of each batch. This completely eliminates the loss plateau" (memorisation first,
    then generalisation). One base run (batch 128, optax's eps_root 1e-8, identity labels for
    half the task ids: PLATEAU_BASE), varied one factor at a time: the bias F, eps_root 0
    (torch's Adam's update), the batch size. A constant learning rate, so that the plateau's
    length is not the schedule's. cpu: the cpu recipe on fresh MNIST tasks with a Transformer 64
    wide (it leaves the plateau near step 1,200 in the transitions sweep, at half the cost of
    128), bias 0/0.1/0.25/0.9, eps_root 0, batch 32/64/256, at most 4,000 steps, stopped 300
    steps after both the plateau and the generalisation onset (9 runs; measured: 80 minutes on 2
    cores two at a time, one thread each, 0.31-0.37 s a step at batch 128).
    gpu: MNIST 14x14 fresh tasks, the paper preset's d512 x 4, 50k steps, bias 0/0.1/0.25/0.9, eps_root 0, batch
    64/256/512."""
    if scale == "cpu":
        batches, roots, bias = [32, 64, 256], [0.0], [0.0, 0.1, 0.25, 0.9]
        extra = CPU + ["--schedule", "constant", "--steps", "4000", "--eval-every", "250",
                       "--eval-datasets", "", "--baselines", "off", "--width", "64",
                       *flags_of(SMALL_TRANSFORMER)]
    else:
        batches, roots, bias = [64, 256, 512], [0.0], [0.0, 0.1, 0.25, 0.9]  # bias[0]: 0
        extra = GPU + ["--num-tasks", "fresh", "--eval-every", "500"]
    base = PLATEAU_BASE
    runs = [base] + [dict(base, bias=f) for f in bias[:1]] + \
        [dict(base, adam_eps_root=e) for e in roots] + [dict(base, bias=f) for f in bias[1:]] + \
        [dict(base, batch_size=b) for b in batches]
    return [(r, extra) for r in runs]


def learning_curves(scale):
    """Paper Figure 3 / Table 1: accuracy against the number of examples seen, meta-trained on
    MNIST, meta-tested on unseen MNIST tasks and on other datasets; the Transformer goes from
    0.1 at the first example to ~0.74 at the 100th on MNIST, close to SGD (0.70). cpu: the cpu
    preset as it is (`python train.py --model M`): the Transformer, the preset's 64-wide LSTM, the
    LSTM of state 1,024 and the outer-product LSTM (on the 13-minute budget), and plain SGD (no
    meta-training); about an hour. gpu: MNIST 14x14, the paper preset's Transformer (d512 x 4), LSTM 1024, 50k steps (+ lookup curriculum 5k),
    SGD and MAML (~3 GPU h). The figure draws the baselines of the evaluation (scored on the
    same sequences, gpicl.evaluate) dashed beside the learners."""
    if scale == "cpu":
        extra = ["--device", "cpu", "--preset", "cpu", "--log-every", "50"]
        runs = [dict(model="transformer"), dict(model="lstm", state_size=1024),
                dict(model="outer_lstm"), dict(model="sgd"),
                dict(model="lstm")]  # the preset's own LSTM, 64 wide (state 128)
    else:
        extra = GPU + ["--num-tasks", "fresh", "--lookup-steps", "5000", "--lookup-seq-len", "20"]
        runs = [dict(model="transformer"), dict(model="lstm", width=1024), dict(model="sgd"),
                dict(model="maml")]
    return [(r, extra) for r in runs]


def lstm_levers(scale):
    """Paper Table 1's LSTM row (25% on MNIST) and our search for an LSTM that leaves the plateau
    on a CPU: `python train.py --model lstm --state-size 1024` stays at chance under the cpu
    preset's 13-minute budget, so each lever is tried alone against one base (batch 64, lr 1e-3
    constant, bias 0.5, 2,000 steps, the cpu recipe's tasks and evaluation): a 3x learning
    rate, a stronger bias (0.9), that bias for the first 1,000 steps and none after (memorise,
    then generalise), the lookup curriculum (500 steps of 20-example random-image lookups),
    gradient clipping at 1, a meta-batch of 128. Each lever on both learners of about the same
    state: the LSTM (state 1,024) and the outer-product LSTM (state 1,056 from a 32-wide cell),
    so that a difference between them is the cell's structure, not its state size. Steps, not
    a time budget, so that runs two at a time get the same training. Measured alone on one
    thread: the LSTM 1.1 s a step (2,000 steps: ~40 minutes; 1.2 s beside another run; the
    cpu preset's 0.41 s is on two threads, alone), the outer-product LSTM 0.15 s (~5 minutes);
    the cheap runs go first, and batch 128 (twice the cost: ~80 minutes for the LSTM) last in
    each (14 runs, about 4 hours two at a time, an estimate from those step times). The record's
    table: the plateau's end, the loss at the end, unseen accuracy at the first and the last
    example. gpu: the same levers on the gpu scale's recipe, 50k steps (an estimate: ~1 GPU
    hour a run)."""
    # the cpu preset gives every learner but the Transformer a 13-minute budget (the LSTM
    # reaches step ~670 in it at one thread); the levers are compared at equal steps, so the
    # budget is one that no run reaches
    base = {k: OTHER_LEARNER[k] for k in ("lr", "warmup", "schedule")}     # lr 1e-3, constant
    extra = (CPU + flags_of(dict(batch_size=OTHER_LEARNER["batch_size"], steps=2000,
                                 time_budget="10h", eval_every=500))
             if scale == "cpu" else GPU) + flags_of(base) + ["--baselines", "off"]
    outer, lstm = dict(model="outer_lstm", width=32), dict(model="lstm", state_size=1024)
    levers = [{}, dict(lr=3e-3), dict(bias=0.9), dict(lookup_steps=500, lookup_seq_len=20),
              dict(bias=0.9, bias_steps=1000), dict(grad_clip=1.0),
              dict(batch_size=128 if scale == "cpu" else 256)]          # twice the base's batch
    return [(dict(learner, **lever), extra) for learner in (outer, lstm) for lever in levers]


def window(scale):
    """The state moved alone, every parameter kept (paper section 4.2, its claim that the state
    size, not the parameter count, bounds in-context learning): the cpu preset's Transformer
    (width 128, 2 layers of 4 heads of key size 32, fresh tasks, 3,000 steps) whose attention
    sees only the last W tokens (`--window W`), so its state, the KV cache, is 2 x layers x heads
    x key size x W floats: 512 / 2,048 / 8,192 / 25,600 at W = 1 / 4 / 16 / 50, while the
    parameters are the same 418,570 in every run. The whole sequence (W = 100, 51,200 floats) is
    the transitions sweep's fresh-task, width-128 run: the very same flags, no --window. cpu: 4
    runs, one thread each, two at a time (the transitions sweep's width-128 runs took 27-42
    minutes so). gpu: the same windows on the gpu recipe."""
    extra = (CPU if scale == "cpu" else GPU) + flags_of(SMALL_TRANSFORMER) + ["--baselines", "off"]
    width = 128 if scale == "cpu" else 256
    return [(dict(model="transformer", width=width, num_tasks=None, window=w), extra)
            for w in (16, 1, 4, 50)]  # the first two together, then the last two


LEARNER_KEYS = ("model", "width", "state_size")  # in a lever run's params, what is not the lever

# longest first
EXPERIMENTS = {f.__name__: f for f in (learning_curves, plateaus, transitions, state_size,
                                       lstm_levers, window)}

# -----------------------------------------------------------------------------
# The runner: one subprocess of train.py per run, a record per finished run, resumable


def run_id(params):
    return ",".join(f"{k}={'fresh' if v is None else v}" for k, v in params.items())


def read_records(path):
    """The records of a results file ([] before the first); a one-line ValueError or OSError
    for a file that is not one."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except ValueError:
                raise ValueError(f"line {i} is not a JSON record; is it a results file?") from None
    return records


def subsample(points, n=1000):
    stride = max(1, math.ceil(len(points) / n))
    return points[::stride] if points[-1:] == points[::stride][-1:] else points[::stride] + points[-1:]


def rounded(x, digits=4):
    """Floats to `digits` decimals, and a small one (eps_root 1e-8) to `digits` significant
    digits, so that no flag a run used reads 0 in its record."""
    if isinstance(x, float):
        return round(x, digits) if abs(x) >= 10 ** -(digits - 1) else float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return [rounded(v, digits) for v in x] if isinstance(x, list) else x


def collect(out_dir):
    """A finished run directory -> the parts of its record that come from train.py (floats
    rounded, so that a results file stays small: rounded)."""
    log = [json.loads(l) for l in open(os.path.join(out_dir, "log.jsonl"))]
    evals = [r for r in log if "eval" in r]
    strip = lambda res: {k: {m: r[m] for m in ("first", "last", "improvement")} for k, r in res.items()}
    return rounded(dict(summary=json.load(open(os.path.join(out_dir, "summary.json"))),
                        loss=subsample([[r["step"], r["loss"]] for r in log if "loss" in r]),
                        evals=[dict(step=r["step"], regime=r["regime"], results=strip(r["eval"]))
                               for r in evals],
                        final=evals[-1]["eval"] if evals else None))


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    try:
        return [json.loads(l) for l in open(path) if l.endswith("\n")]
    except (OSError, ValueError):
        return []


def run_one(params, flags, out_dir, stop=None, inprocess=False, python=sys.executable):
    """train.py with flags + the params' flags; resumes a run the directory already holds.
    stop(log records) -> True ends the run early: SIGINT (train.py checkpoints), then a
    --resume with --steps at the checkpoint's step evaluates it and writes summary.json.
    inprocess: train.main(argv) in this process instead (no stop rule; saves torch's start-up)."""
    cmd = [python, os.path.join(ROOT, "train.py"), *flags, *flags_of(params), "--out-dir", out_dir]
    if inprocess and not os.path.exists(os.path.join(out_dir, "summary.json")):
        train.main(cmd[2:] + (["--resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []))
        return collect(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(out_dir + ".out", "a") as f:
        def start(extra):
            return subprocess.Popen(cmd + extra, stdout=f, stderr=subprocess.STDOUT)
        if not os.path.exists(os.path.join(out_dir, "summary.json")):
            resume = ["--resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []
            proc, stopped, t0 = start(resume), False, time.time()
            log_path = os.path.join(out_dir, "log.jsonl")
            while proc.poll() is None:
                time.sleep(5)
                # this process logs
                fresh = os.path.exists(log_path) and os.path.getmtime(log_path) > t0 + 1
                if stop is not None and fresh and not stopped and stop(read_log(out_dir)):
                    proc.send_signal(signal.SIGINT)
                    stopped = True
            if stopped and proc.returncode != 0:  # 130, or interrupted while starting: finish anyway
                step = max(r["step"] for r in read_log(out_dir))
                proc = start(["--resume", "--steps", str(step)])
                proc.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"train.py failed ({proc.returncode}); see {out_dir}.out")
    return collect(out_dir)


def source_commit():
    """The commit of the train.py that runs (with '+changes' if its checkout has edits), so
    that a record says what made it; None outside a git checkout."""
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def run_all(items, jobs=1, inprocess=False):
    """items: [(name, scale, out, runs_dir, params, flags, stop)]. Runs every item whose id is
    not yet in its out file, `jobs` at a time, appending a record as each ends; returns the ids."""
    done = {(o, r["id"]) for o in {it[2] for it in items} for r in read_records(o)}
    commit = source_commit()
    todo = [it for it in items if (it[2], run_id(it[4])) not in done]
    lock = threading.Lock()

    def work(it):
        name, scale, out, runs_dir, params, flags, stop = it
        rid, t0 = run_id(params), time.time()
        part = run_one(params, flags, os.path.join(runs_dir, rid.replace("=", "_").replace(",", "__")),
                       stop=stop, inprocess=inprocess)
        rec = dict(id=rid, experiment=name, scale=scale, params=params, flags=flags, **part,
                   wall_s=round(time.time() - t0, 1), commit=commit)
        with lock:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"[{name}] {rid}: {rec['summary']['regime']} at step {rec['summary']['step']} "
                  f"in {rec['wall_s']:.0f} s", flush=True)
        return rid

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(work, todo))


def plateau_stop(dataset, margin=300):
    """Stop rule for plateau runs: both the loss plateau and generalisation have ended, and
    `margin` more steps have been logged (so the curves show what comes after)."""
    def stop(log):
        rec = dict(loss=[[r["step"], r["loss"]] for r in log if "loss" in r],
                   flags=["--dataset", dataset],
                   evals=[dict(step=r["step"], results=r["eval"]) for r in log if "eval" in r])
        ends = [plateau_length(rec["loss"]), generalisation_onset(rec)] if rec["loss"] else [None]
        return None not in ends and rec["loss"][-1][0] >= max(ends) + margin
    return stop

# -----------------------------------------------------------------------------
# Plateau length, by the rule stated at the top


def escape_step(steps, values, threshold, window=1):
    """First step where the trailing mean of `window` values is below threshold, else None."""
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        if sum(values[lo:i + 1]) / (i + 1 - lo) < threshold:
            return steps[i]
    return None


def plateau_length(loss, plateau=PLATEAU_LOSS, delta=DELTA, window=WINDOW):
    """loss [[step, loss], ...] -> the step the plateau ends (see the module docstring)."""
    return escape_step([s for s, _ in loss], [l for _, l in loss], plateau - delta, window)


def generalisation_onset(rec):
    """First evaluation step where unseen base-dataset accuracy at the last position > 0.2."""
    key = "unseen " + dataset_of(rec)
    ev = [(e["step"], -e["results"][key]["last"]) for e in rec["evals"]]
    return escape_step([s for s, _ in ev], [v for _, v in ev], -(CHANCE + 0.1))


def loss_after_plateau(loss, steps=700, window=WINDOW):
    """The step rule that late escape cannot decide: the training loss `steps` after the
    plateau ends (the mean of the `window` records up to that step), None where the plateau does
    not end, or ends too late for the run to reach that step. On fresh tasks every training
    sequence is a task never seen, so this loss measures learning on unseen tasks, each learner
    the same number of steps after it started to learn. -> (step, loss) or None"""
    end = plateau_length(loss)
    at = next((i for i, (s, _) in enumerate(loss) if end is not None and s >= end + steps), None)
    if at is None:
        return None
    recent = [l for _, l in loss[max(0, at - window + 1):at + 1]]
    return loss[at][0], sum(recent) / len(recent)


def dataset_of(rec):
    f = rec["flags"]
    return f[f.index("--dataset") + 1] if "--dataset" in f else "mnist"

# -----------------------------------------------------------------------------
# Figure data (pure, tested without matplotlib) and figures


def figure_data(name, records):
    """The numbers each figure shows, from the records alone."""
    if name not in FIGURES:
        raise ValueError(f"unknown experiment {name!r}")
    if not records:
        return {}
    base = dataset_of(records[0])
    others = sorted({k.split(" ", 1)[1] for r in records for k in r["final"]} - {base})
    return FIGURES[name][0](records, base, others)


def transitions_data(records, base, others):
    """{model: grids over (width, number of tasks) of seen and unseen accuracy at the last
    example, the regime and the gain along the sequence of every set}; None where no run yet."""
    out = {}
    for model in sorted({r["params"]["model"] for r in records}):
        rs = [r for r in records if r["params"]["model"] == model]
        tasks = sorted({r["params"]["num_tasks"] for r in rs},
                       key=lambda n: math.inf if n is None else n)
        widths = sorted({r["params"]["width"] for r in rs})
        at = {(r["params"]["width"], r["params"]["num_tasks"]): r["summary"] for r in rs}
        cell = lambda w, n, f: f(at[w, n]) if (w, n) in at else None
        grid = lambda f: [[cell(w, n, f) for n in tasks] for w in widths]  # rows: widths
        sets = [f"seen {base}", f"unseen {base}"] + [f"unseen {o}" for o in others]
        out[model] = dict(tasks=tasks, widths=widths, regime=grid(lambda s: s["regime"]),
                          seen=grid(lambda s: s["results"][f"seen {base}"]["last"]),
                          unseen=grid(lambda s: s["results"][f"unseen {base}"]["last"]),
                          improvement={k: grid(lambda s: s["results"][k]["improvement"])
                                       for k in sets},
                          improvement_ci={k: grid(lambda s: s["results"][k]["improvement_ci"])
                                          for k in sets})
    return out


def state_size_data(records, base, others):
    """One point per run: its state size, parameters and unseen accuracy at the last example."""
    return [dict(model=r["params"]["model"], width=r["params"]["width"],
                 key_size=r["params"].get("key_size"), state_size=r["summary"]["state_size"],
                 parameters=r["summary"]["parameters"],
                 unseen=r["summary"]["results"][f"unseen {base}"]["last"],
                 unseen_ci=r["summary"]["results"][f"unseen {base}"]["last_ci"],
                 other={o: r["summary"]["results"][f"unseen {o}"]["last"] for o in others})
            for r in records]


def plateaus_data(records, base, others):
    """{factor: the runs that move it alone on PLATEAU_BASE, by its value: the plateau's end,
    the generalisation onset, the loss curves}; for the batch size, the power law's exponent
    and intercept (log plateau = intercept + exponent x log batch)."""
    out = {}
    for var in PLATEAU_BASE:
        rs = sorted([r for r in records
                     if all(r["params"][k] == v for k, v in PLATEAU_BASE.items() if k != var)],
                    key=lambda r: r["params"][var])
        out[var] = dict(values=[r["params"][var] for r in rs],
                        plateau=[plateau_length(r["loss"]) for r in rs],
                        onset=[generalisation_onset(r) for r in rs],
                        steps=[r["summary"]["step"] for r in rs], loss=[r["loss"] for r in rs])
        # sequences seen before the plateau ends: a bigger batch needs fewer steps, not
        # necessarily fewer sequences
        out[var]["sequences"] = [p and p * r["params"]["batch_size"]
                                 for p, r in zip(out[var]["plateau"], rs)]
    bs = out["batch_size"]
    pts = [(math.log(b), math.log(p)) for b, p in zip(bs["values"], bs["plateau"]) if p]
    if len(pts) >= 2:  # least-squares slope of log plateau on log batch: the power law's exponent
        mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        bs["exponent"] = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None
        bs["intercept"] = None if bs["exponent"] is None else my - bs["exponent"] * mx
    return out


def lstm_levers_data(records, base, others):
    """One row per run: the learner and its state, its lever, the plateau's end, the loss at the
    end, unseen accuracy at the first and the last example, the gain between them."""
    key = f"unseen {base}"
    lever = lambda p: ",".join(f"{k}={v}" for k, v in p.items() if k not in LEARNER_KEYS)
    return [dict(id=r["id"], learner=r["params"]["model"], lever=lever(r["params"]) or "base",
                 state_size=r["summary"]["state_size"],
                 steps=r["summary"]["step"], loss=r["loss"][-1][1],
                 plateau=plateau_length(r["loss"]), first=r["final"][key]["first"],
                 last=r["final"][key]["last"], last_ci=r["final"][key]["last_ci"],
                 gain=r["final"][key]["improvement"], gain_ci=r["final"][key]["improvement_ci"],
                 curve=r["final"][key]["curve"], loss_curve=r["loss"]) for r in records]


def learner_label(params, summary):
    """'Transformer 128 wide, state 51,200'; an LSTM sized by --state-size says that it is not
    the cpu preset's (train.CPU_LEARNER_WIDTH)."""
    m = params["model"]
    width = params.get("width") or summary.get("flags", {}).get("width")
    label = MODEL_NAME.get(m, m) + (f" {width} wide" if m == "transformer" and width else "")
    if m in ("sgd", "maml"):
        return label + " (no meta-training)" if m == "sgd" else label
    label += f", state {summary['state_size']:,}"
    if "state_size" in params and m in train.CPU_LEARNER_WIDTH:
        label += f" (not the preset's {train.CPU_LEARNER_WIDTH[m]}-wide)"
    return label


def learning_curves_data(records, base, others):
    """{learners: {label: {set: curve}}, baselines: {set: {baseline: curve}}}. The SGD run is
    left out of the learners where SGD is a baseline (the same learner, drawn once)."""
    # the baselines read only the evaluation sequences, which the runs of one sweep share (same
    # flags), so the first run that has them speaks for all
    baselines = {}
    for r in records:
        for k, v in r["final"].items():
            for b, s in v.get("baselines", {}).items():
                baselines.setdefault(k, {}).setdefault(b, s["curve"])
    has_sgd = any("SGD" in b for b in baselines.values())
    learners = {learner_label(r["params"], r["summary"]):
                {k: v["curve"] for k, v in r["final"].items()}
                for r in records if not (r["params"]["model"] == "sgd" and has_sgd)}
    return dict(learners=learners, baselines=baselines)


# -----------------------------------------------------------------------------
# The figures' style: saved at DPI, meant to be shown at their size in inches, no text under
# 9 pt; constrained layout, so that the legends and keys outside the axes keep their room

DPI = 150
STYLE = {"font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "xtick.labelsize": 9.5,
         "ytick.labelsize": 9.5, "legend.fontsize": 9.5, "legend.title_fontsize": 10,
         "figure.titlesize": 11.5, "savefig.dpi": DPI, "figure.constrained_layout.use": True}
MODEL_NAME = {"transformer": "Transformer", "lstm": "LSTM", "outer_lstm": "outer-product LSTM",
              "fwm": "fast-weight memory", "mlp": "MLP", "sgd": "SGD", "maml": "MAML"}
DATASET_NAME = {"mnist": "MNIST", "uci_digits": "UCI digits", "random": "Random (noise images)",
                "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR-10",
                "svhn": "SVHN"}
REGIME_LETTER = {"instance memorisation": "I", "task memorisation": "T", "learning-to-learn": "L"}
REGIME_KEY = "I instance memorisation, T task memorisation, L learning-to-learn"


def save(plt, draw, path):
    """draw() -> a figure, drawn in STYLE and saved at DPI into path."""
    with plt.rc_context(STYLE):
        fig = draw()
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def pyplot():
    import matplotlib  # optional: only figures need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(name, records, path):
    """Draw experiment `name`'s figure from its records into path (a PNG)."""
    plt = pyplot()
    return save(plt, lambda: FIGURES[name][1](plt, figure_data(name, records)), path)


def legend(a, **kw):
    """a.legend(), unless nothing on the axes is labelled (a sweep not yet run in that panel)"""
    if a.get_legend_handles_labels()[0]:
        a.legend(**kw)


def outside(a, **kw):
    """a's legend to the right of its axes, off the data."""
    legend(a, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, **kw)


def set_name(key):
    """'unseen uci_digits' -> 'UCI digits, unseen tasks'"""
    kind, _, ds = key.partition(" ")
    ds = DATASET_NAME.get(ds, ds)
    return {"seen": f"{ds}, seen tasks", "unseen": f"{ds}, unseen tasks",
            "identity": f"{ds} as it is (no projection)"}.get(kind, key)


def tasks_label(n):
    return "fresh" if n is None else f"$2^{{{int(round(math.log2(n)))}}}$"


def draw_transitions(plt, d):
    """Per model: heatmaps of seen and unseen accuracy at the last example (width x number of
    tasks, each cell's regime a letter), and below, per set, the gain along the sequence
    against the number of tasks, a line per width."""
    fig = plt.figure(figsize=(12, 8 * len(d)))
    for sub, (m, g) in zip(fig.subfigures(len(d), 1, squeeze=False)[:, 0], d.items()):
        top, bottom = sub.subfigures(2, 1, height_ratios=[1.05, 1])
        heat = top.subplots(1, 2)
        for a, key in zip(heat, ("seen", "unseen")):
            im = heatmap(a, g, key)
            a.set_title(set_name(next(k for k in g["improvement"] if k.split()[0] == key)))
        top.colorbar(im, ax=heat, label="accuracy at the last example (%)", shrink=0.9)
        top.suptitle(f"{MODEL_NAME.get(m, m)}: accuracy at the last example (%) and the "
                     f"regime by the rule:\n{REGIME_KEY}")
        gains(bottom, g)
    return fig


def heatmap(a, g, key):
    """g[key] (rows: widths, columns: numbers of tasks) in %, each cell's value and regime."""
    grid = [[math.nan if v is None else 100 * v for v in line] for line in g[key]]
    im = a.imshow(grid, vmin=0, vmax=100, cmap="viridis", origin="lower", aspect="auto")
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            if not math.isnan(v):  # a cell the sweep has not reached yet stays blank
                a.text(j, i, f"{v:.0f}\n{REGIME_LETTER.get(g['regime'][i][j], '?')}",
                       ha="center", va="center", fontsize=10, linespacing=1.4,
                       color="k" if v > 55 else "w")
    a.set_xticks(range(len(g["tasks"])), [tasks_label(n) for n in g["tasks"]])
    a.set_yticks(range(len(g["widths"])), g["widths"])
    a.set(xlabel="number of tasks in meta-training", ylabel="width")
    return im


def gains(sub, g):
    """One panel per evaluation set: the gain (last - first example) with its 95% interval
    against the number of tasks, a line per width."""
    sets = list(g["improvement"])
    ax = sub.subplots(1, len(sets), sharey=True, squeeze=False)[0]
    x = range(len(g["tasks"]))
    for a, k in zip(ax, sets):
        for i, w in enumerate(g["widths"]):
            pct = lambda v, none: none if v is None else 100 * v
            a.errorbar(x, [pct(v, math.nan) for v in g["improvement"][k][i]],
                       yerr=[pct(v, 0) for v in g["improvement_ci"][k][i]], capsize=2,
                       marker="osD^v"[i % 5], color=f"C{i}", label=f"width {w}")
        a.axhline(0, color="k", lw=0.6)
        a.set_xticks(x, [tasks_label(n) for n in g["tasks"]])
        a.set(title=set_name(k), xlabel="number of tasks in meta-training")
    ax[0].set_ylabel("gain (percentage points)")
    outside(ax[-1])
    sub.suptitle("gain along the sequence: accuracy at the last minus the first example, "
                 "with its 95% interval")


def draw_state_size(plt, d):
    """Unseen accuracy at the last example against the state size and against the parameters;
    a Transformer labelled by its width and key size."""
    from matplotlib.lines import Line2D
    fig, ax = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    style = lambda m: (f"C{list(MODEL_NAME).index(m)}" if m in MODEL_NAME else "k",
                       "osD^x"[list(MODEL_NAME).index(m) % 5] if m in MODEL_NAME else "o")
    # a series: a Transformer at one width over key sizes (a line joins it against the state),
    # or one kind of learner widened (points only)
    series = lambda p: (p["model"], p["width"] if p["model"] == "transformer" else None)
    for s in dict.fromkeys(series(p) for p in d):
        for a, key in zip(ax, ("state_size", "parameters")):
            ps = sorted([p for p in d if series(p) == s and p[key] > 0], key=lambda p: p[key])
            if ps:  # the MLP has no state: it is left off the state's log axis
                c, mk = style(s[0])
                a.errorbar([p[key] for p in ps], [p["unseen"] for p in ps], color=c, marker=mk,
                           yerr=[p["unseen_ci"] for p in ps], capsize=3, ms=7,
                           ls="-" if key == "state_size" and s[1] else "none", zorder=3)
            for p in (p for p in ps if p["model"] == "transformer"):
                a.annotate(f"w{p['width']} k{p['key_size']}", (p[key], p["unseen"]),
                           xytext=(7, 0), textcoords="offset points", va="center", fontsize=9.5,
                           bbox=dict(fc="white", ec="none", alpha=0.8, pad=0.5))
    for a in ax:
        a.axhline(CHANCE, color="0.5", lw=0.8)
        a.set(xscale="log")
    stateless = sorted({MODEL_NAME.get(p["model"], p["model"]) for p in d if not p["state_size"]})
    ax[0].set(xlabel="state size (floats carried from one step to the next)",
              ylabel="unseen-task accuracy at the last example",
              title="against the state" + (f" ({', '.join(stateless)}: state 0, not drawn)"
                                           if stateless else ""))
    ax[1].set(xlabel="parameters", title="against the parameter count")
    kinds = list(dict.fromkeys(p["model"] for p in d))
    handles = [Line2D([], [], color=style(m)[0], marker=style(m)[1], ls="none", ms=7,
                      label=MODEL_NAME.get(m, m) + (" (wW kK: width, key size)"
                                                    if m == "transformer" else ""))
               for m in kinds] + [Line2D([], [], color="0.5", lw=0.8, label="chance")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))
    return fig


FACTOR_NAME = {"batch_size": "batch size (sequences a step)", "adam_eps_root": "Adam's eps_root",
               "bias": "bias F (share of task ids with identity labels)"}
FACTOR_SHORT = {"batch_size": "batch", "adam_eps_root": "eps_root", "bias": "bias"}


def draw_plateaus(plt, d):
    """Per factor: the training loss as it moves, and the step each plateau (and the
    generalisation onset) ends, open where it does not within the run."""
    fig, ax = plt.subplots(2, len(d), figsize=(13, 8.5), squeeze=False)
    for col, (var, g) in enumerate(d.items()):
        loss_panel(ax[0, col], var, g)
        ends_panel(ax[1, col], var, g)
    ax[0, 0].set_ylabel("training loss (nats)")
    ax[1, 0].set_ylabel("step it ends at")
    base = ", ".join(f"{FACTOR_SHORT.get(k, k)} {v:g}" for k, v in PLATEAU_BASE.items())
    fig.suptitle(f"Each column moves one factor of the base run ({base})")
    handles, labels = zip(*plateau_key(d))
    from matplotlib.legend_handler import HandlerTuple
    fig.legend(handles, labels, loc="outside lower center", ncol=2,
               handler_map={tuple: HandlerTuple(ndivide=None)})
    return fig


def loss_panel(a, var, g):
    for v, loss in zip(g["values"], g["loss"]):
        a.plot(*zip(*loss), lw=1.2, label=f"{v:g}")
    a.axhline(PLATEAU_LOSS - DELTA, color="k", lw=0.8, ls=":")
    low = min([PLATEAU_LOSS - 0.5] + [l for loss in g["loss"] for _, l in loss])
    a.set(xlabel="step", ylim=(low - 0.05, PLATEAU_LOSS + 0.3))
    legend(a, title=f"training loss, {FACTOR_SHORT.get(var, var)} =", loc="lower center",
           bbox_to_anchor=(0.5, 1.0), ncol=max(1, len(g["values"])), handlelength=1.2,
           columnspacing=1.0, frameon=False, borderaxespad=0.2)


def ends_panel(a, var, g):
    """Where the plateau ends (circle) and where generalisation sets in (square, beside it)."""
    categorical = var != "batch_size"  # bias and eps_root include 0: no log axis
    xs = list(range(len(g["values"]))) if categorical else g["values"]
    beside = (lambda x: x + 0.15) if categorical else (lambda x: x * 1.12)
    for key, mk, c, at in (("plateau", "o", "C0", lambda x: x), ("onset", "s", "C1", beside)):
        for x, p, steps in zip(xs, g[key], g["steps"]):
            a.scatter(at(x), p or steps, marker=mk, s=50, edgecolors=c, linewidths=1.5,
                      facecolors=c if p else "white", zorder=3)
    a.set(xlabel=FACTOR_NAME.get(var, var),
          title=f"when each ends, by {FACTOR_SHORT.get(var, var)}")
    if categorical:
        a.set_xticks(xs, [f"{v:g}" for v in g["values"]])
        a.set_xlim(-0.5, len(xs) - 0.3)
    else:
        batch_axis(a, xs, g)


def batch_axis(a, xs, g):
    """The plateau against the batch size on log-log axes with the power law fitted to it, each
    end labelled with the sequences seen by then."""
    if g.get("exponent") is not None:
        lo, hi = min(xs), max(xs)
        grid = [lo * (hi / lo) ** (i / 20) for i in range(21)]
        a.plot(grid, [math.exp(g["intercept"]) * b ** g["exponent"] for b in grid], "k--", lw=1)
    for x, p, n in zip(xs, g["plateau"], g["sequences"]):
        if p:
            a.annotate(f"{n / 1000:.0f}k seq. seen", (x, p), xytext=(-6, -6), fontsize=9,
                       textcoords="offset points", ha="right", va="top")
    a.set(xscale="log", yscale="log")
    a.margins(x=0.3, y=0.12)
    a.minorticks_off()
    lo, hi = a.get_ylim()
    ticks = [t for t in (m * 10 ** k for k in range(2, 6) for m in (1, 2, 3, 5, 7)) if lo <= t <= hi]
    a.set_yticks(ticks, [f"{t:,}" for t in ticks])
    a.set_xticks(xs, [str(v) for v in xs])


def plateau_key(d):
    """The plateau figure's key: (handle, label) for the threshold, the markers and the fit."""
    from matplotlib.lines import Line2D
    dot = lambda mk, c, fill: Line2D([], [], ls="none", marker=mk, ms=7, mfc=fill, mec=c, mew=1.5)
    key = [(Line2D([], [], color="k", lw=0.8, ls=":"), f"ln 10 − {DELTA}: the plateau ends when "
            f"the loss (mean of {WINDOW} records) drops below it"),
           (dot("o", "C0", "C0"), "the loss plateau ends"),
           (dot("s", "C1", "C1"), f"generalisation onset: unseen accuracy at the last example "
            f"above {CHANCE + 0.1:.1f}"),
           ((dot("o", "C0", "white"), dot("s", "C1", "white")),
            "open: not within the run (drawn at its last step)")]
    slope = d.get("batch_size", {}).get("exponent")
    if slope is not None:
        key.append((Line2D([], [], color="k", lw=1, ls="--"),
                    f"power law fitted to the plateau's ends: step ∝ batch$^{{{slope:.2f}}}$"))
    return key


LEVER_NAME = {"base": "batch 64, lr 1e-3, bias 0.5", "lr=0.003": "lr 3e-3",
              "bias=0.9": "bias 0.9",
              "bias=0.9,bias_steps=1000": "bias 0.9, then 0 from step 1,000",
              "lookup_steps=500,lookup_seq_len=20": "lookup curriculum, 500 steps",
              "grad_clip=1.0": "gradient clipping at 1", "batch_size=128": "batch 128"}
lever_name = lambda lever: LEVER_NAME.get(lever, lever.replace(",", ", ").replace("=", " "))


def draw_lstm_levers(plt, d):
    """Small multiples of the training loss, zoomed on the plateau: a row per learner, a column
    per lever, each beside the base run; below, each run's gain along the sequence."""
    import textwrap
    learners = sorted({r["learner"] for r in d},
                      key=lambda m: (m not in MODEL_NAME, m != "lstm", m))   # the LSTM first
    levers = sorted(dict.fromkeys(r["lever"] for r in d), key=lambda lever: lever != "base")
    shown = [lever for lever in levers if lever != "base"] or levers
    fig = plt.figure(figsize=(12, 9))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    ax = top.subplots(len(learners), len(shown), sharex=True, sharey=True, squeeze=False)
    losses = [l for r in d for _, l in r["loss_curve"]]
    for row, m in zip(ax, learners):
        runs = {r["lever"]: r for r in d if r["learner"] == m}
        for a, lever in zip(row, shown):
            # the base wide and light beneath: a lever that changes nothing shows both
            for name, colour, lw in (("base", "0.75", 2.8), (lever, "C0", 1.2)):
                if name in runs:
                    a.plot(*zip(*runs[name]["loss_curve"]), color=colour, lw=lw)
            a.axhline(PLATEAU_LOSS - DELTA, color="k", lw=0.8, ls=":")
            a.xaxis.set_major_locator(plt.MaxNLocator(3, steps=[1, 2, 5, 10]))
        state = next(iter(runs.values()))["state_size"]
        row[0].set_ylabel(f"{MODEL_NAME.get(m, m)}\nstate {state:,}\nloss (nats)")
    for a, lever in zip(ax[0], shown):
        a.set_title(textwrap.fill(lever_name(lever), 18))
    for a in ax[-1]:
        a.set_xlabel("step")
    ax[0, 0].set_ylim(min([PLATEAU_LOSS - DELTA - 0.02] + losses),
                      max([PLATEAU_LOSS] + losses) + 0.01)           # zoomed on the plateau
    top.suptitle(f"training loss of each lever (blue) beside the base run (grey: "
                 f"{lever_name('base')}); dotted: ln 10 − {DELTA}, where the plateau ends")
    lever_gains(bottom.subplots(), d, learners, levers)
    return fig


def lever_gains(a, d, learners, levers):
    import textwrap
    for i, m in enumerate(learners):
        rows = {r["lever"]: r for r in d if r["learner"] == m}
        shift = (i - (len(learners) - 1) / 2) * 0.2
        at = [lever for lever in levers if lever in rows]
        a.errorbar([levers.index(lever) + shift for lever in at],
                   [100 * rows[lever]["gain"] for lever in at], capsize=3, ms=7,
                   yerr=[100 * rows[lever]["gain_ci"] for lever in at], fmt="os"[i % 2],
                   color=("k", "0.55")[i % 2], label=MODEL_NAME.get(m, m))
    a.axhline(0, color="k", lw=0.6)
    a.set_xticks(range(len(levers)), [textwrap.fill("none (the base)" if lever == "base" else
                                                    lever_name(lever), 15) for lever in levers])
    a.set(ylabel="gain (percentage points)", title="unseen tasks: gain along the sequence, the "
          "last minus the first example, with its 95% interval (0: no in-context learning)")
    outside(a)


def draw_learning_curves(plt, d):
    """Accuracy along the sequence, a panel per set: every learner beside the baselines
    (dashed), each drawn once; the key in a panel of its own."""
    order = lambda s: (["unseen", "seen", "identity"].index(s.split()[0])
                       if s.split()[0] in ("unseen", "seen", "identity") else 3, s)
    sets = sorted({k for v in d["learners"].values() for k in v} | set(d["baselines"]), key=order)
    cols = min(3, len(sets) + 1)
    rows = -(-(len(sets) + 1) // cols)
    fig, ax = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    base_style = {"1-NN": ("k", "--"), "logistic regression": ("0.45", "-."), "SGD": ("C3", "--")}
    for a, s in zip(ax.flat, sets):
        for i, (who, curves) in enumerate(d["learners"].items()):
            if s in curves:
                color = ("C0", "C1", "C2", "C4", "C5", "C6")[i % 6]  # C3 (red) is SGD's
                a.plot(range(1, len(curves[s]) + 1), curves[s], color=color, lw=1.6, label=who)
        for b, c in d["baselines"].get(s, {}).items():
            color, ls = base_style.get(b, ("0.3", ":"))
            a.plot(range(1, len(c) + 1), c, color=color, ls=ls, lw=1.3, label=f"{b} (baseline)")
        a.axhline(CHANCE, color="0.6", lw=0.8, label="chance")
        a.set(title=set_name(s), xlabel="examples seen", ylim=(0, 1))
    for a in ax[:, 0]:
        a.set_ylabel("accuracy")
    lines = {l.get_label(): l for a in ax.flat for l in a.get_lines()
             if not l.get_label().startswith("_")}               # every run and baseline, once
    for a in ax.flat[len(sets):]:
        a.axis("off")
    ax.flat[-1].legend(lines.values(), lines.keys(), loc="center", title="learner (solid); "
                       "baselines on the same\nsequences, no meta-training (dashed)")
    return fig


def window_data(records, base, others):
    """One point per window W, smallest first: the state (the KV cache), the parameters, the
    steps, the plateau's end, unseen accuracy at the last example, the loss curve."""
    key = f"unseen {base}"
    return [dict(window=r["params"]["window"], state_size=r["summary"]["state_size"],
                 parameters=r["summary"]["parameters"], steps=r["summary"]["step"],
                 plateau=plateau_length(r["loss"]), unseen=r["final"][key]["last"],
                 unseen_ci=r["final"][key]["last_ci"], loss=r["loss"])
            for r in sorted(records, key=lambda r: r["params"]["window"])]


def draw_window(plt, d):
    """Left: unseen accuracy at the last example against the state, the parameters fixed.
    Right: the training loss of each window."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(12, 4.8))
    acc.errorbar([p["state_size"] for p in d], [p["unseen"] for p in d], color="C0",
                 yerr=[p["unseen_ci"] for p in d], marker="o", ms=7, capsize=3)
    for i, p in enumerate(d):
        acc.annotate(f"W = {p['window']}", (p["state_size"], p["unseen"]), fontsize=9.5,
                     xytext=(7, -7), textcoords="offset points", va="top")
        loss.plot(*zip(*p["loss"]), lw=1.2, color=f"C{i + 1}", label=f"W = {p['window']}")
    acc.axhline(CHANCE, color="0.5", lw=0.8)
    acc.margins(x=0.2)
    acc.set_xscale("log")
    acc.minorticks_off()
    acc.set_xticks([p["state_size"] for p in d], [f"{p['state_size']:,}" for p in d])
    acc.set(xlabel="state: the KV cache (floats)",
            ylabel="unseen-task accuracy at the last example",
            title=f"attention to the last W tokens; {d[0]['parameters']:,} parameters in every run"
            if d else "")
    loss.axhline(PLATEAU_LOSS, color="k", lw=0.8, ls=":", label="ln 10 (chance)")
    loss.set(xlabel="step", ylabel="training loss (nats)", title="training loss, by window W")
    outside(loss)
    return fig


# each experiment's figure: (its numbers from the records, its drawing from those numbers)
FIGURES = {"transitions": (transitions_data, draw_transitions),
           "state_size": (state_size_data, draw_state_size),
           "plateaus": (plateaus_data, draw_plateaus),
           "lstm_levers": (lstm_levers_data, draw_lstm_levers),
           "learning_curves": (learning_curves_data, draw_learning_curves),
           "window": (window_data, draw_window)}


# -----------------------------------------------------------------------------
# One run's figure: `python experiments/findings.py run RUN_DIR` draws RUN_DIR/log.jsonl

BASELINE_STYLE = {"1-NN": ("C1", "--"), "logistic regression": ("C2", "--"), "SGD": ("C3", ":")}


def run_figure_data(records):
    """A run's log.jsonl records -> what its figure draws: the loss curve, the unseen base
    accuracy at the last example by step, and the last evaluation's curves per set with the
    baselines read on the same sequences."""
    evals = [r for r in records if "eval" in r]
    if not evals:
        raise ValueError("no evaluation in the log yet")
    last = evals[-1]["eval"]
    base = next(k for k in last if k.startswith("unseen "))
    return dict(loss=[(r["step"], r["loss"]) for r in records if "loss" in r],
                base=base, by_step=[(r["step"], r["eval"][base]["last"]) for r in evals],
                step=evals[-1]["step"],
                curves={k: dict(learner=v["curve"], **{b: s["curve"] for b, s in
                                                       v.get("baselines", {}).items()})
                        for k, v in last.items() if k.startswith("unseen ")})


def plot_run(records, path, title=""):
    plt = pyplot()
    d = run_figure_data(records)
    return save(plt, lambda: draw_run(plt, d, title), path)


def draw_run(plt, d, title):
    sets = list(d["curves"])
    fig, ax = plt.subplots(1, len(sets) + 1, figsize=(3.3 * (len(sets) + 1), 4.2), squeeze=False)
    for a, s in zip(ax[0], sets):
        for who, curve in d["curves"][s].items():
            color, ls = BASELINE_STYLE.get(who, ("C0", "-"))
            a.plot(range(1, len(curve) + 1), curve, color=color, ls=ls,
                   lw=2 if who == "learner" else 1.2,
                   label=f"learner (step {d['step']:,})" if who == "learner" else who)
        a.axhline(CHANCE, color="k", lw=0.5, ls=":")
        a.set(title=set_name(s), xlabel="examples seen", ylabel="accuracy", ylim=(0, 1))
    a = ax[0, -1]
    a.plot(*zip(*d["loss"]), color="0.4", lw=0.8, label="training loss")
    a.axhline(PLATEAU_LOSS, color="k", lw=0.5, ls=":")
    a.set(title="meta-training", xlabel="step", ylabel="loss (nats)", ylim=(0, 2.5))
    b = a.twinx()
    b.plot(*zip(*d["by_step"]), "o-", color="C0", ms=3,
           label=f"{set_name(d['base'])}, last example (right axis)")
    b.set(ylim=(0, 1), ylabel="accuracy")
    handles, labels = ax[0, 0].get_legend_handles_labels()
    for line in a.get_lines()[:1] + b.get_lines():
        handles.append(line)
        labels.append(line.get_label())
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9)  # off the data
    if title:
        fig.suptitle(title)
    return fig


def log_of(rec):
    """A sweep's record -> the log.jsonl records of its run that plot_run reads: the loss, each
    evaluation's summary, and the last in full (its curves and baselines)."""
    evals = [dict(step=e["step"], eval=e["results"]) for e in rec["evals"]]
    evals[-1]["eval"] = rec["final"]
    return [dict(step=s, loss=l) for s, l in rec["loss"]] + evals


def run_parser():
    p = train.Parser(prog="findings.py run", description="Draw one run's learning curves, the "
                     "learner beside the baselines on the same sequences, from its log.jsonl.")
    p.add_argument("run_dir", help="a train.py --out-dir, or with --record a results JSONL")
    p.add_argument("--record", help="the id of a sweep's record in run_dir, a results JSONL")
    p.add_argument("--out", help="the PNG (default RUN_DIR/curves.png)")
    p.add_argument("--title", default="", help="a line above the panels")
    return p


def main_run(argv):
    p = run_parser()
    a = p.parse_args(argv)
    out = os.path.join(a.run_dir, "curves.png") if a.out is None else a.out
    check_out_file(p, "--out", out, make_folder=True)
    log = a.run_dir if a.record else os.path.join(a.run_dir, "log.jsonl")
    if not os.path.isfile(log):
        p.error(f"{a.run_dir!r}: no log.jsonl there; is it a train.py --out-dir?")
    try:
        records = read_records(log)
        if a.record:  # a sweep's record holds what the run's log held: draw it the same way
            found = [r for r in records if r.get("id") == a.record]
            if not found:
                p.error(f"{a.run_dir!r} holds no record {a.record!r}")
            records = log_of(found[0])
        print(plot_run(records, out, a.title))
    except (OSError, ValueError, KeyError) as e:
        p.error(f"{a.run_dir!r}: {getattr(e, 'strerror', None) or e}")


def get_parser():
    p = train.Parser(prog="findings.py", description=__doc__.split("\n")[1])
    p.add_argument("name", choices=list(EXPERIMENTS) + ["all"], help="an experiment, or all of them")
    p.add_argument("--scale", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--out", help="results file (default results/NAME.jsonl, or NAME_gpu.jsonl)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (all experiments share them)")
    p.add_argument("--plot", action="store_true", help="draw results/NAME.png from the results file")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # one run's figure
        return main_run(argv[1:])
    p = get_parser()
    a = p.parse_args(argv)
    if not 1 <= a.jobs < 2 ** 31:
        p.error(f"--jobs {a.jobs} is not a positive number below 2**31")
    names = list(EXPERIMENTS) if a.name == "all" else [a.name]
    suffix = "" if a.scale == "cpu" else "_gpu"
    outs = {n: a.out if a.out is not None and a.name != "all" else
            os.path.join(ROOT, "results", f"{n}{suffix}.jsonl")
            for n in names}
    records = {}
    for n in names:  # every results file checked before any run starts or any figure is drawn
        if not a.plot:
            check_out_file(p, "--out", outs[n], make_folder=True)
        try:
            records[n] = read_records(outs[n])
        except (OSError, ValueError) as e:  # a folder, unreadable, not JSON, not UTF-8
            p.error(f"--out {outs[n]!r}: {getattr(e, 'strerror', None) or e}")
    if a.plot:
        for n in names:
            if not records[n]:
                p.error(f"no results in {outs[n]} yet; run `python experiments/findings.py {n}` first")
            print(plot(n, records[n], os.path.splitext(outs[n])[0] + ".png"))
        return
    items = []
    for n in names:
        runs = EXPERIMENTS[n](a.scale)
        stop = plateau_stop(dataset_of(dict(flags=runs[0][1]))) if n == "plateaus" else None
        items += [(n, a.scale, outs[n], os.path.join(ROOT, "runs", "exp", n + suffix), p, f, stop)
                  for p, f in runs]
    run_all(items, a.jobs)


if __name__ == "__main__":
    main()
