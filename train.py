"""
Meta-train a general-purpose in-context learner (paper sections 2 and 4).

    python train.py                                  # Transformer, the paper's one-GPU setting
    python train.py --model lstm --state-size 1024   # an LSTM whose state (h and c) is 1024 floats
    torchrun --nproc_per_node=8 train.py             # the same run, data parallel on 8 GPUs

Every flag has a default and a help text (`python train.py --help`). A run writes into --out-dir:
log.jsonl (training loss and evaluations, one JSON object per line), ckpt.pt (model, optimizer,
RNG states, config and step, replaced atomically) and summary.json. `--resume` continues a run
exactly where its last checkpoint left it: the meta-batch of step s is a pure function of
(seed, s), so the losses are the ones an uninterrupted run would have had.
"""
import argparse
import datetime
import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import gpicl
import models

# -----------------------------------------------------------------------------
# Command line: flags whose values are checked where they are read, with one-line errors


class Parser(argparse.ArgumentParser):
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
fraction = typed(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
# ours: beyond these, a size overflows inside torch (N_x = image_size^2 is one side of a matrix),
# a learner takes hours to build, or libgomp aborts the process (threads)
image_size_int = typed(int, lambda v: 0 < v <= 1024, "an image size from 1 to 1024")
layer_count = typed(int, lambda v: 0 < v <= 1024, "a number of layers from 1 to 1024")
thread_count = typed(int, lambda v: 0 < v <= 256, "a number of threads from 1 to 256")


MAX_TASKS = 2 ** 62  # task ids are drawn from 62 random bits (data.random_below)


def num_tasks_type(s):
    """'65536', '2**16', '2^16' -> 65536; 'fresh' -> None (a new task for every sequence)."""
    if s.lower() in ("fresh", "inf", "infinite"):
        return None
    base, sep, exp = s.replace("^", "**").partition("**")
    try:
        n = int(base) ** min(int(exp), 64) if sep else int(s)  # 2**10**9 would take forever
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_TASKS:
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a number of tasks; give an integer from 1 to 2**62 like 65536 or "
            "2**16, or 'fresh' for a new task every sequence")
    return n


def get_parser():
    p = Parser(description="Meta-train a general-purpose in-context learner (GPICL).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("tasks")
    g.add_argument("--dataset", default="mnist", choices=data.DATASETS,
                   help="base dataset that task augmentation turns into many tasks")
    g.add_argument("--image-size", type=image_size_int, default=14,
                   help="images are resized to this square size; N_x = image_size^2")
    g.add_argument("--seq-len", type=positive_int, default=100, help="examples per sequence")
    g.add_argument("--num-tasks", type=num_tasks_type, default=2 ** 25,
                   help="number of tasks: 65536, 2**16, or 'fresh' for a new task per sequence")
    g.add_argument("--bias", type=fraction, default=0.0,
                   help="fraction of every meta-batch that uses one fixed task (paper 4.3)")
    g.add_argument("--lookup-steps", type=nonneg_int, default=0,
                   help="curriculum: meta-train the first steps on pure in-context lookup tasks "
                        "(the Random dataset) with short sequences; shortens the plateau (README)")
    g.add_argument("--lookup-seq-len", type=positive_int, default=20,
                   help="sequence length during the lookup steps")
    g = p.add_argument_group("learner")
    g.add_argument("--model", default="transformer", choices=list(models.MODELS),
                   help="the learner")
    g.add_argument("--width", type=positive_int, help="model width (default: the learner's own)")
    g.add_argument("--n-layer", type=layer_count, help="layers (default: the learner's own)")
    g.add_argument("--n-head", type=positive_int, help="attention heads (Transformer)")
    g.add_argument("--state-size", type=positive_int,
                   help="pick the width so that the learner's state is exactly this many floats")
    g = p.add_argument_group("meta-training")
    g.add_argument("--steps", type=positive_int, default=50_000, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=128,
                   help="sequences per meta-batch, over all processes and accumulation steps")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="split each meta-batch into this many sequential micro-batches")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--adam-eps", type=positive_float, default=1e-8,
                   help="Adam epsilon; smaller shortens loss plateaus (paper 4.3)")
    g.add_argument("--warmup", type=nonneg_int, default=0, help="linear learning-rate warm-up steps")
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="learning rate after warm-up: constant, or cosine decay to 10%%")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="gradient norm clip")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the meta-batches and init")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=positive_int, default=1000, help="steps between evaluations")
    g.add_argument("--eval-tasks", type=positive_int, default=32, help="seen and unseen tasks evaluated")
    g.add_argument("--eval-seqs", type=positive_int, default=128, help="sequences per evaluated task")
    g.add_argument("--eval-datasets", default="uci_digits,random",
                   help="comma-separated other datasets to meta-test on (unseen tasks)")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between loss records")
    g.add_argument("--ckpt-every", type=positive_int,
                   help="steps between checkpoints (default: --eval-every)")
    g.add_argument("--out-dir", default="runs/default", help="where the log, checkpoint and summary go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the learner and task generation")
    g.add_argument("--threads", type=thread_count,
                   help="CPU threads for torch (default: torch's choice)")
    return p


# -----------------------------------------------------------------------------
# Checkpoints: written to a temporary file, then renamed over the old one in one step

def plain(value):
    """value with everything but tensors, numbers, strings, None, lists and dicts turned into a
    string: what torch.load(weights_only=True) reads back (gpicl.load_checkpoint). A config
    holding, say, a Path still saves, and a checkpoint never needs trusting to be loaded."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    return str(value)


def save_checkpoint(path, state):
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


# What defines the meta-batches of a run: a resumed run must keep them, or it continues another
RUN_KEYS = ("dataset", "image_size", "seq_len", "num_tasks", "bias", "lookup_steps",
            "lookup_seq_len", "batch_size", "seed")


NO_STEP = 2 ** 62  # "no step yet" for a step kept on the device


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "cosine":
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return args.lr


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill, a job scheduler, torchrun's agent


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


def main(argv=None):
    # `held` keeps the lock on --out-dir (one_run_per_folder) until the run ends
    with stop_on_signals() as stop, ExitStack() as held, \
            out_of_memory_in_one_line("train.py", "the learner, --batch-size or --eval-*"):
        meta_train(argv, stop, held)


def meta_train(argv, stop, held):
    parser = get_parser()
    args = parser.parse_args(argv)
    args.ckpt_every = args.ckpt_every or args.eval_every
    others = [d for d in args.eval_datasets.split(",") if d]
    for d in others:
        if d not in data.DATASETS or d == args.dataset:
            parser.error(f"--eval-datasets: {d!r} is not one of {', '.join(data.DATASETS)} "
                         f"other than {args.dataset}")
    if args.lookup_steps and args.lookup_seq_len > args.seq_len:
        parser.error(f"--lookup-seq-len {args.lookup_seq_len} is longer than --seq-len {args.seq_len}")
    if args.threads:
        torch.set_num_threads(args.threads)

    # --- processes and device: one process, or one per GPU under torchrun (nanoGPT style)
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
    master = rank == 0
    check_device(parser, args.device)
    device_type = torch.device(args.device).type
    micro = args.batch_size // (world * args.grad_accum)
    if micro * world * args.grad_accum != args.batch_size:
        parser.error(f"--batch-size {args.batch_size} does not split into {world} processes x "
                     f"{args.grad_accum} accumulation steps; "
                     f"make it a multiple of {world * args.grad_accum}")
    if device_type == "cuda":  # TF32 matmuls and bf16 autocast: the fast path on recent GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()

    # --- the learner
    n_x = args.image_size ** 2
    try:
        cfg = models.model_config(args.model, n_x + data.NUM_CLASSES, args.seq_len, args.width,
                                  args.n_layer, args.n_head, args.state_size)
    except ValueError as e:
        parser.error(f"--model {args.model}: {e}")
    model_config = dict(kind=args.model, n_in=n_x + data.NUM_CLASSES, n_out=data.NUM_CLASSES, cfg=cfg)
    torch.manual_seed(args.seed)
    model = models.build(args.model, n_x + data.NUM_CLASSES, data.NUM_CLASSES, **cfg).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, eps=args.adam_eps) if params else None
    if optimizer is None:  # sgd learns inside each sequence only: nothing to meta-train
        args.steps = 0

    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if master:  # one run per folder; under torchrun rank 0 holds it for all
            held.enter_context(one_run_per_folder(parser, args.out_dir))
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        parser.error(f"--out-dir {args.out_dir}: {getattr(e, 'strerror', None) or e}")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    step, elapsed, running_loss, last_logged = 0, 0.0, 0.0, 0
    if os.path.exists(ckpt_path) and not args.resume:
        parser.error(f"{args.out_dir} already holds a run; pass --resume to continue it, "
                     "or choose another --out-dir")
    if args.resume and os.path.exists(ckpt_path):
        try:
            ckpt = gpicl.load_checkpoint(ckpt_path, args.device)
        except ValueError as e:
            parser.error(f"--resume: {e}")
        if ckpt["model_config"] != plain(model_config):
            parser.error(f"--resume: the checkpoint in {args.out_dir} holds a different learner "
                         f"({ckpt['model_config']}); use the flags it was trained with")
        changed = [f"--{k.replace('_', '-')} {ckpt['config'].get(k)}" for k in RUN_KEYS
                   if ckpt["config"].get(k) != getattr(args, k)]
        if changed:
            parser.error(f"--resume: the run in {args.out_dir} was trained with {', '.join(changed)}; "
                         "resume it with the same flags")
        if (optimizer is not None and ckpt.get("optimizer") is None) or "rng" not in ckpt:
            parser.error(f"--resume: {ckpt_path} holds the learner's weights only, not a run to "
                         "continue; evaluate it with metatest.py, or meta-train in a new --out-dir")
        model.load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # the flag wins over the saved value
                group["eps"] = args.adam_eps
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())  # map_location moved it to the device
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        running_loss, last_logged = ckpt["running_loss"], ckpt["last_logged"]
    # --- data: the base dataset's train split for meta-training, test splits for meta-testing
    # (loaded after every check of the flags and of the run to resume: a bad one costs no wait)
    try:
        base = data.load_dataset(args.dataset, args.image_size, args.device)
        other_sets = {d: data.load_dataset(d, args.image_size, args.device) for d in others}
    except (OSError, RuntimeError, ValueError) as e:
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    x_train, y_train = base["train"]
    lookup = None
    if args.lookup_steps:
        lookup = data.load_dataset("random", args.image_size, args.device)["train"]

    if master:  # the log keeps exactly the records up to the checkpoint being continued
        kept = []
        if args.resume and os.path.exists(log_path):  # a line cut by a kill has no newline
            kept = [l for l in open(log_path) if l.endswith("\n") and json.loads(l)["step"] <= step]
        write_text(log_path, "".join(kept))

    if master:
        print(f"learner {args.model} {cfg} | parameters {models.num_params(model):,} | "
              f"state size {model.state_size(args.seq_len):,} floats")
        if not args.steps:
            print(f"{args.model} has no meta-parameters to train: evaluating it as it is")
        print(f"device {args.device} | {world} process(es) x {args.grad_accum} accumulation steps x "
              f"{micro} sequences = meta-batch {args.batch_size} | num_tasks "
              f"{args.num_tasks or 'fresh'} | N_x {n_x} | steps {step} -> {args.steps}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
        data.compile_task_generation()
    if ddp and args.steps:
        model = torch.nn.parallel.DistributedDataParallel(model)

    sets = gpicl.eval_sets((args.dataset, base), other_sets, args.num_tasks,
                           args.eval_tasks, args.eval_seqs, args.device)

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    saved = step if args.resume and os.path.exists(ckpt_path) else None  # the checkpoint's step

    def checkpoint():
        nonlocal saved
        saved = step
        save_checkpoint(ckpt_path, dict(
            model=raw_model.state_dict(), step=step,
            running_loss=running.item(), last_logged=last_logged,  # the loss not yet logged
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            elapsed=elapsed, config=plain(vars(args)), model_config=plain(model_config),
            rng=dict(torch=torch.get_rng_state())))

    def run_eval():
        results = gpicl.evaluate(raw_model, sets, args.seq_len, ctx=ctx)
        log(dict(step=step, time=time.time() - t0, eval=results,
                 regime=gpicl.regime(results, args.dataset)))
        return results

    # --- meta-training (a Ctrl-C is in `stop`; under torchrun every rank gets one, and they
    # agree on it at the next loss record's all-reduce)
    results, stopping = None, False
    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    running = torch.tensor(running_loss, device=args.device)  # loss summed since last_logged
    # A non-finite loss (NaN or inf) ends the run at its step: Adam has already put NaN into the
    # weights, and a checkpoint of them would replace the last good one. Reading the loss every
    # step would make the host wait for the device every step, so the first bad step stays on
    # the device (NO_STEP while there is none) and is read where the loop waits anyway, before
    # any loss record, evaluation or checkpoint of a step: none is ever written after a NaN.
    first_bad = torch.tensor(NO_STEP, device=args.device)

    def stop_if_not_finite():
        if ddp:  # one rank's NaN reaches every rank's weights through the averaged gradient
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        bad = int(first_bad.item())
        if bad == NO_STEP:
            return
        bar.close()  # the message on a line of its own
        if master:
            kept = (f"the checkpoint in {args.out_dir} is of step {saved}, before it; --resume it "
                    "with a smaller --lr or --grad-clip" if saved is not None else "no checkpoint "
                    "was written")
            print(f"train.py: error: the loss is not finite (NaN or inf) at step {bad}; stopped: "
                  f"{kept}", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        raise SystemExit(1)

    t0 = time.time() - elapsed
    try:
        while step < args.steps and not stopping:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            for m in range(args.grad_accum):
                first = (m * world + rank) * micro  # this micro-batch's place in the meta-batch
                seq_index = torch.arange(first, first + micro, device=args.device)
                warm = step < args.lookup_steps  # the lookup curriculum, then the real tasks
                x, y, _ = data.sample_sequences(*(lookup if warm else (x_train, y_train)), args.seed,
                                                step, seq_index,
                                                args.lookup_seq_len if warm else args.seq_len,
                                                args.num_tasks, args.bias, args.batch_size)
                sync = m == args.grad_accum - 1
                with (model.no_sync() if ddp and not sync else nullcontext()), ctx:
                    loss = gpicl.meta_loss(model, x, y) / args.grad_accum
                loss.backward()
                running += loss.detach()
                first_bad.clamp_(max=torch.where(torch.isfinite(loss.detach()), NO_STEP, step + 1))
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            stopping = bool(stop) and not ddp
            if (step % args.log_every == 0 or step % args.eval_every == 0 or stopping
                    or step % args.ckpt_every == 0 or step == args.steps):  # the host syncs below
                stop_if_not_finite()
            if step % args.log_every == 0 or step == args.steps:  # a loss record
                if ddp:
                    dist.all_reduce(running, op=dist.ReduceOp.AVG)
                    asked = torch.tensor(float(bool(stop)), device=args.device)
                    dist.all_reduce(asked, op=dist.ReduceOp.MAX)
                    stopping = asked.item() > 0
                mean_loss = running.item() / (step - last_logged)
                running.zero_()
                last_logged = step
                elapsed = time.time() - t0
                if master:
                    log(dict(step=step, loss=mean_loss, lr=lr_at(step - 1, args), time=elapsed))
                    bar.set_postfix(loss=f"{mean_loss:.3f}", **({} if results is None else
                                    {"unseen@last": f"{results[f'unseen {args.dataset}']['last']:.3f}"}))
            if master and (step % args.eval_every == 0 or step == args.steps):
                results = run_eval()
            if step % args.ckpt_every == 0 or step == args.steps or stopping:
                if ddp:  # the average over ranks, so that a resumed run logs the same loss
                    dist.all_reduce(running, op=dist.ReduceOp.AVG)
                if master:
                    elapsed = time.time() - t0
                    checkpoint()
    finally:
        bar.close()
    if stopping and step < args.steps:
        if master:
            print(f"\ninterrupted at step {step}; checkpoint saved, continue with --resume")
        if ddp:
            dist.destroy_process_group()
        sys.exit(128 + (stop[0] if stop else signal.SIGINT))  # 130 for Ctrl-C, 143 for SIGTERM

    if master:
        results = results or run_eval()
        if not os.path.exists(ckpt_path):  # a learner with nothing to train (sgd) still gets one
            checkpoint()
        summary = dict(step=step, train_time_s=round(elapsed, 1), model=args.model, model_config=cfg,
                       parameters=models.num_params(raw_model),
                       state_size=raw_model.state_size(args.seq_len),
                       regime=gpicl.regime(results, args.dataset),
                       results={k: {m: v for m, v in r.items() if m != "curve"}
                                for k, r in results.items()})
        write_text(os.path.join(args.out_dir, "summary.json"), json.dumps(summary, indent=1))
        print(gpicl.format_results(results))
        print(f"regime: {summary['regime']} | {step} steps in {elapsed / 60:.1f} min")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
