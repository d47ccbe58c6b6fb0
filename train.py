"""
Meta-train a general-purpose in-context learner (paper sections 2 and 4).

    python train.py                                  # a preset: paper on a GPU, cpu elsewhere
    python train.py --model lstm --state-size 1024   # an LSTM whose state (h and c) is 1024 floats
    torchrun --nproc_per_node=8 train.py             # the same run, data parallel on 8 GPUs

A preset picks every default: `paper` (the authors' settings) on a GPU, `cpu` (a small run that
learns in minutes) elsewhere; any flag overrides it (`python train.py --help`, configurator.py).
A run writes into --out-dir: log.jsonl (training loss and evaluations, one JSON object per
line), ckpt.pt (model, optimizer, RNG states, config and step, replaced atomically) and
summary.json. `--resume` continues a run exactly where its last checkpoint left it: the
meta-batch of step s is a pure function of (seed, s), so the losses are the ones an
uninterrupted run would have had.

Reading order: configuration and setup (main), the meta-batch (get_batch), the loop
(meta_train_loop), then the paper's optimizer and the machinery of resuming and stopping safely.
"""
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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import gpicl
import models
from configurator import PRESET_SUMMARY, PRESETS, apply_preset, check_device, get_parser


def main(argv=None):
    # `held` keeps the lock on --out-dir (one_run_per_folder) until the run ends
    with stop_on_signals() as stop, ExitStack() as held, \
            out_of_memory_in_one_line("train.py", "the learner, --batch-size or --eval-*"):
        meta_train(argv, stop, held)


def meta_train(argv, stop, held):
    # --- configuration: flags, presets, and the checks between flags (one line each)
    parser, args, others = configure(argv)
    env = setup_processes(parser, args)  # one process, or one per GPU under torchrun
    learner = build_learner(parser, args)
    # --- the run: its folder, and the checkpoint to continue (checked before any data loads)
    state = open_run(parser, args, env, learner, held)
    tasks, sets = load_data(parser, args, others)
    if env.master:
        restart_log(args, state.step)
        announce(args, env, learner, state.step)
    state.start_clocks()
    if learner.optimizer is None:  # sgd learns inside each sequence only: nothing to meta-train
        return finish(args, env, learner, sets, state, out_of_time=False)
    if args.compile:
        learner.model = torch.compile(learner.model)
    if env.ddp:
        learner.model = torch.nn.parallel.DistributedDataParallel(learner.model)
    stopping, out_of_time = meta_train_loop(args, env, learner, tasks, sets, state, stop)
    if stopping and state.step < args.steps:
        if env.master:
            print(f"\ninterrupted at step {state.step}; checkpoint saved, continue with --resume")
        if env.ddp:
            dist.destroy_process_group()
        sys.exit(128 + (stop[0] if stop else signal.SIGINT))  # 130 for Ctrl-C, 143 for SIGTERM
    finish(args, env, learner, sets, state, out_of_time)


# -----------------------------------------------------------------------------
# The meta-batch: sequences of (x, y) pairs from freshly augmented tasks (data.py)

def get_batch(args, tasks, *, step, seq_index):
    """The sequences seq_index of step `step`'s meta-batch. A pure function of (seed, step,
    seq_index): every process draws its own slice of the same meta-batch, and a resumed run
    draws exactly what an uninterrupted one would have. The first --lookup-steps draw from the
    lookup curriculum (random images, short sequences), the rest from the real tasks."""
    warm = step < args.lookup_steps
    bias = args.bias if not args.bias_steps or step < args.bias_steps else 0.0
    x, y, _ = data.sample_sequences(
        *(tasks["lookup"] if warm else tasks["train"]), args.seed, step, seq_index,
        args.lookup_seq_len if warm else args.seq_len, args.num_tasks, bias,
        args.batch_size, args.seqs_per_task, args.bias_task)
    return x, y  # (B, T, N_x), (B, T)


# -----------------------------------------------------------------------------
# The meta-training loop

def meta_train_loop(args, env, learner, tasks, sets, state, stop):
    """Minimise the meta-loss (gpicl.meta_loss) with Adam until --steps, a Ctrl-C or SIGTERM
    (`stop`), or the --time-budget; -> (stopping, out_of_time)."""
    model, optimizer = learner.model, learner.optimizer
    bar = tqdm(total=args.steps, initial=state.step, disable=not env.master, dynamic_ncols=True)
    stopping = out_of_time = False
    try:
        while state.step < args.steps and not stopping and not out_of_time:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, args)
            for m in range(args.grad_accum):  # micro-batches, their gradients summed
                first = (m * env.world + env.rank) * env.micro  # its place in the meta-batch
                seq_index = torch.arange(first, first + env.micro, device=args.device)
                x, y = get_batch(args, tasks, step=state.step, seq_index=seq_index)
                # DDP averages gradients over processes inside backward(); no_sync skips that
                # for all but the last micro-batch, so it happens once per step
                last_micro = m == args.grad_accum - 1
                with (model.no_sync() if env.ddp and not last_micro else nullcontext()), env.ctx:
                    loss = gpicl.meta_loss(model, x, y) / args.grad_accum
                loss.backward()
                state.add_loss(loss.detach())  # stays on the device: no host sync here
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            state.step += 1
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            step = state.step  # under DDP, a stop or the budget is agreed on at loss records
            stopping, out_of_time = bool(stop) and not env.ddp, state.spent(args) and not env.ddp
            # the host waits for the device only at steps that write something: read the
            # first non-finite loss there, before anything of this step is written
            if (step % args.log_every == 0 or step % args.eval_every == 0 or stopping or out_of_time
                    or step % args.ckpt_every == 0 or step == args.steps):
                stop_if_not_finite(args, env, state, bar)
            if step % args.log_every == 0 or step == args.steps or out_of_time:
                stopping, out_of_time = log_loss(args, env, state, stop, bar, stopping, out_of_time)
            last = step == args.steps or (out_of_time and not stopping)
            if env.master and (step % args.eval_every == 0 or last):  # rank 0 evaluates alone
                evaluate(args, env, learner, sets, state)
            if step % args.ckpt_every == 0 or last or stopping:
                if env.ddp:  # the average over ranks, so that a resumed run logs the same loss
                    dist.all_reduce(state.running, op=dist.ReduceOp.AVG)
                if env.master:
                    state.elapsed = time.time() - state.t0
                    save(args, learner, state)
    finally:
        bar.close()
    return stopping, out_of_time


def log_loss(args, env, state, stop, bar, stopping, out_of_time):
    """A loss record: the mean loss since the last one. Under torchrun the ranks also agree here
    on a stop (any rank's Ctrl-C) and on the time budget (rank 0's clock), in the all-reduce
    the record needs anyway. -> (stopping, out_of_time)"""
    if env.ddp:
        dist.all_reduce(state.running, op=dist.ReduceOp.AVG)
        asked = torch.tensor([float(bool(stop)), float(env.master and state.spent(args))],
                             device=args.device)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        stopping, out_of_time = (asked > 0).tolist()
    mean_loss = state.running.item() / (state.step - state.last_logged)
    state.running.zero_()
    state.last_logged = state.step
    state.elapsed = time.time() - state.t0
    if env.master:
        log(args, dict(step=state.step, loss=mean_loss, lr=lr_at(state.step - 1, args),
                       time=state.elapsed))
        unseen = ({} if state.results is None else
                  {"unseen@last": f"{state.results[f'unseen {args.dataset}']['last']:.3f}"})
        bar.set_postfix(loss=f"{mean_loss:.3f}", **unseen)
    return stopping, out_of_time


def evaluate(args, env, learner, sets, state):
    """Meta-test the learner on seen and unseen tasks (gpicl.evaluate) and log it. Only rank 0
    evaluates; the others wait for it in the next all-reduce."""
    # The baselines read only the evaluation sequences, which are the same at every evaluation:
    # score them once per process and attach the same summaries to every later evaluation.
    first = args.baselines == "on" and state.baselines is None
    if first:  # logistic regression's L2, chosen on training tasks of the training split
        first = gpicl.make_baselines(gpicl.choose_l2(*sets["train split"], args.seq_len))
    evaluated = {name: s for name, s in sets.items() if name != "train split"}
    state.results = gpicl.evaluate(learner.raw, evaluated, args.seq_len, ctx=env.ctx,
                                   baselines=first)
    if first:
        state.baselines = {name: r["baselines"] for name, r in state.results.items()}
    elif args.baselines == "on":
        for name, r in state.results.items():
            r["baselines"] = state.baselines[name]
    log(args, dict(step=state.step, time=time.time() - state.t0, eval=state.results,
                   regime=gpicl.regime(state.results, args.dataset)))


def finish(args, env, learner, sets, state, out_of_time):
    """The last evaluation (unless the loop just made it), a checkpoint for a learner with
    nothing to train (sgd), and summary.json."""
    if env.master:
        if state.results is None:
            evaluate(args, env, learner, sets, state)
        if not os.path.exists(ckpt_path(args)):
            save(args, learner, state)
        stopped_by = "time_budget" if out_of_time and state.step < args.steps else "steps"
        results = state.results
        summary = dict(step=state.step, stopped_by=stopped_by,
                       train_time_s=round(state.elapsed, 1), model=args.model,
                       model_config=learner.cfg, parameters=models.num_params(learner.raw),
                       state_size=learner.raw.state_size(args.seq_len),
                       regime=gpicl.regime(results, args.dataset), results=gpicl.compact(results))
        write_text(os.path.join(args.out_dir, "summary.json"), json.dumps(summary, indent=1))
        print(gpicl.format_results(results))
        print(f"regime: {summary['regime']} | {state.step} steps in {state.elapsed / 60:.1f} min")
        if stopped_by == "time_budget":
            print(f"stopped on the time budget ({args.time_budget:g} s) at step {state.step} of "
                  f"{args.steps}; --resume continues to --steps")
    if env.ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# The optimizer: the authors' Adam (its eps_root is part of the lesson, paper 4.3)

class Adam(torch.optim.Optimizer):
    """Adam as optax's, the authors' optimizer (optimizers/optax_opts.py, eps_root 1e-8):

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        update = lr * m_hat / (sqrt(v_hat + eps_root) + eps),   m_hat, v_hat bias-corrected

    torch.optim.Adam has no eps_root. With it, a parameter whose gradients are all tiny (as on
    a loss plateau) takes steps ~ g / sqrt(eps_root) instead of ~ lr: it damps them."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, eps_root=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, eps_root=eps_root))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                m, v, t = state["m"], state["v"], state["t"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** t)).add_(group["eps_root"]).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "cosine":
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    if args.schedule == "wsd":  # ours: constant through the plateau, then a linear cool-down
        t = (step - 0.75 * args.steps) / (0.25 * args.steps)  # to 10% over the last quarter
        return args.lr * (1 - 0.9 * min(max(t, 0.0), 1.0))
    return args.lr


# -----------------------------------------------------------------------------
# Setup: the flags, the processes, the learner, the run's folder and the data

def configure(argv):
    """-> (parser, args, other datasets to meta-test on), every flag checked against the others."""
    parser = get_parser()
    args = parser.parse_args(argv)
    apply_preset(args)
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
    return parser, args, others


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
    check_device(parser, args.device)
    device_type = torch.device(args.device).type
    micro = args.batch_size // (world * args.grad_accum)
    if micro * world * args.grad_accum != args.batch_size:
        parser.error(f"--batch-size {args.batch_size} does not split into {world} processes x "
                     f"{args.grad_accum} accumulation steps; "
                     f"make it a multiple of {world * args.grad_accum}")
    if args.batch_size % args.seqs_per_task:
        parser.error(f"--seqs-per-task {args.seqs_per_task} does not divide --batch-size "
                     f"{args.batch_size}")
    if device_type == "cuda":  # TF32 matmuls and bf16 autocast: the fast path on recent GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    return Env(ddp, rank, world, micro, ctx)


@dataclass
class Learner:
    model: torch.nn.Module  # what the loop calls: compiled and/or DDP-wrapped
    raw: torch.nn.Module  # the plain module: evaluated and checkpointed
    optimizer: object  # None for a learner with no parameters (sgd)
    config: dict  # what models.build needs to rebuild it (kept in the checkpoint)
    cfg: dict  # its sizes


def build_learner(parser, args):
    n_x = args.channels * args.image_size ** 2
    try:
        cfg = models.model_config(args.model, n_x + data.NUM_CLASSES, args.seq_len, args.width,
                                  args.n_layer, args.n_head, args.state_size,
                                  key_size=args.key_size)
    except ValueError as e:
        parser.error(f"--model {args.model}: {e}")
    config = dict(kind=args.model, n_in=n_x + data.NUM_CLASSES, n_out=data.NUM_CLASSES, cfg=cfg)
    torch.manual_seed(args.seed)
    model = models.build(args.model, n_x + data.NUM_CLASSES, data.NUM_CLASSES, **cfg).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = Adam(params, args.lr, eps=args.adam_eps, eps_root=args.adam_eps_root) \
        if params else None
    if optimizer is None:  # sgd learns inside each sequence only: nothing to meta-train
        args.steps = 0
    return Learner(model, model, optimizer, config, cfg)


def load_data(parser, args, others):
    """The base dataset's train split for meta-training (and the random images of the lookup
    curriculum), test splits for meta-testing. Loaded after every check of the flags and of the
    run to resume: a bad one costs no wait."""
    try:
        base = data.load_dataset(args.dataset, args.image_size, args.device, channels=args.channels)
        other_sets = {d: data.load_dataset(d, args.image_size, args.device, channels=args.channels)
                      for d in others}
    except (OSError, RuntimeError, ValueError) as e:
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    tasks = dict(train=base["train"], lookup=None)
    if args.lookup_steps:
        tasks["lookup"] = data.load_dataset("random", args.image_size, args.device,
                                            channels=args.channels)["train"]
    sets = gpicl.eval_sets((args.dataset, base), other_sets, args.num_tasks,
                           args.eval_tasks, args.eval_seqs, args.device)
    sets["train split"] = base["train"]  # where logistic regression's L2 is chosen
    return tasks, sets


def announce(args, env, learner, step):
    other = next(p for p in PRESETS if p != args.preset)
    print(f"preset {args.preset}: {PRESET_SUMMARY[args.preset]} (--preset {other} for the other; "
          "any flag overrides)")
    print(f"learner {args.model} {learner.cfg} | parameters {models.num_params(learner.raw):,} | "
          f"state size {learner.raw.state_size(args.seq_len):,} floats")
    if not args.steps:
        print(f"{args.model} has no meta-parameters to train: evaluating it as it is")
    print(f"device {args.device} | {env.world} process(es) x {args.grad_accum} accumulation steps x "
          f"{env.micro} sequences = meta-batch {args.batch_size} | num_tasks "
          f"{'fresh' if args.num_tasks == data.FRESH else args.num_tasks} | N_x "
          f"{args.channels * args.image_size ** 2} | steps {step} -> {args.steps}")


# -----------------------------------------------------------------------------
# Resuming: what a run keeps between steps, the checkpoint that holds it, and the log

NO_STEP = 2 ** 62  # "no step yet" for a step kept on the device
# What defines the meta-batches of a run: a resumed run must keep them, or it continues another
RUN_KEYS = ("preset", "dataset", "image_size", "channels", "seq_len", "num_tasks", "bias", "bias_task",
            "bias_steps", "seqs_per_task", "lookup_steps", "lookup_seq_len", "batch_size", "seed")
CHECKPOINT_FORMAT = 3  # 2: fixed-permutation bias, task slots, optax's Adam, key size; 3: the bias
#                        drawn per task id, one bias per LSTM gate


@dataclass
class State:
    """What the loop changes from step to step; a checkpoint keeps what a resumed run needs."""
    running: torch.Tensor  # loss summed since last_logged, kept on the device
    first_bad: torch.Tensor  # the first step whose loss was not finite, NO_STEP while none
    step: int = 0
    elapsed: float = 0.0  # training wall time, over all resumes
    last_logged: int = 0  # the step of the last loss record
    saved: int = None  # the step of the checkpoint on disk, None while there is none
    results: dict = None  # the last evaluation
    baselines: dict = None  # {set: {baseline: summary}}, scored at this process's first evaluation
    t0: float = 0.0  # time.time() when the run would have started without breaks
    started: float = 0.0  # time.time() when this process started training: the --time-budget

    def start_clocks(self):
        self.t0 = time.time() - self.elapsed
        self.started = time.time()  # the --time-budget counts from here, in a resumed run too

    def spent(self, args):
        return args.time_budget is not None and time.time() - self.started >= args.time_budget

    def add_loss(self, loss):
        """Both on the device, so that a step never waits for it (reading a number from the
        GPU every step would stall the host on the device every step)."""
        self.running += loss
        self.first_bad.clamp_(max=torch.where(torch.isfinite(loss), NO_STEP, self.step + 1))


def open_run(parser, args, env, learner, held):
    """Make and lock --out-dir; continue the run it holds (--resume) or refuse to overwrite it."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if env.master:  # one run per folder; under torchrun rank 0 holds it for all
            held.enter_context(one_run_per_folder(parser, args.out_dir))
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        parser.error(f"--out-dir {args.out_dir}: {getattr(e, 'strerror', None) or e}")
    state = State(running=torch.tensor(0.0, device=args.device),
                  first_bad=torch.tensor(NO_STEP, device=args.device))
    if os.path.exists(ckpt_path(args)):
        if not args.resume:
            parser.error(f"{args.out_dir} already holds a run; pass --resume to continue it, "
                         "or choose another --out-dir")
        resume(parser, args, learner, state)
    return state


def resume(parser, args, learner, state):
    """Load the checkpoint into the learner, its optimizer, torch's RNG and `state`, after
    checking that it is a run (not weights only) of this learner on these meta-batches."""
    path = ckpt_path(args)
    try:
        ckpt = gpicl.load_checkpoint(path, args.device)  # weights_only: no code runs
    except ValueError as e:
        parser.error(f"--resume: {e}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        parser.error(f"--resume: {path} was written by an older gpicl (before the bias "
                     "drawn per task id); start a new --out-dir")
    if ckpt["model_config"] != plain(learner.config):
        parser.error(f"--resume: the checkpoint in {args.out_dir} holds a different learner "
                     f"({ckpt['model_config']}); use the flags it was trained with")
    changed = [f"--{k.replace('_', '-')} {ckpt['config'].get(k)}" for k in RUN_KEYS
               if ckpt["config"].get(k) != getattr(args, k)]
    if changed:
        parser.error(f"--resume: the run in {args.out_dir} was trained with {', '.join(changed)}; "
                     "resume it with the same flags")
    optimizer = learner.optimizer
    if (optimizer is not None and ckpt.get("optimizer") is None) or "rng" not in ckpt:
        parser.error(f"--resume: {path} holds the learner's weights only, not a run to "
                     "continue; evaluate it with metatest.py, or meta-train in a new --out-dir")
    learner.raw.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the flags win over the saved values
            group["eps"], group["eps_root"] = args.adam_eps, args.adam_eps_root
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())  # map_location moved it to the device
    state.step = state.saved = ckpt["step"]
    state.elapsed, state.last_logged = ckpt["elapsed"], ckpt["last_logged"]
    state.running = torch.tensor(ckpt["running_loss"], device=args.device)


def ckpt_path(args):
    return os.path.join(args.out_dir, "ckpt.pt")


def save(args, learner, state):
    """Checkpoint the run at state.step (rank 0 only: the ranks' weights are the same)."""
    state.saved = state.step
    save_checkpoint(ckpt_path(args), dict(
        model=learner.raw.state_dict(), step=state.step,
        running_loss=state.running.item(), last_logged=state.last_logged,  # the loss not yet logged
        optimizer=learner.optimizer.state_dict() if learner.optimizer is not None else None,
        elapsed=state.elapsed, config=plain(vars(args)), model_config=plain(learner.config),
        format=CHECKPOINT_FORMAT,
        rng=dict(torch=torch.get_rng_state())))


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


# -----------------------------------------------------------------------------
# Stopping safely: at the first non-finite loss, on Ctrl-C or SIGTERM, one run per folder

def stop_if_not_finite(args, env, state, bar):
    """A non-finite loss (NaN or inf) ends the run at its step: Adam has already put NaN into
    the weights, and a checkpoint of them would replace the last good one. The first bad step
    waits on the device (State.add_loss) and is read here, where the loop syncs anyway, before
    any loss record, evaluation or checkpoint of a step: none is ever written after a NaN."""
    if env.ddp:  # one rank's NaN reaches every rank's weights through the averaged gradient
        dist.all_reduce(state.first_bad, op=dist.ReduceOp.MIN)
    bad = int(state.first_bad.item())
    if bad == NO_STEP:
        return
    bar.close()  # the message on a line of its own
    if env.master:
        kept = (f"the checkpoint in {args.out_dir} is of step {state.saved}, before it; --resume "
                "it with a smaller --lr or --grad-clip" if state.saved is not None else
                "no checkpoint was written")
        print(f"train.py: error: the loss is not finite (NaN or inf) at step {bad}; stopped: "
              f"{kept}", file=sys.stderr)
    if env.ddp:
        dist.destroy_process_group()
    raise SystemExit(1)


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


if __name__ == "__main__":
    main()
