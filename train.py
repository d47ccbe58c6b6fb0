"""
Meta-train a general-purpose in-context learner (Kirsch et al. 2022, sections 2 and 4).

    python train.py                                  # a preset: paper on a GPU, cpu elsewhere
    python train.py --model lstm --state-size 1024   # an LSTM whose state (h and c) is 1024 floats
    torchrun --nproc_per_node=8 train.py             # the same run, data parallel on 8 GPUs

From a task id to a parameter update the data passes three files: data.py (task id -> A and
rho -> sequences -> tokens [A x_t ; onehot(rho(y_{t-1}))]), models.py (tokens -> logits) and this
one (the loss at every position, backward, Adam's step); gpicl.py meta-tests the learner beside
1-NN, logistic regression and SGD on the very same sequences. Read on: the flags, the meta-batch,
main() and its loop, then what a run needs to lose nothing. A run writes log.jsonl, ckpt.pt and
summary.json into --out-dir, and `--resume` continues it exactly.
"""
import argparse
import datetime
import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import gpicl
import models

# -----------------------------------------------------------------------------
# The flags. A preset fills every flag left unset: `paper` on a GPU, `cpu` elsewhere.
# paper: the authors' code defaults (research/data_driven: 14x14 MNIST, 16 task slots x 32
#   sequences, optax's Adam with eps_root 1e-8, 50,000 steps, the Transformer 512 wide with 4
#   layers of 8 heads of key size 32); 2^25 tasks (the top of the paper's sweep) and identity
#   labels for half the task ids (the paper biases "a fraction"; 0.5 is ours).
# cpu: ours, learns in context on 2 CPU cores in 12-15 minutes (experiments/NOTEBOOK.md):
#   7x7 MNIST, a fresh task for every sequence, batch 128, Adam at 2e-3 after 100 warm-up steps,
#   constant through the loss plateau, then cooled down over the last quarter (wsd).
PRESETS = {
    "paper": dict(image_size=14, num_tasks=2 ** 25, bias=0.5, seqs_per_task=32, batch_size=512,
                  adam_eps_root=1e-8, lr=1e-3, warmup=0, schedule="constant", steps=50_000,
                  eval_every=1000, eval_tasks=32, eval_seqs=128,
                  width=512, n_layer=4, n_head=8, key_size=32),
    "cpu": dict(image_size=7, num_tasks=data.FRESH, bias=0.5, seqs_per_task=1, batch_size=128,
                adam_eps_root=0.0, lr=2e-3, warmup=100, schedule="wsd", steps=3000,
                eval_every=1000, eval_tasks=16, eval_seqs=32,
                width=128, n_layer=2, n_head=4, key_size=32),
}
# cpu, the other learners (ours): their own sizes, batch 64, lr 1e-3, a 13-minute --time-budget
# (each ends in about 15 minutes); the LSTM 64 wide (state 128) unless --width or --state-size:
# at state 1,024 it gets about 1,900 steps in the budget, too few to leave the loss plateau.
OTHER_LEARNERS_CPU = dict(batch_size=64, steps=20_000, lr=1e-3, warmup=0, schedule="constant",
                          time_budget=13 * 60, eval_every=1000, eval_seqs=16)
CPU_LEARNER_WIDTH = {"lstm": 64}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is one line (a newline in a value too), exit 2
        self.exit(2, f"{self.prog}: error: " + message.replace("\n", "\\n") + " (see --help)\n")


def num_tasks(s):
    """'65536', '2**16', '2^16' -> 65536; 'fresh' -> data.FRESH (a new task every sequence)."""
    base, _, exp = s.replace("^", "**").partition("**")
    n = data.FRESH if s == "fresh" else int(base) ** min(int(exp or 1), 64)
    if not 1 <= n <= data.FRESH:
        raise ValueError(s)  # argparse: "invalid num_tasks value", one line
    return n


def duration(s):
    """'300', '300s', '5m', '1.5h' -> seconds (a ValueError is argparse's one line)."""
    unit = {"s": 1, "m": 60, "h": 3600}.get(s[-1:].lower())
    return float(s[:-1] if unit else s) * (unit or 1)


def get_parser():
    p = Parser(prog="train.py", description="Meta-train a general-purpose in-context learner.")
    preset = lambda key, text: f"{text} (preset: paper {PRESETS['paper'][key]}, cpu " \
                               f"{'fresh' if key == 'num_tasks' else PRESETS['cpu'][key]})"
    add = p.add_argument
    # tasks: the base dataset, task augmentation, the meta-batch
    add("--preset", choices=list(PRESETS), help="defaults for every flag marked preset")
    add("--dataset", default="mnist", choices=data.DATASETS, help="the base dataset")
    add("--image-size", type=int, help=preset("image_size", "square image size: N_x = size^2"))
    add("--seq-len", type=int, default=100, help="examples per sequence")
    add("--num-tasks", type=num_tasks, help=preset("num_tasks", "65536, 2**16 or fresh"))
    add("--bias", type=float, help=preset("bias", "fraction of task ids with identity labels"))
    add("--bias-steps", type=int, default=0, help="the bias for the first steps only (0: all)")
    add("--seqs-per-task", type=int, help=preset("seqs_per_task", "sequences per task slot"))
    add("--lookup-steps", type=int, default=0, help="first steps on random-image lookup tasks")
    add("--lookup-seq-len", type=int, default=20, help="sequence length of the lookup steps")
    # the learner
    add("--model", default="transformer", choices=list(models.MODELS), help="the learner")
    add("--width", type=int, help=preset("width", "width (other learners: their own)"))
    add("--n-layer", type=int, help=preset("n_layer", "layers (other learners: their own)"))
    add("--n-head", type=int, help=preset("n_head", "attention heads"))
    add("--key-size", type=int, help=preset("key_size", "per-head key size"))
    add("--state-size", type=int, help="size the learner so its state is exactly this many floats")
    add("--window", type=int, help="the Transformer attends to the last W tokens: a KV cache of W")
    # meta-training
    add("--steps", type=int, help=preset("steps", "optimizer steps"))
    add("--time-budget", type=duration, help="stop after this much training (300, 5m, 1.5h)")
    add("--batch-size", type=int, help=preset("batch_size", "sequences per meta-batch"))
    add("--lr", type=float, help=preset("lr", "Adam's learning rate"))
    add("--adam-eps-root", type=float, help=preset("adam_eps_root", "optax's eps_root"))
    add("--warmup", type=int, help=preset("warmup", "linear warm-up steps"))
    add("--schedule", choices=["constant", "wsd"], help=preset("schedule", "lr after warm-up"))
    add("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: never)")
    add("--seed", type=int, default=0, help="seed of the meta-batches and the init")
    # evaluation, output, system
    add("--eval-every", type=int, help=preset("eval_every", "steps between evaluations"))
    add("--eval-tasks", type=int, help=preset("eval_tasks", "seen and unseen tasks evaluated"))
    add("--eval-seqs", type=int, help=preset("eval_seqs", "sequences per evaluated task"))
    add("--eval-datasets", default="uci_digits,random", help="other datasets, on unseen tasks")
    add("--baselines", default="on", choices=["on", "off"], help="1-NN, logistic regression, SGD")
    add("--log-every", type=int, default=50, help="steps between loss records")
    add("--ckpt-every", type=int, help="steps between checkpoints (default: --eval-every)")
    add("--out-dir", default="runs/default", help="where log.jsonl, ckpt.pt, summary.json go")
    add("--resume", action="store_true", help="continue the run in --out-dir")
    add("--device", default="auto", help="auto (cuda, mps, then cpu) or a torch device")
    add("--compile", action="store_true", help="torch.compile the learner")
    add("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return p


def apply_preset(args):
    """Fill every flag left unset (None) from the preset; an explicit flag always wins."""
    if args.preset is None:
        gpu = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
        args.preset = "paper" if gpu else "cpu"
    preset = dict(PRESETS[args.preset])
    if args.model != "transformer":  # the other learners keep their own sizes
        preset = {k: v for k, v in preset.items() if k not in models.Transformer.defaults}
        if args.preset == "cpu":
            preset.update(OTHER_LEARNERS_CPU)
            if args.model in CPU_LEARNER_WIDTH and args.state_size is None:
                preset["width"] = CPU_LEARNER_WIDTH[args.model]
    elif args.state_size is not None:  # the state size picks the key size
        del preset["key_size"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.ckpt_every = args.ckpt_every or args.eval_every


# What type= cannot say, the ranges: counts below 2**31 (torch's C ints overflow), the seed below
# 2**63 (int64), at most 1,024 layers or pixels a side, 256 threads (OpenMP aborts beyond).
POSITIVE = ("image_size", "seq_len", "seqs_per_task", "lookup_seq_len", "width", "n_layer",
            "n_head", "key_size", "state_size", "window", "steps", "batch_size", "eval_every",
            "eval_tasks", "eval_seqs", "log_every", "ckpt_every", "threads", "lr", "time_budget")
NON_NEGATIVE = ("bias_steps", "lookup_steps", "warmup", "adam_eps_root", "grad_clip", "seed")
TOP = dict(seed=2 ** 63, threads=257, image_size=1025, n_layer=1025)


def check_flags(parser, args):
    """Ranges, and flags that must fit together. -> the other datasets to meta-test on."""
    for k in POSITIVE + NON_NEGATIVE:
        v = getattr(args, k)
        if v is not None and not (0 <= v < TOP.get(k, 2 ** 31) and (v > 0 or k in NON_NEGATIVE)):
            parser.error(f"--{k.replace('_', '-')} {v} is out of range")
    if not 0 <= args.bias < 1:
        parser.error(f"--bias {args.bias} is not a fraction in [0, 1)")
    if args.batch_size % args.seqs_per_task:
        parser.error(f"--seqs-per-task {args.seqs_per_task} does not divide --batch-size")
    if args.lookup_steps and args.lookup_seq_len > args.seq_len:
        parser.error(f"--lookup-seq-len {args.lookup_seq_len} is longer than --seq-len")
    others = [d for d in args.eval_datasets.split(",") if d]
    if any(d not in data.DATASETS or d == args.dataset for d in others):
        parser.error(f"--eval-datasets: choose from {', '.join(data.DATASETS)} but --dataset")
    return others


def lr_at(step, args):
    """The learning rate of `step`: linear warm-up, then constant or wsd."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "wsd":  # ours: constant through the plateau, then a linear cool-down
        t = (step - 0.75 * args.steps) / (0.25 * args.steps)  # to 10% over the last quarter
        return args.lr * (1 - 0.9 * min(max(t, 0.0), 1.0))
    return args.lr


# -----------------------------------------------------------------------------
# The meta-batch: sequences from freshly augmented tasks (data.py)

def get_batch(args, splits, step, seq_index):
    """Sequences seq_index (B,) of step `step`'s meta-batch, a pure function of (seed, step,
    seq_index): each process draws its slice of one meta-batch, and a resumed run what an
    uninterrupted one would have. The first --lookup-steps draw random-image lookup tasks."""
    lookup = step < args.lookup_steps
    x, y, _ = data.sample_sequences(
        *splits["lookup" if lookup else "train"], seed=args.seed, step=step, seq_index=seq_index,
        seq_len=args.lookup_seq_len if lookup else args.seq_len, num_tasks=args.num_tasks,
        bias=bias_at(step, args), seqs_per_task=args.seqs_per_task)  # (B, T, N_x), (B, T)
    return data.make_tokens(x, y), y


bias_at = lambda step, args: args.bias if step < (args.bias_steps or float("inf")) else 0.0


# -----------------------------------------------------------------------------
# main: the flags, the device, the learner, the run's folder and data, then the loop

def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    apply_preset(args)
    others = check_flags(parser, args)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ddp = "RANK" in os.environ  # one process per GPU under torchrun (as nanoGPT)
    ctx = setup_device(parser, args, ddp)
    master = not ddp or dist.get_rank() == 0  # rank 0 logs, evaluates and checkpoints for all
    model, model_args = build_learner(parser, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = models.Adam(params, lr=args.lr, eps_root=args.adam_eps_root) if params else None
    args.steps = args.steps if params else 0  # sgd learns inside each sequence only
    run = dict(step=0, running_loss=0.0, last_logged=0, elapsed=0.0)  # what a resume restores
    ckpt = open_run(parser, args, model_args, trains=bool(params))
    if ckpt:
        model.load_state_dict(ckpt["model"])
        if optimizer:
            optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"].cpu())
        run.update({k: ckpt[k] for k in run})
    splits, evaluator = load_data(parser, args, model, others, ctx, baselines=master)
    save = lambda: save_checkpoint(args, model, optimizer, model_args, run)
    SIGNAL[0], main_thread = 0, threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, ask_to_stop) for s in STOPS} if main_thread else {}
    try:
        signum = train(args, model, optimizer, splits, evaluator, run, save, ctx)
    finally:  # the handlers as they were (tests and sweeps call main() in one process)
        for s, h in handlers.items():
            signal.signal(s, h)
    interrupted = signum and run["step"] < args.steps
    if master and interrupted:
        print(f"\ninterrupted at step {run['step']}; checkpoint saved, continue with --resume")
    elif master:
        finish(args, evaluator, run, model, save)
    if ddp:
        dist.destroy_process_group()
    if interrupted:
        sys.exit(128 + signum)  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them


def build_learner(parser, args):
    """The learner by name, by its sizes, or by the size of its state (models.py), printed in
    one line with its state size and parameter count. -> (model, the arguments that rebuild it)"""
    n_in = args.image_size ** 2 + data.NUM_CLASSES  # a token: x_t and y_{t-1}
    try:
        sizes = models.learner_sizes(args.model, n_in, args.seq_len, width=args.width,
                                     n_layer=args.n_layer, n_head=args.n_head,
                                     state_size=args.state_size, key_size=args.key_size,
                                     window=args.window)
        model_args = dict(kind=args.model, n_in=n_in, n_out=data.NUM_CLASSES, **sizes)
        torch.manual_seed(args.seed)
        model = models.build(**model_args).to(args.device)
    except (ValueError, RuntimeError) as e:  # a size it does not take, or too large for memory
        parser.error(f"--model {args.model}: {(str(e).splitlines() or ['failed'])[0][:200]}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        shown = ", ".join(f"{k} {v}" for k, v in sizes.items() if k != "seq_len" and v)
        budget = f" or {args.time_budget / 60:g} minutes" if args.time_budget else ""
        print(f"preset {args.preset}: {args.model} ({shown}; state size "
              f"{model.state_size(args.seq_len):,} floats; {models.num_params(model):,} "
              f"parameters) on {args.image_size}x{args.image_size} {args.dataset}, "
              f"{args.steps:,} steps{budget} of {args.batch_size:,} sequences, {args.device}")
        if args.preset == "cpu" and args.model == "lstm" and sizes["width"] > 64:  # no surprise
            print("what to expect: in 13 minutes on 2 CPU cores this LSTM stays on the loss "
                  "plateau, at chance (1,919 steps at state 1,024: results/learning_curves.jsonl)."
                  " The preset's 64-wide LSTM (`--model lstm`) leaves it near step 11,700 "
                  "(results/state_size.jsonl); a GPU (--preset paper) gives 50,000 steps.")
    return model, model_args


def load_data(parser, args, model, others, ctx, baselines):
    """The base dataset's train split becomes tasks; its test split, and the other datasets',
    meta-test (gpicl.eval_sets), beside the baselines if asked (rank 0 only evaluates)."""
    try:
        load = lambda name: data.load_dataset(name, args.image_size, args.device)
        base, other_sets = load(args.dataset), {d: load(d) for d in others}
    except (OSError, ValueError) as e:  # e.g. a dataset not downloaded
        parser.error((str(e).splitlines() or [type(e).__name__])[0])
    lookup = load("random")["train"] if args.lookup_steps else None  # the curriculum's tasks
    splits = dict(train=base["train"], lookup=lookup)
    eval_sets = gpicl.eval_sets((args.dataset, base), other_sets, num_tasks=args.num_tasks,
                                eval_tasks=args.eval_tasks, eval_seqs=args.eval_seqs,
                                device=args.device, bias=bias_at(args.steps - 1, args))
    baselines = baselines and args.baselines == "on" and gpicl.make_baselines(
        gpicl.choose_l2(*splits["train"], args.seq_len))  # logistic regression's L2: training tasks
    return splits, gpicl.Evaluator(model, eval_sets, args.seq_len, baselines or None, ctx)


def train(args, model, optimizer, splits, evaluator, run, save, ctx):
    """Minimise the meta-loss with Adam until --steps, a Ctrl-C or SIGTERM, or --time-budget."""
    ddp = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if args.compile and optimizer:
        model = torch.compile(model)
    if ddp and optimizer:  # averages the gradients of the processes inside backward()
        model = torch.nn.parallel.DistributedDataParallel(model)
    micro = args.batch_size // world  # this process's slice of every meta-batch
    seq_index = torch.arange(rank * micro, (rank + 1) * micro, device=args.device)
    running = torch.tensor(run["running_loss"], device=args.device)  # read at records only:
    bar = tqdm(total=args.steps, initial=run["step"], disable=rank > 0)  # no sync every step
    t0, started, signum, out_of_time = time.time() - run["elapsed"], time.time(), 0, False
    while run["step"] < args.steps and not (signum or out_of_time):
        step = run["step"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        tokens, y = get_batch(args, splits, step, seq_index)         # (B, T, N_x + 10), (B, T)
        with ctx:
            logits = model(tokens)  # (B, T, 10): a prediction of y_t at every position t
        # the meta-loss: cross-entropy at every position, averaged (paper section 2)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        run["step"] = step = step + 1
        bar.update(1)
        record = step % args.log_every == 0 or step == args.steps
        signum, out_of_time = should_stop(args, started, ddp, record)
        last = step == args.steps or signum or out_of_time
        if record or last or step % args.ckpt_every == 0:
            if ddp:  # the mean over the processes: what one process with the whole batch sees
                dist.all_reduce(running, op=dist.ReduceOp.AVG)
            if not torch.isfinite(running):  # NaN or inf: stop before its weights are saved
                sys.exit(f"train.py: error: the loss is not finite by step {step}; any checkpoint"
                         f" in {args.out_dir} is from before: --resume with a smaller --lr")
        run["elapsed"] = time.time() - t0
        if record or out_of_time:  # (a signal: the loss not yet logged goes into the checkpoint)
            mean = running.item() / (step - run["last_logged"])
            running.zero_()
            run["last_logged"] = step
            if rank == 0:
                log(args, dict(step=step, loss=mean, lr=lr_at(step - 1, args), time=run["elapsed"]))
                bar.set_postfix(loss=f"{mean:.3f}")
        if rank == 0 and (step % args.eval_every == 0 or last and not signum):
            evaluate(args, evaluator, step, run["elapsed"], show=not last)  # the others wait
        if step % args.ckpt_every == 0 or last:
            run["running_loss"] = running.item()  # the loss not yet logged: an exact resume
            if rank == 0:
                save()
    bar.close()
    return signum


def setup_device(parser, args, ddp):
    """The device, and under torchrun the process group. -> the context of forward passes:
    on a GPU bf16 autocast, with TF32 matmuls, the fast path on recent GPUs."""
    if args.device == "auto":
        args.device = ("cuda" if torch.cuda.is_available() else
                       "mps" if torch.backends.mps.is_available() else "cpu")
    if ddp:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        # rank 0 evaluates while the others wait in the next all-reduce: give it 2 hours, not 10 min
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
        if args.batch_size % dist.get_world_size():
            parser.error(f"--batch-size {args.batch_size} does not split into the processes")
    try:
        torch.empty(1, device=args.device)
    except (RuntimeError, ValueError, AssertionError) as e:  # a device torch cannot use here
        parser.error(f"--device {args.device}: {(str(e).splitlines() or ['unusable'])[0]}")
    if torch.device(args.device).type != "cuda":
        return nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# Losing nothing: one run per folder, safe and atomic checkpoints, exact resume, clean stops

# the flags that fix the meta-batches: a run resumed with others would continue another run
STOPS = (signal.SIGINT, signal.SIGTERM)
RUN_KEYS = ("preset", "dataset", "image_size", "seq_len", "num_tasks", "bias", "bias_steps",
            "seqs_per_task", "lookup_steps", "lookup_seq_len", "batch_size", "seed")


def open_run(parser, args, model_args, trains):
    """-> the checkpoint to continue (--resume), checked to be this run's, or None for a new run.
    A folder that holds a run is never written over."""
    path, log_path = (os.path.join(args.out_dir, f) for f in ("ckpt.pt", "log.jsonl"))
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if os.path.exists(path) and not args.resume:
            parser.error(f"{args.out_dir} holds a run; --resume it, or choose another --out-dir")
        ckpt = gpicl.load_checkpoint(path, args.device) if os.path.exists(path) else None
    except (OSError, ValueError) as e:  # no permission, a NUL in the name; a checkpoint cut short
        parser.error(f"--out-dir {args.out_dir}: {getattr(e, 'strerror', None) or e}")
    if ckpt is not None:  # (gpicl.load_checkpoint reads weights only: no code in the file runs)
        changed = [f"--{k.replace('_', '-')} {ckpt['flags'].get(k)}" for k in RUN_KEYS
                   if ckpt["flags"].get(k) != getattr(args, k)]
        if ckpt["model_args"] != model_args or changed:
            parser.error(f"--resume: {path} was trained with another learner "
                         f"({ckpt['model_args']}) or flags ({', '.join(changed)})")
        if trains and ckpt.get("optimizer") is None or "rng" not in ckpt:
            parser.error(f"--resume: {path} holds weights only, not a run to continue")
    # the log keeps the records up to the checkpoint continued (none in a new run): a resumed run
    # appends what an uninterrupted one would have written (a line cut by a kill has no newline)
    kept = [l for l in open(log_path) if l.endswith("\n") and json.loads(l)["step"] <=
            ckpt["step"]] if ckpt and os.path.exists(log_path) else []
    with open(log_path, "w") as f:
        f.writelines(kept)
    return ckpt


def save_checkpoint(args, model, optimizer, model_args, run):
    """Write a temporary file, then rename it over the last checkpoint: a rename is one step, so
    a kill or a full disk mid-write leaves the last good checkpoint, never half of one."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    state = dict(model=model.state_dict(), model_args=model_args, flags=vars(args), **run,
                 optimizer=optimizer and optimizer.state_dict(), rng=torch.get_rng_state())
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(path + ".tmp", path)


def log(args, record):
    with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


SIGNAL = [0]  # set by Ctrl-C (SIGINT) or a kill (SIGTERM), read by the loop after its step: the
#               checkpoint then holds whole steps, and the run resumes exactly


def ask_to_stop(signum, frame):
    SIGNAL[0] = signum
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    print(f"\n{signal.Signals(signum).name}: stopping after this step", file=sys.stderr)


def should_stop(args, started, ddp, at_record):
    """-> (the signal to stop on or 0, whether --time-budget is spent). Under torchrun the ranks
    agree at loss records only (any rank's signal, rank 0's clock): all stop at one step."""
    spent = args.time_budget is not None and time.time() - started >= args.time_budget
    if not ddp:
        return SIGNAL[0], spent
    if not at_record:
        return 0, False
    asked = torch.tensor([float(SIGNAL[0]), float(spent and dist.get_rank() == 0)])
    dist.all_reduce(asked, op=dist.ReduceOp.MAX)
    return int(asked[0]), bool(asked[1])


# -----------------------------------------------------------------------------
# Evaluation (gpicl.py) and the summary

def evaluate(args, evaluator, step, time_s, show):
    results = evaluator()
    regime = gpicl.regime(results, args.dataset)
    log(args, dict(step=step, time=time_s, eval=results, regime=regime))
    if show:  # on lines of their own, above the progress bar
        tqdm.write(f"step {step}:\n{gpicl.format_results(results)}")


def finish(args, evaluator, run, model, save):
    """The last table (evaluated now if the loop did not), a checkpoint of a learner with
    nothing to train (sgd), and summary.json."""
    if evaluator.results is None:
        evaluate(args, evaluator, run["step"], run["elapsed"], show=False)
    if not os.path.exists(os.path.join(args.out_dir, "ckpt.pt")):
        save()
    results, step = evaluator.results, run["step"]
    summary = dict(step=step, stopped_by="time_budget" if step < args.steps else "steps",
                   train_time_s=round(run["elapsed"], 1), model=args.model,
                   parameters=models.num_params(model), state_size=model.state_size(args.seq_len),
                   regime=gpicl.regime(results, args.dataset), results=gpicl.compact(results),
                   flags=vars(args))
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{gpicl.format_results(results)}\nregime: {summary['regime']} | {step} steps in "
          f"{run['elapsed'] / 60:.1f} min")
    if step < args.steps:
        print(f"stopped by --time-budget at step {step} of {args.steps}; --resume continues")


if __name__ == "__main__":
    main()
