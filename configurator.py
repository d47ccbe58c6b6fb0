"""
The command line of train.py: its flags, the presets that pick their defaults, and the checks
between flags.

Like nanoGPT's configurator.py it keeps the flag plumbing out of train.py's reading path. The
value types and the Parser (a bad value is one line on stderr and exit 2, never a traceback)
are the run's safety, shared by every command line: harness.py.
"""
import argparse

import torch

import data
import models
from harness import (Parser, channel_count, duration, fraction, image_size_int, layer_count,
                     nonneg_float, nonneg_int, positive_float, positive_int, seed_int, thread_count)

# -----------------------------------------------------------------------------
# The number of tasks, the one flag whose type is of the lesson (the others: harness.py)

MAX_TASKS = data.FRESH  # task ids are drawn from 62 random bits (data.random_below)


def num_tasks_type(s):
    """'65536', '2**16', '2^16' -> 65536; 'fresh' -> data.FRESH (a new task for every sequence)."""
    if s.lower() in ("fresh", "inf", "infinite"):
        return data.FRESH
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


# -----------------------------------------------------------------------------
# Presets: what `python train.py` runs when no flag says otherwise (an explicit flag always wins)
#
# paper: the authors' code defaults (research/data_driven: 14x14 MNIST, 16 task slots x 32
#   sequences, optax's Adam, 50,000 steps; the Transformer 512 wide, 4 layers, 8 heads of key
#   size 32), with 2^25 tasks (the top of the paper's sweep) and identity labels on half the
#   task slots (the paper biases "a fraction" of each batch; 0.5 is ours). Days on a CPU.
# cpu: ours, a recipe that learns in context on 2 CPU cores in 15 minutes: 7x7 MNIST, fresh
#   tasks, a 2-layer Transformer 128 wide, batch 128, the same bias, no eps_root, Adam at lr 2e-3
#   after 100 warm-up steps held constant through the plateau, then cooled down over the last
#   quarter (wsd), 3,000 steps (NOTEBOOK.md: the trials that chose it).
PRESETS = {
    "paper": dict(image_size=14, num_tasks=2 ** 25, bias=0.5, seqs_per_task=32, batch_size=512,
                  adam_eps_root=1e-8, lr=1e-3, warmup=0, schedule="constant", steps=50_000,
                  eval_every=1000, eval_tasks=32, eval_seqs=128),
    "cpu": dict(image_size=7, num_tasks=data.FRESH, bias=0.5, seqs_per_task=1, batch_size=128,
                adam_eps_root=0.0, lr=2e-3, warmup=100, schedule="wsd", steps=3000,
                eval_every=1000, eval_tasks=16, eval_seqs=32),
}
TRANSFORMER_PRESETS = {"paper": dict(width=512, n_layer=4, n_head=8, key_size=32),
                       "cpu": dict(width=128, n_layer=2, n_head=4, key_size=32)}
# cpu, every learner but the Transformer: the same tasks, its own sizes (or --state-size),
#   batch 64, the authors' lr 1e-3 held constant and a 13-minute --time-budget, so that each
#   ends in about 15 minutes on 2 cores whatever its step costs (ours: the LSTM of state 1,024
#   took 0.41 s a step there, 1,919 steps in the budget); fewer evaluation sequences, as the
#   recurrent learners read them one step at a time.
OTHER_LEARNERS_CPU = dict(batch_size=64, steps=20_000, lr=1e-3, warmup=0, schedule="constant",
                          time_budget=13 * 60, eval_every=1000, eval_seqs=16)
# cpu, the LSTM without --width or --state-size: 64 wide (state 128), ours. In the budget the
# steps matter more than the state: at width 64 the LSTM takes all 20,000 steps, leaves the
# plateau near step 11,700 and learns a little in context (unseen UCI digits 0.09 -> 0.19
# along the sequence); at state 1,024 (width 512) it gets ~740 steps and stays at chance
# (results/state_size.jsonl, README)
CPU_LEARNER_WIDTH = {"lstm": 64}


def apply_preset(args):
    """Fill every flag left unset (None) from the preset: paper on a GPU, cpu elsewhere."""
    if args.preset is None:
        auto_gpu = args.device == "auto" and torch.cuda.is_available()
        gpu = args.device.startswith("cuda") or auto_gpu
        args.preset = "paper" if gpu else "cpu"
    preset = dict(PRESETS[args.preset])
    if args.model == "transformer":  # the other learners keep their own sizes
        preset.update(TRANSFORMER_PRESETS[args.preset])
        if args.state_size is not None:  # the state size picks the key size
            del preset["key_size"]
    elif args.preset == "cpu":
        preset.update(OTHER_LEARNERS_CPU)
        if args.model in CPU_LEARNER_WIDTH and args.state_size is None:
            preset["width"] = CPU_LEARNER_WIDTH[args.model]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def preset_help(key, text):
    values = {p: PRESETS[p].get(key, TRANSFORMER_PRESETS[p].get(key)) for p in PRESETS}
    show = lambda v: "fresh" if v == data.FRESH else v
    return f"{text} (preset: " + ", ".join(f"{p} {show(v)}" for p, v in values.items()) + ")"


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a preset's flags say their values themselves
        return action.help if action.default is None else super()._get_help_string(action)


def get_parser():
    p = Parser(description="Meta-train a general-purpose in-context learner (GPICL).",
               formatter_class=Help)
    task_flags(p.add_argument_group("tasks"))
    learner_flags(p.add_argument_group("learner"))
    meta_training_flags(p.add_argument_group("meta-training"))
    output_flags(p.add_argument_group("evaluation and output"))
    system_flags(p.add_argument_group("system"))
    return p


def task_flags(g):
    g.add_argument("--dataset", default="mnist", choices=data.DATASETS,
                   help="base dataset that task augmentation turns into many tasks")
    g.add_argument("--preset", choices=list(PRESETS),
                   help="defaults for every flag below marked 'preset' (default: paper on a GPU, "
                        "cpu elsewhere)")
    g.add_argument("--image-size", type=image_size_int,
                   help=preset_help("image_size", "images are resized to this square size; "
                                                  "N_x = channels * image_size^2"))
    g.add_argument("--seq-len", type=positive_int, default=100, help="examples per sequence")
    g.add_argument("--num-tasks", type=num_tasks_type,
                   help=preset_help("num_tasks", "number of tasks: 65536, 2**16, or 'fresh' for "
                                                 "a new task per sequence"))
    g.add_argument("--bias", type=fraction,
                   help=preset_help("bias", "probability that a task id keeps one fixed label "
                                    "permutation (the identity), drawn once per id, its "
                                    "projection random (paper 4.3)"))
    g.add_argument("--bias-steps", type=nonneg_int, default=0,
                   help="apply --bias during the first this many steps only (0: every step)")
    g.add_argument("--bias-task", type=fraction, default=0.0,
                   help="fraction of every meta-batch's task slots that use the one fixed task 0")
    g.add_argument("--seqs-per-task", type=positive_int,
                   help=preset_help("seqs_per_task", "sequences that share one task within a "
                                                     "meta-batch"))
    g.add_argument("--channels", type=channel_count, default=1,
                   help="1: grayscale images; 3: grayscale tiled to RGB "
                        "(the authors' channel_expand)")
    g.add_argument("--lookup-steps", type=nonneg_int, default=0,
                   help="curriculum: meta-train the first steps on pure in-context lookup tasks "
                        "(the Random dataset) with short sequences; shortens the plateau (README)")
    g.add_argument("--lookup-seq-len", type=positive_int, default=20,
                   help="sequence length during the lookup steps")


def learner_flags(g):
    g.add_argument("--model", default="transformer", choices=list(models.MODELS),
                   help="the learner")
    g.add_argument("--width", type=positive_int,
                   help=preset_help("width", "model width (other learners: their own default)"))
    g.add_argument("--n-layer", type=layer_count,
                   help=preset_help("n_layer", "layers (other learners: their own default)"))
    g.add_argument("--n-head", type=positive_int, help=preset_help("n_head", "attention heads"))
    g.add_argument("--key-size", type=positive_int,
                   help=preset_help("key_size", "per-head key size"))
    g.add_argument("--state-size", type=positive_int,
                   help="size the learner so that its state is exactly this many floats "
                        "(the Transformer by its key size, the others by their width)")


def meta_training_flags(g):
    g.add_argument("--steps", type=positive_int, help=preset_help("steps", "optimizer steps"))
    g.add_argument("--time-budget", type=duration,
                   help="stop at the first step boundary after this much training wall time "
                        "(300, 300s, 5m, 1.5h; a resumed run counts from the resume), then "
                        "evaluate, checkpoint and summarise as at the last step; --resume "
                        "continues to --steps")
    g.add_argument("--batch-size", type=positive_int,
                   help=preset_help("batch_size", "sequences per meta-batch, over all processes "
                                                  "and accumulation steps"))
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="split each meta-batch into this many sequential micro-batches")
    g.add_argument("--lr", type=positive_float, help=preset_help("lr", "Adam learning rate"))
    g.add_argument("--adam-eps", type=positive_float, default=1e-8,
                   help="Adam epsilon; smaller shortens loss plateaus (paper 4.3)")
    g.add_argument("--adam-eps-root", type=nonneg_float,
                   help=preset_help("adam_eps_root", "Adam epsilon inside the square root, as "
                                                     "optax's eps_root"))
    g.add_argument("--warmup", type=nonneg_int,
                   help=preset_help("warmup", "linear learning-rate warm-up steps"))
    g.add_argument("--schedule", choices=["constant", "cosine", "wsd"],
                   help=preset_help("schedule", "learning rate after warm-up: constant, cosine "
                                                "decay to 10%%, or wsd: constant, then linear "
                                                "decay to 10%% over the last quarter"))
    g.add_argument("--grad-clip", type=nonneg_float, default=0.0,
                   help="clip the gradient norm to this; 0: no clipping (the authors' default)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the meta-batches and init")


def output_flags(g):
    g.add_argument("--eval-every", type=positive_int,
                   help=preset_help("eval_every", "steps between evaluations"))
    g.add_argument("--eval-tasks", type=positive_int,
                   help=preset_help("eval_tasks", "seen and unseen tasks evaluated"))
    g.add_argument("--eval-seqs", type=positive_int,
                   help=preset_help("eval_seqs", "sequences per evaluated task"))
    g.add_argument("--eval-datasets", default="uci_digits,random",
                   help="comma-separated other datasets to meta-test on (unseen tasks)")
    g.add_argument("--baselines", default="on", choices=["on", "off"],
                   help="score 1-NN and SGD (every sequence) and logistic regression (8 "
                        "sequences per task) on the evaluation sequences, beside the learner")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between loss records")
    g.add_argument("--ckpt-every", type=positive_int,
                   help="steps between checkpoints (default: --eval-every)")
    g.add_argument("--out-dir", default="runs/default",
                   help="where the log, checkpoint and summary go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir")


def system_flags(g):
    g.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the learner")
    g.add_argument("--threads", type=thread_count,
                   help="CPU threads for torch (default: torch's choice)")


# -----------------------------------------------------------------------------
# Checks between flags, and the line that says what the preset runs

def check_flags(parser, args, world):
    """-> the other datasets to meta-test on, after the checks that need more than one flag
    (world: the number of processes the meta-batch is split over). One line each."""
    others = [d for d in args.eval_datasets.split(",") if d]
    for d in others:
        if d not in data.DATASETS or d == args.dataset:
            parser.error(f"--eval-datasets: {d!r} is not one of {', '.join(data.DATASETS)} "
                         f"other than {args.dataset}")
    if args.lookup_steps and args.lookup_seq_len > args.seq_len:
        parser.error(f"--lookup-seq-len {args.lookup_seq_len} is longer than "
                     f"--seq-len {args.seq_len}")
    if args.batch_size % (world * args.grad_accum):
        parser.error(f"--batch-size {args.batch_size} does not split into {world} processes x "
                     f"{args.grad_accum} accumulation steps; "
                     f"make it a multiple of {world * args.grad_accum}")
    if args.batch_size % args.seqs_per_task:
        parser.error(f"--seqs-per-task {args.seqs_per_task} does not divide --batch-size "
                     f"{args.batch_size}")
    return others


def preset_line(args, sizes, state_size):
    """The run in one line, naming the learner actually trained:
    'preset cpu: transformer (width 128, n_layer 2, n_head 4, key_size 32; state size 51,200
    floats) on 7x7 mnist, 3,000 steps of 128 sequences (--preset paper for the other; any flag
    overrides)'"""
    other = next(p for p in PRESETS if p != args.preset)
    shown = ", ".join(f"{k} {v}" for k, v in sizes.items() if k not in ("seq_len", "n_in", "n_out"))
    budget = f" or {args.time_budget / 60:g} minutes" if args.time_budget else ""
    return (f"preset {args.preset}: {args.model} ({shown}; state size {state_size:,} floats) on "
            f"{args.image_size}x{args.image_size} {args.dataset}, {args.steps:,} steps{budget} of "
            f"{args.batch_size:,} sequences (--preset {other} for the other; any flag overrides)")
