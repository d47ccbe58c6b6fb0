"""
The run's safety: what keeps a meta-training run (and every command line of the project) from
losing work or failing with a traceback. None of it is needed to follow the lesson in train.py,
and train.py enters each piece by one named call:

    1. one-line errors: the Parser, the flag validators, checks of devices and output files
    2. stopping: Ctrl-C and SIGTERM at the end of a step, the time budget, a non-finite loss,
       a failed allocation in one line, and the agreement of all ranks on a stop under torchrun
    3. the run's folder and checkpoint: one run per folder (a lock), atomic writes, the
       checkpoint format, and the checks before a run is resumed

It imports nothing of the project (bench.py, metatest.py and experiments.py use it too).
"""
import argparse
import datetime
import fcntl
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# 1. One-line errors: a bad value is one line on stderr and exit 2, never a traceback


class Parser(argparse.ArgumentParser):
    """The project's one argument parser (train.py, bench.py, metatest.py, experiments.py and
    data.py's fetch command)."""

    def error(self, message):  # one line, exit 2, no usage dump
        message = message.replace("\n", "\\n")  # a newline in a flag's value: still one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def typed(kind, test, what):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}")
        if not test(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}")
        return v
    return parse


# ours: counts and sizes stop below 2**31, where torch's C ints (torch.set_num_threads) overflow
# and sizes fail deep inside torch with a traceback
positive_int = typed(int, lambda v: 0 < v < 2 ** 31, "a positive integer below 2**31")
seed_int = typed(int, lambda v: 0 <= v < 2 ** 63, "a seed in [0, 2**63)")  # it goes into int64
nonneg_int = typed(int, lambda v: 0 <= v < 2 ** 31, "a non-negative integer below 2**31")
positive_float = typed(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonneg_float = typed(float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")
fraction = typed(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
# ours: beyond these, a size overflows inside torch (N_x = image_size^2 is one side of a matrix),
# a learner takes hours to build, or libgomp aborts the process (threads)
image_size_int = typed(int, lambda v: 0 < v <= 1024, "an image size from 1 to 1024")
layer_count = typed(int, lambda v: 0 < v <= 1024, "a number of layers from 1 to 1024")
thread_count = typed(int, lambda v: 0 < v <= 256, "a number of threads from 1 to 256")


def channel_count(s):
    """'1' or '3', written so (int() would also take other scripts' digits)."""
    if s not in ("1", "3"):
        raise argparse.ArgumentTypeError(f"{s!r} is not 1 or 3")
    return int(s)


def duration(s):
    """'300', '300s', '5m', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([smh]?)\s*", s, re.IGNORECASE)
    v = float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2].lower()] if m else 0.0
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"{s!r} is not a duration like 300, 300s, 5m or 1.5h")
    return v


def check_device(parser, device):
    """One line, not a traceback, for a device name torch does not know or cannot use here."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        parser.error(f"--device {device}: {(str(e).splitlines() or ['unusable'])[0]}")


def check_out_file(parser, flag, path, make_folder=False):
    """One line, before any work, for a file that cannot be written: no name, a NUL in it, a
    folder, in a folder that does not exist (make_folder: that cannot be made), read-only."""
    if not path or "\0" in path:
        parser.error(f"{flag} {path!r} is not a file name")
    if os.path.isdir(path):
        parser.error(f"{flag} {path} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if make_folder:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            parser.error(f"{flag} {path}: cannot make its folder ({e.strerror})")
    existed = os.path.exists(path)
    try:
        open(path, "a").close()  # append: nothing in it is lost
    except OSError as e:  # no such folder, read-only, a name too long...
        parser.error(f"{flag} {path}: {e.strerror}")
    if not existed:
        os.remove(path)


@contextmanager
def out_of_memory_in_one_line(prog, smaller):
    """An allocation that fails (CUDA's OutOfMemoryError, or a RuntimeError from torch's CPU
    allocator) is a fault at run time, not a bad flag: one line and exit 1, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
            raise
        why = str(e).split("DefaultCPUAllocator: ")[-1].splitlines()[0]
        print(f"{prog}: error: out of memory ({why}); make {smaller} smaller", file=sys.stderr)
        raise SystemExit(1)


# -----------------------------------------------------------------------------
# 2. Stopping safely: on Ctrl-C or SIGTERM, on the time budget, at the first non-finite loss

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill, a job scheduler, torchrun's agent
NO_STEP = 2 ** 62  # "no bad step yet", for a step number kept on the device


@contextmanager
def guarded_run(prog, smaller):
    """The context a meta-training run lives in: signals stop it at the end of a step
    (stop_on_signals), a failed allocation is one line, and what the run holds (the lock on its
    folder) is released when it ends. Yields the Guard that the loop asks after every step."""
    with stop_on_signals() as signals, ExitStack() as held, out_of_memory_in_one_line(prog, smaller):
        yield Guard(signals, held)


class Guard:
    """What the harness keeps of a run between steps: the signals asked, the clocks, the loss
    summed since the last record and the first step whose loss was not finite (both on the
    device, so that a step never waits for the host), and the step of the checkpoint on disk."""

    def __init__(self, signals, held):
        self.signals, self.held = signals, held
        self.ddp, self.master, self.device = False, True, "cpu"
        self.elapsed = 0.0  # training wall time, over all resumes
        self.last_logged = 0  # the step of the last loss record
        self.saved = None  # the step of the checkpoint on disk, None while there is none
        self.out_dir = None

    def start(self, args, *, ddp, master, ckpt=None):
        """Where the run lives, and (resuming) what its checkpoint kept of the loss and clocks."""
        self.ddp, self.master, self.device, self.out_dir = ddp, master, args.device, args.out_dir
        self.time_budget = args.time_budget
        self.running = torch.tensor(0.0 if ckpt is None else ckpt["running_loss"], device=args.device)
        self.first_bad = torch.tensor(NO_STEP, device=args.device)
        if ckpt is not None:
            self.saved, self.elapsed = ckpt["step"], ckpt["elapsed"]
            self.last_logged = ckpt["last_logged"]
        self.t0 = time.time() - self.elapsed
        self.started = time.time()  # the --time-budget counts from here, in a resumed run too

    def add_loss(self, loss, step):
        """Both on the device (reading a number from the GPU every step would stall the host on
        the device every step); a non-finite loss is read at the next step that writes."""
        self.running += loss
        self.first_bad.clamp_(max=torch.where(torch.isfinite(loss), NO_STEP, step + 1))

    def elapsed_now(self):
        return time.time() - self.t0

    def spent(self):
        return self.time_budget is not None and time.time() - self.started >= self.time_budget

    def after_step(self, step, args, bar):
        """-> (stopping, out_of_time, record): whether a signal or the time budget ends the run at
        this step, and whether this step writes a loss record. Under torchrun the ranks agree on
        both at records only, in the all-reduce the record needs anyway (any rank's signal, rank
        0's clock). A non-finite loss ends the run here (stop_if_not_finite), before anything of
        this step is written; the host waits for the device only at steps that write."""
        stopping, out_of_time = bool(self.signals) and not self.ddp, self.spent() and not self.ddp
        if (step % args.log_every == 0 or step % args.eval_every == 0 or stopping or out_of_time
                or step % args.ckpt_every == 0 or step == args.steps):
            self.stop_if_not_finite(bar)
        record = step % args.log_every == 0 or step == args.steps or out_of_time
        if record and self.ddp:
            dist.all_reduce(self.running, op=dist.ReduceOp.AVG)
            asked = torch.tensor([float(bool(self.signals)), float(self.master and self.spent())],
                                 device=self.device)
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            stopping, out_of_time = (asked > 0).tolist()
        return stopping, out_of_time, record

    def mean_loss(self, step):
        """The mean loss since the last record (under torchrun, over the ranks: after_step)."""
        mean = self.running.item() / (step - self.last_logged)
        self.running.zero_()
        self.last_logged = step
        self.elapsed = time.time() - self.t0
        return mean

    def stop_if_not_finite(self, bar):
        """A non-finite loss (NaN or inf) ends the run at its step: Adam has already put NaN into
        the weights, and a checkpoint of them would replace the last good one."""
        if self.ddp:  # one rank's NaN reaches every rank's weights through the averaged gradient
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MIN)
        bad = int(self.first_bad.item())
        if bad == NO_STEP:
            return
        bar.close()  # the message on a line of its own
        if self.master:
            kept = (f"the checkpoint in {self.out_dir} is of step {self.saved}, before it; --resume "
                    "it with a smaller --lr or --grad-clip" if self.saved is not None else
                    "no checkpoint was written")
            print(f"train.py: error: the loss is not finite (NaN or inf) at step {bad}; stopped: "
                  f"{kept}", file=sys.stderr)
        if self.ddp:
            dist.destroy_process_group()
        raise SystemExit(1)

    def before_save(self):
        """Under torchrun, the running loss averaged over ranks, so that a resumed run logs the
        same loss; the training time so far."""
        if self.ddp:
            dist.all_reduce(self.running, op=dist.ReduceOp.AVG)
        self.elapsed = time.time() - self.t0

    def exit_if_interrupted(self, stopping, step, steps):
        """After a signal: say how to continue, and exit 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
        if not (stopping and step < steps):
            return
        if self.master:
            print(f"\ninterrupted at step {step}; checkpoint saved, continue with --resume")
        if self.ddp:
            dist.destroy_process_group()
        sys.exit(128 + (self.signals[0] if self.signals else signal.SIGINT))

    def end(self):
        if self.ddp:
            dist.destroy_process_group()


@contextmanager
def stop_on_signals():
    """Within it, Ctrl-C (SIGINT, also a sweep's) or SIGTERM (kill, a cluster's scheduler before
    it preempts, torchrun passing either on to its ranks) appends the signal to the yielded list
    instead of ending the process: meta-training stops at the end of its step, so the checkpoint
    holds whole steps and the resumed run is exact. A second signal exits at once, saving
    nothing. The exit status is then 128 + the signal's number, as a shell reports a kill."""
    stop = []

    def request(signum, frame):
        if stop:
            print("\nstopped at once; the last checkpoint is the one to --resume", file=sys.stderr)
            raise SystemExit(128 + signum)
        stop.append(signum)
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{signal.Signals(signum).name}: stopping after this step (another one: "
                  "at once, without saving)", file=sys.stderr)

    main_thread = threading.current_thread() is threading.main_thread()  # signals need it
    old = {s: signal.signal(s, request) for s in STOP_SIGNALS} if main_thread else {}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            if handler is not None:
                signal.signal(s, handler)


# -----------------------------------------------------------------------------
# 3. The run's folder: one run per folder, the log, the checkpoint and its checks on resume

# What defines the meta-batches of a run: a resumed run must keep them, or it continues another
RUN_KEYS = ("preset", "dataset", "image_size", "channels", "seq_len", "num_tasks", "bias", "bias_task",
            "bias_steps", "seqs_per_task", "lookup_steps", "lookup_seq_len", "batch_size", "seed")
# 2: fixed-permutation bias, task slots, optax's Adam, key size. 3: the bias drawn per task id
# (other meta-batches: a run of format 2 cannot continue as 3), one bias per LSTM gate, and
# clearer names ("flags", "learner" with its "sizes"); format 2's weights still load (load_checkpoint)
CHECKPOINT_FORMAT = 3
RESUMABLE_FORMATS = (3,)


def open_run(parser, args, guard, learner, *, master, trains):
    """Make and lock --out-dir; -> the checkpoint to continue (--resume), checked against this
    run (its learner, its meta-batches, and that it is a run, not weights only: `trains` says
    this learner has an optimizer to restore), or None for a new run. A folder that holds a run
    is never overwritten."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if master:  # one run per folder; under torchrun rank 0 holds it for all
            guard.held.enter_context(one_run_per_folder(parser, args.out_dir))
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        parser.error(f"--out-dir {args.out_dir}: {getattr(e, 'strerror', None) or e}")
    path = ckpt_path(args)
    if not os.path.exists(path):
        return None
    if not args.resume:
        parser.error(f"{args.out_dir} already holds a run; pass --resume to continue it, "
                     "or choose another --out-dir")
    try:
        ckpt = load_checkpoint(path, args.device)  # weights_only: no code runs
    except ValueError as e:
        parser.error(f"--resume: {e}")
    if ckpt.get("format") not in RESUMABLE_FORMATS:
        parser.error(f"--resume: {path} was written by an older gpicl (before the bias drawn "
                     "per task id), whose meta-batches this one cannot continue; start a new "
                     "--out-dir")
    if ckpt["learner"] != plain(learner):
        parser.error(f"--resume: the checkpoint in {args.out_dir} holds a different learner "
                     f"({ckpt['learner']}); use the flags it was trained with")
    changed = [f"--{k.replace('_', '-')} {ckpt['flags'].get(k)}" for k in RUN_KEYS
               if ckpt["flags"].get(k) != getattr(args, k)]
    if changed:
        parser.error(f"--resume: the run in {args.out_dir} was trained with {', '.join(changed)}; "
                     "resume it with the same flags")
    if (trains and ckpt.get("optimizer") is None) or "rng" not in ckpt:
        parser.error(f"--resume: {path} holds the learner's weights only, not a run to "
                     "continue; evaluate it with metatest.py, or meta-train in a new --out-dir")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """The dict of a train.py checkpoint, read safely: the one place where checkpoints are loaded.

    torch.load(weights_only=True) rebuilds only tensors, dicts, lists, tuples, numbers, strings
    and None, never an arbitrary object, so a file from a stranger cannot run code as it loads
    (a pickle may name any function to call; this refuses every one). A missing, truncated or
    corrupted file, or one that is refused, is a one-line ValueError. A checkpoint written
    before format 3 has its keys renamed as format 3 names them ("config" -> "flags",
    "model_config" -> "learner", its "cfg" -> "sizes"); its "format" stays what it was."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} " + ("is a folder, not a file" if os.path.isdir(path)
                                                  else "does not exist"))
    try:
        with warnings.catch_warnings():  # e.g. a pickle protocol warning: our error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except PermissionError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except pickle.UnpicklingError as e:  # refused, or garbage that the safe unpickler cannot read
        why = str(e).partition("WeightsUnpickler error:")[2].strip() or str(e)
        why = why.splitlines()[0].split(" was not an allowed global")[0]
        raise ValueError(f"{path} is refused: it is not made of tensors, numbers and strings only "
                         f"({why}); loading it could run code, or it is corrupted") from None
    except Exception as e:  # truncated or corrupted: zip, pickle and storage errors alike
        why = (str(e).splitlines() or [""])[0][:100]
        raise ValueError(f"{path} is truncated or corrupted ({type(e).__name__}: {why})") from None
    if isinstance(ckpt, dict) and ckpt.get("format", 1) < 3:  # names before format 3
        if "config" in ckpt:
            ckpt["flags"] = ckpt.pop("config")
        if isinstance(ckpt.get("model_config"), dict):
            ckpt["learner"] = dict(ckpt.pop("model_config"))
            if "cfg" in ckpt["learner"]:
                ckpt["learner"]["sizes"] = ckpt["learner"].pop("cfg")
    missing = [k for k in ("model", "learner", "flags") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (no {', '.join(missing)} in it)")
    return ckpt


def ckpt_path(args):
    return os.path.join(args.out_dir, "ckpt.pt")


def save_run(args, guard, step, model, optimizer, learner):
    """Checkpoint the run at `step` (rank 0 only: the ranks' weights are the same): everything a
    resumed run needs to continue exactly, in the CHECKPOINT_FORMAT."""
    guard.saved = step
    save_checkpoint(ckpt_path(args), dict(
        model=model.state_dict(), step=step,
        running_loss=guard.running.item(), last_logged=guard.last_logged,  # the loss not yet logged
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        elapsed=guard.elapsed, flags=plain(vars(args)), learner=plain(learner),
        format=CHECKPOINT_FORMAT, rng=dict(torch=torch.get_rng_state())))


def plain(value):
    """value with everything but tensors, numbers, strings, None, lists and dicts turned into a
    string: what torch.load(weights_only=True) reads back (load_checkpoint). Flags holding,
    say, a Path still save, and a checkpoint never needs trusting to be loaded."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    return str(value)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename it over the old checkpoint: a rename is one step,
    so a kill or a full disk mid-write leaves the last good checkpoint, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)


def write_text(path, text):
    """Replace a file in one step, so a kill never leaves it half-written."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def log(args, record):
    with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def restart_log(args, step):
    """The log keeps exactly the records up to the checkpoint being continued (none for a new
    run): a resumed run then appends what an uninterrupted one would have written."""
    path, kept = os.path.join(args.out_dir, "log.jsonl"), []
    if args.resume and os.path.exists(path):  # a line cut by a kill has no newline
        kept = [l for l in open(path) if l.endswith("\n") and json.loads(l)["step"] <= step]
    write_text(path, "".join(kept))


@contextmanager
def one_run_per_folder(parser, out_dir):
    """Hold an exclusive lock on out_dir/lock while the run lives: a second train.py on the same
    --out-dir is refused instead of interleaving its log and checkpoints with the first. The OS
    drops a flock when its process ends, however it ends (SIGKILL, a crash), so a killed run
    never leaves its folder locked; the file itself stays, and means nothing unlocked."""
    f = open(os.path.join(out_dir, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        parser.error(f"--out-dir {out_dir} is in use by a running train.py (pid {holder}); "
                     "wait for it or stop it, or choose another --out-dir")
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock: an in-process caller may run again in this folder


# -----------------------------------------------------------------------------
# 4. The processes and the device (as nanoGPT: RANK set means one process per GPU, torchrun)

@dataclass
class Env:
    """Where this process runs: its rank among `world` processes, its micro-batch size, and the
    precision context of forward passes."""
    ddp: bool
    rank: int
    world: int
    micro: int
    ctx: object

    @property
    def master(self):  # rank 0 logs, evaluates and checkpoints for all
        return self.rank == 0


def setup_processes(parser, args):
    """One process, or one per GPU under torchrun (as nanoGPT: RANK set means DDP)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available() else
                       "mps" if torch.backends.mps.is_available() else "cpu")
    if ddp:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        # only rank 0 evaluates while the others wait in the next all-reduce: a long evaluation
        # (VSML, MAML, large --eval-*) must not trip the default 10-minute collective timeout
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
    check_device(parser, args.device)  # one line for a device torch cannot use
    device_type = torch.device(args.device).type
    if device_type == "cuda":  # TF32 matmuls and bf16 autocast: the fast path on recent GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    micro = max(1, args.batch_size // (world * args.grad_accum))  # sequences per micro-step
    return Env(ddp=ddp, rank=rank, world=world, micro=micro, ctx=ctx)
