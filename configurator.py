"""
The command line of train.py (and the one-line-error kit that bench.py, metatest.py and
experiments.py share): flags, their checks, and the presets that pick their defaults.

Like nanoGPT's configurator.py it keeps the flag plumbing out of train.py's reading path. A bad
value is one line on stderr and exit 2 (Parser.error), never a traceback.
"""
import argparse
import math
import os
import re

import torch

import data
import models

# -----------------------------------------------------------------------------
# Flags whose values are checked where they are read, with one-line errors


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
# cpu: ours, a recipe that learns in context on 2 CPU cores in minutes: 7x7 MNIST, fresh tasks,
#   a 2-layer d_model-64 Transformer, batch 128, the same bias, no eps_root, cosine decay.
PRESETS = {
    "paper": dict(image_size=14, num_tasks=2 ** 25, bias=0.5, seqs_per_task=32, batch_size=512,
                  adam_eps_root=1e-8, schedule="constant", steps=50_000, eval_every=1000,
                  eval_tasks=32, eval_seqs=128),
    "cpu": dict(image_size=7, num_tasks=data.FRESH, bias=0.5, seqs_per_task=1, batch_size=128,
                adam_eps_root=0.0, schedule="cosine", steps=6000, eval_every=1000,
                eval_tasks=16, eval_seqs=32),
}
PRESET_SUMMARY = {"paper": "the authors' settings on 14x14 MNIST, 50,000 steps of 512 sequences",
                  "cpu": "a small Transformer on 7x7 MNIST that learns in context in minutes"}
TRANSFORMER_PRESETS = {"paper": dict(width=512, n_layer=4, n_head=8, key_size=32),
                       "cpu": dict(width=64, n_layer=2, n_head=4, key_size=32)}
# cpu, every learner but the Transformer: the same tasks, its own sizes (or --state-size),
#   batch 64, a constant learning rate and a 13-minute --time-budget, so that each ends in about
#   15 minutes on 2 cores whatever its step costs (ours: an LSTM of state 1,024 takes ~1 s a
#   step at batch 64 there, VSML ~10 s); fewer evaluation sequences, as the slow ones read them
#   one step at a time.
OTHER_LEARNERS_CPU = dict(batch_size=64, steps=20_000, schedule="constant", time_budget=13 * 60,
                          eval_every=1000, eval_seqs=16)


def apply_preset(args):
    """Fill every flag left unset (None) from the preset: paper on a GPU, cpu elsewhere."""
    if args.preset is None:
        gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        args.preset = "paper" if gpu else "cpu"
    preset = dict(PRESETS[args.preset])
    if args.model == "transformer":  # the other learners keep their own sizes
        preset.update(TRANSFORMER_PRESETS[args.preset])
        if args.state_size is not None:  # the state size picks the key size
            del preset["key_size"]
    elif args.preset == "cpu":
        preset.update(OTHER_LEARNERS_CPU)
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
                                                  "N_x = image_size^2"))
    g.add_argument("--seq-len", type=positive_int, default=100, help="examples per sequence")
    g.add_argument("--num-tasks", type=num_tasks_type,
                   help=preset_help("num_tasks", "number of tasks: 65536, 2**16, or 'fresh' for "
                                                 "a new task per sequence"))
    g.add_argument("--bias", type=fraction,
                   help=preset_help("bias", "fraction of every meta-batch's task slots that keep "
                                    "one fixed label permutation (the identity), projections "
                                    "random (paper 4.3)"))
    g.add_argument("--bias-steps", type=nonneg_int, default=0,
                   help="apply --bias during the first this many steps only (0: every step)")
    g.add_argument("--bias-task", type=fraction, default=0.0,
                   help="fraction of every meta-batch's task slots that use the one fixed task 0")
    g.add_argument("--seqs-per-task", type=positive_int,
                   help=preset_help("seqs_per_task", "sequences that share one task within a "
                                                     "meta-batch"))
    g.add_argument("--channels", type=channel_count, default=1,
                   help="1: grayscale images; 3: grayscale tiled to RGB (the authors' channel_expand)")
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
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--adam-eps", type=positive_float, default=1e-8,
                   help="Adam epsilon; smaller shortens loss plateaus (paper 4.3)")
    g.add_argument("--adam-eps-root", type=nonneg_float,
                   help=preset_help("adam_eps_root", "Adam epsilon inside the square root, as "
                                                     "optax's eps_root"))
    g.add_argument("--warmup", type=nonneg_int, default=0, help="linear learning-rate warm-up steps")
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
                   help="score 1-NN (every sequence) and SGD (2 sequences per task) on the "
                        "evaluation sequences, beside the learner")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between loss records")
    g.add_argument("--ckpt-every", type=positive_int,
                   help="steps between checkpoints (default: --eval-every)")
    g.add_argument("--out-dir", default="runs/default", help="where the log, checkpoint and summary go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir")


def system_flags(g):
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the learner")
    g.add_argument("--threads", type=thread_count,
                   help="CPU threads for torch (default: torch's choice)")


# -----------------------------------------------------------------------------
# Checks of what a flag names, made before any work

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
