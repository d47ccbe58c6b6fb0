"""
Benchmark: is our meta-training step as fast as plain PyTorch's, and is making tasks cheap?

    python experiments/bench.py --threads 1                               # CPU, a small meta-batch
    python experiments/bench.py --device cuda --batch-size 128 --compile  # the cpu preset's batch
    python experiments/bench.py --image-size 28 --out bench.json          # 28x28 tasks, JSON too

Two comparisons, each against a plain-PyTorch reference run in the same process on the same
inputs, timed as the median over --repeats repeats of --steps calls each (warm-up excluded):

1. The training step as train.py takes it (forward, backward, gradient clip, Adam) of our
   models.Transformer against the same network assembled from torch.nn.TransformerEncoder
   (pre-LN, GELU, 4x MLP, causal mask) with the same input and output layers, learned positions
   and weights (copied from ours, and checked to compute the same logits). torch.nn's heads
   split the width, so ours is built with key_size = width / n_head (the default 256 / 8 is
   the authors' 32). Reported: ms/step,
   sequences/s, tokens/s, TFLOP/s, the ratio ours/ref (below 1: ours is faster), and on CUDA
   the peak memory and the model FLOPs utilisation (MFU) against --peak-tflops.
2. Task generation. data.py makes the tasks of a whole meta-batch (a projection A and a label
   permutation per sequence) in a few batched kernels from a counter-based hash; the reference
   is what one writes first, one seeded torch.Generator per sequence. Reported: the ratio, and
   the share of a training step that making the meta-batch costs: sample / (sample + step).
   The batched hash is built for the GPU, where the reference pays a host round trip and a few
   small launches per sequence; on one CPU thread, torch's Mersenne Twister randn is faster than
   our op-by-op hash.

The GPU suite, one command for the numbers a GPU should give this project (about 8 minutes on
one GPU; --dry-run: tiny sizes on the CPU in under a minute, to check the plumbing):

    python experiments/bench.py suite --out DIR [--dry-run] [-- more train.py flags, e.g. --compile]

It runs four stages, each a subprocess with its own time limit (one slow stage cannot eat the
others' time; a failed one is recorded and the suite carries on), in this order:
  bench eager     the comparisons above at the paper's model sizes: d_model 256 (ours)
                  and the authors' 512, 4 layers, 8 heads, meta-batch 128 and 512, 100 examples
                  of 14x14 MNIST; MFU is against --peak-tflops, the bf16 dense peak (989 TFLOP/s
                  on an H100 or H200 SXM)
  train           train.py with its defaults (on a GPU the paper preset: d_model 512, 16 x 32
                  sequences) under --time-budget (--train-budget, 4.5 minutes, shortened if the
                  bench took long), evaluating every 500 steps; from log.jsonl's wall times: the
                  seconds of training until unseen-task MNIST accuracy at the last example first reaches
                  0.5, 0.65 and 0.737 (the paper's Table 1), None where it does not
  table1          metatest.py table1 on that checkpoint: MNIST, UCI digits and Random, which
                  ship with the code (the other columns say "missing" unless fetched)
  bench compiled  the same grid with --compile, in the time that is left, most wanted first
The learner's flags go to train.py after `--`. DIR receives at most 8 files: suite.log (all
console output), bench.json, log.jsonl and summary.json (train.py's), table1.md, table1.json,
and suite.json (stages, times to accuracy, the numbers of the printed summary); the
checkpoint stays in a temporary folder that is removed at the end.
"""
import argparse
import functools
import json
import math
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext, suppress

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules live one folder up
import data
import models
import train
from metatest import COUNT, check_device, check_out_file, check_ranges, out_of_memory_in_one_line

HERE = os.path.dirname(os.path.abspath(__file__))  # this folder: bench.py and metatest.py
ROOT = os.path.dirname(HERE)                         # the repository: train.py


def get_parser():
    p = train.Parser(prog="bench.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     description="Time our training step and task generation against plain PyTorch.")
    p.add_argument("--device", default="auto", help="auto (cuda, then cpu), or a torch device")
    p.add_argument("--batch-size", type=int,
                   help="sequences per step (default: 128 on cuda, 16 on cpu)")
    p.add_argument("--image-size", type=int, default=14, help="N_x = image_size^2")
    p.add_argument("--seq-len", type=int, default=100, help="examples per sequence")
    p.add_argument("--width", type=int, default=256, help="d_model")
    p.add_argument("--n-layer", type=int, default=4, help="layers")
    p.add_argument("--n-head", type=int, default=8, help="attention heads")
    p.add_argument("--num-tasks", type=int, default=2 ** 25, help="task ids are drawn below this")
    p.add_argument("--steps", type=int, default=3, help="timed calls per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation)")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", help="also write the results here as JSON")
    return p


# Each number's range (COUNT: below 2**31, where torch's C ints overflow). Beyond 1,024 an
# image side (N_x = size^2 is one side of a matrix) or a depth overflows or takes hours to
# build; beyond 256 threads OpenMP aborts the process. Task ids have 62 random bits (data.FRESH).
RANGES = dict(batch_size=COUNT, image_size=(1, 1024), seq_len=COUNT, width=COUNT,
              n_layer=(1, 1024), n_head=COUNT, num_tasks=(1, data.FRESH), steps=COUNT,
              warmup=(0, 2 ** 31 - 1), repeats=COUNT, peak_tflops=(1e-3, 1e6), threads=(1, 256))


# -----------------------------------------------------------------------------
# The references: plain PyTorch, written the obvious way

class Reference(nn.Module):
    """Our Transformer's network, from torch.nn.TransformerEncoder: tokens (B, T, n_in) -> (B, T, 10)."""

    def __init__(self, n_in, n_out, seq_len, width, n_layer, n_head):
        super().__init__()
        self.embed = nn.Linear(n_in, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))
        layer = nn.TransformerEncoderLayer(width, n_head, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, norm=nn.LayerNorm(width),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(width, n_out)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len))

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:T]                        # (B, T, d)
        x = self.encoder(x, mask=self.mask[:T, :T], is_causal=True)  # (B, T, d)
        return self.head(x)                                          # (B, T, 10)

    def copy_from(self, ours):
        """Take the weights of a models.Transformer (its state_dict keys, renamed)."""
        renames = [("blocks.", "encoder.layers."), ("ln1.", "norm1."), ("ln2.", "norm2."),
                   ("attn.qkv.weight", "self_attn.in_proj_weight"),
                   ("attn.qkv.bias", "self_attn.in_proj_bias"), ("attn.proj.", "self_attn.out_proj."),
                   ("mlp.0.", "linear1."), ("mlp.2.", "linear2."), ("ln_f.", "encoder.norm.")]
        state = {}
        for k, v in ours.state_dict().items():
            for a, b in renames:
                k = k.replace(a, b)
            state[k] = v
        state["mask"] = self.mask
        self.load_state_dict(state)                                  # strict: every weight found
        return self


def reference_tasks(x, y, task_ids, seed, num_tasks):
    """One seeded torch.Generator per sequence: x (B, T, N_x), y (B, T) -> the same, projected
    and relabelled (the work data.apply_tasks does in a few batched kernels)."""
    n_x = x.shape[-1]
    A, perm = [], []
    for i in task_ids.tolist():                                      # a host round trip, then B loops
        g = torch.Generator(x.device).manual_seed(seed * num_tasks + i)
        A.append(torch.randn(n_x, n_x, generator=g, device=x.device) / math.sqrt(n_x))
        perm.append(torch.randperm(data.NUM_CLASSES, generator=g, device=x.device))
    A, perm = torch.stack(A), torch.stack(perm)                      # (B, N_x, N_x), (B, 10)
    return torch.bmm(x, A.transpose(1, 2)), torch.gather(perm, 1, y)


# -----------------------------------------------------------------------------
# Timing

@functools.lru_cache(maxsize=1)
def mnist_train(image_size, device):
    """MNIST's train split, loaded once per process: the suite runs several benchmarks in one."""
    return data.load_dataset("mnist", image_size, device)["train"]


def main(argv=None):
    with out_of_memory_in_one_line("bench.py", "the learner or --batch-size"):
        return bench(argv)


def bench(argv):
    """The step and task generation timed against their references; the result's dict."""
    args = parse_bench(argv)
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = functools.partial(timed, warmup=args.warmup, repeats=args.repeats, sync=sync)
    x_train, y_train = mnist_train(args.image_size, args.device)  # (N, N_x), (N,)
    ours, ref, batches, same = build_pair(args, x_train, y_train)
    if cuda:  # then as train.py: TF32 matmuls (after the fp32 comparison) and bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    step, step_ratio = time_steps(args, {"ours": ours, "ref": ref}, batches, timer, cuda)
    tasks, task_ratio = time_tasks(args, x_train, y_train, timer)
    share = tasks["ours_sample_sequences"] / (tasks["ours_sample_sequences"] + step["ours"]["ms"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result = dict(flags=dict(vars(args), n_x=args.image_size ** 2, params=models.num_params(ours),
                             threads=torch.get_num_threads(), torch=torch.__version__),
                  max_abs_logit_diff=same, step=step, step_ratio=step_ratio, tasks_ms=tasks,
                  task_ratio=task_ratio, task_share=share,
                  process_peak_rss_mib=None if cuda else rss)
    print_report(result, cuda)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def parse_bench(argv):
    """The flags, every one checked before any work; the batch size filled in for the device."""
    parser = get_parser()
    args = parser.parse_args(argv)
    check_ranges(parser, args, RANGES)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(parser, args.device)
    if args.out is not None:
        check_out_file(parser, "--out", args.out)
    if args.width % args.n_head:  # torch.nn's attention splits the width into the heads
        parser.error(f"--width {args.width} is not a multiple of --n-head {args.n_head}: the "
                     "reference's heads split the width, so ours get key_size = width / n_head")
    args.batch_size = args.batch_size or (128 if torch.device(args.device).type == "cuda" else 16)
    return args


def timed(fns, calls, warmup, repeats, sync):
    """{name: median over repeats of the seconds per call of fn(i)}, and every repeat's.
    The functions take turns within each repeat, so a busy machine slows them alike."""
    for fn in fns.values():
        for i in range(warmup):
            fn(i)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            sync()
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(t) for name, t in times.items()}, times


def paired(times, a, b):
    """The median of the ratios a / b, paired within each repeat."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def build_pair(args, x_train, y_train):
    """Ours, built as train.py builds it, and the reference with the same weights; the meta-
    batches both train on; the largest difference of their logits (fp32)."""
    B, T, n_in = args.batch_size, args.seq_len, args.image_size ** 2 + data.NUM_CLASSES
    sizes = models.learner_sizes("transformer", n_in, T, width=args.width, n_layer=args.n_layer,
                                 n_head=args.n_head, key_size=args.width // args.n_head)
    torch.manual_seed(0)
    ours = models.build("transformer", n_in, data.NUM_CLASSES, **sizes).to(args.device)
    ref = Reference(n_in, data.NUM_CLASSES, T, width=args.width, n_layer=args.n_layer,
                    n_head=args.n_head)
    ref = ref.copy_from(ours).to(args.device)
    # (B, T, N_x), (B, T)
    batches = [data.sample_sequences(x_train, y_train, seed=0, step=s,
                                     seq_index=torch.arange(B, device=args.device), seq_len=T,
                                     num_tasks=args.num_tasks)[:2] for s in range(args.steps)]
    with torch.no_grad():
        tokens = data.make_tokens(*batches[0])                      # (B, T, N_x + 10)
        same = (ours(tokens) - ref(tokens)).abs().max().item()       # fp32, before autocast
    return ours, ref, batches, same


def time_steps(args, pair, batches, timer, cuda):
    """{name: ms, tokens/s, TFLOP/s, MFU, peak memory} of each model's training step, and the
    ratio ours / ref."""
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def make_step(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        run = torch.compile(model) if args.compile else model

        def train_step(i):  # as train.py: forward, backward, clip, Adam
            x, y = batches[i % len(batches)]
            with ctx:  # the meta-loss, as train.py writes it
                logits = run(data.make_tokens(x, y))
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return train_step

    steps = {name: make_step(model) for name, model in pair.items()}
    sec, times = timer(steps, args.steps)
    B, T, out = args.batch_size, args.seq_len, {}
    for name, model in pair.items():
        peak = None
        if cuda:  # one more step, alone: weights, grads, Adam's moments and activations
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            steps[name](0)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        n = sum(p.numel() for k, p in model.named_parameters() if k != "pos")
        flops = 6 * n * B * T + 12 * args.n_layer * args.width * T * B * T  # nanoGPT's count, per step
        s = sec[name]
        out[name] = dict(ms=1e3 * s, ms_repeats=[1e3 * t for t in times[name]], seq_per_s=B / s,
                         tok_per_s=B * T / s, tflops=flops / s / 1e12,
                         mfu=flops / s / (args.peak_tflops * 1e12) if cuda else None, peak_mib=peak)
    return out, paired(times, "ours", "ref")


def time_tasks(args, x_train, y_train, timer):
    """ms per meta-batch of making its tasks: ours (the whole meta-batch, and the projection and
    relabelling alone) and the reference's, on the same raw examples and task ids; the ratio."""
    B, T, seed = args.batch_size, args.seq_len, 0
    g = torch.Generator().manual_seed(seed)
    raw = []
    for _ in range(args.steps):
        idx = torch.randint(len(y_train), (B, T), generator=g).to(args.device)        # (B, T)
        ids = torch.randint(args.num_tasks, (B,), generator=g).to(args.device)        # (B,)
        raw.append((x_train[idx], y_train[idx], ids))            # (B, T, N_x), (B, T), (B,)
    seq_index = torch.arange(B, device=args.device)
    sample = lambda i: data.sample_sequences(x_train, y_train, seed=seed, step=i, seq_index=seq_index,
                                             seq_len=T, num_tasks=args.num_tasks)
    tasks, times = timer({"ours_sample_sequences": sample,
                          "ours_apply_tasks": lambda i: data.apply_tasks(*raw[i % len(raw)]),
                          "ref_per_sequence": lambda i: reference_tasks(*raw[i % len(raw)], seed,
                                                                        args.num_tasks)},
                         args.steps)
    return {k: 1e3 * v for k, v in tasks.items()}, paired(times, "ours_apply_tasks", "ref_per_sequence")


def print_report(r, cuda):
    f, step = r["flags"], r["step"]
    threads = f", {f['threads']} threads" if not cuda else ""
    print(f"bench | {f['device']}{threads}{' | compiled' if f['compile'] else ''} | transformer "
          f"d {f['width']} x {f['n_layer']} layers x {f['n_head']} heads, {f['params']:,} params"
          f" | batch {f['batch_size']} x seq {f['seq_len']}, N_x {f['n_x']} | median of "
          f"{f['repeats']} x {f['steps']} calls")
    print(f"max |logits ours - ref| at the same weights: {r['max_abs_logit_diff']:.1e}")
    print(f"{'training step':<24}{'ms':>9}{'seq/s':>9}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak MiB':>10}")
    for name, label in (("ours", "ours (models.py)"), ("ref", "ref (nn.Transformer)")):
        s = step[name]
        print(f"{label:<24}{s['ms']:9.1f}{s['seq_per_s']:9.1f}{s['tok_per_s']:10.0f}{s['tflops']:9.3f}"
              f"{'' if s['mfu'] is None else format(s['mfu'], '.1%'):>7}"
              f"{'' if s['peak_mib'] is None else format(s['peak_mib'], '.0f'):>10}")
    print(f"{'ratio ours/ref':<24}{r['step_ratio']:9.3f}   (median of the per-repeat ratios)")
    print(f"{'task generation':<24}{'ms':>9}")
    for k, v in r["tasks_ms"].items():
        print(f"{k:<24}{v:9.2f}")
    print(f"{'ratio ours/ref (tasks)':<24}{r['task_ratio']:9.3f}   (apply_tasks vs ref_per_sequence)")
    print(f"share of a step spent making the meta-batch: {r['task_share']:.1%}")
    if not cuda:
        print(f"peak RSS of the whole process (both models, data): "
              f"{r['process_peak_rss_mib']:.0f} MiB")


# -----------------------------------------------------------------------------
# The GPU suite: the benchmark at the paper's model sizes, a timed meta-training run and Table 1

THRESHOLDS = "0.5,0.65,0.737"  # 0.737: the paper's Transformer on unseen MNIST tasks (Table 1)
SUITE_FILES = ("suite.log", "bench.json", "log.jsonl", "summary.json", "table1.md", "table1.json",
               "suite.json")
SIZES = {  # the stages' sizes: the paper's, and tiny ones that check the plumbing on a CPU
    "gpu": dict(widths=(256, 512), batch_sizes=(128, 512),
                bench=["--n-layer", "4", "--n-head", "8", "--image-size", "14", "--seq-len", "100"],
                train=["--eval-every", "500"], table1=[]),
    "dry": dict(widths=(16, 32), batch_sizes=(4, 8),
                bench=["--n-layer", "1", "--n-head", "2", "--image-size", "7", "--seq-len", "10",
                       "--steps", "2", "--warmup", "1", "--repeats", "3", "--threads", "1"],
                train=["--image-size", "7", "--seq-len", "10", "--batch-size", "8", "--width", "16",
                       "--n-layer", "1", "--n-head", "2", "--eval-tasks", "2", "--eval-seqs", "4",
                       "--eval-every", "50", "--steps", "1000000", "--threads", "1"],
                table1=["--threads", "1"]),
}


def time_to_accuracy(records, thresholds, key="unseen mnist"):
    """{threshold: the log's wall time (seconds of training, evaluations included) at the first
    evaluation whose accuracy at the last example reaches it, or None} from log.jsonl records."""
    evals = [(r["time"], r["eval"][key]["last"]) for r in records if key in r.get("eval", {})]
    return {str(t): next((s for s, acc in evals if acc >= t), None) for t in thresholds}


def suite_parser():
    p = train.Parser(prog="bench.py suite", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     description="The GPU suite: benchmark, timed meta-training, Table 1 (see the "
                                 "docstring of bench.py).")
    p.add_argument("--out", required=True, help="folder for the suite's files (at most 8)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU, under a minute: checks the plumbing")
    p.add_argument("--device", default="auto", help="auto (cuda, then cpu), or a torch device")
    p.add_argument("--minutes", type=float,
                   help="wall-time limit of all stages together (default: 8, dry run 2)")
    p.add_argument("--train-budget", type=train.duration,
                   help="train.py --time-budget, shrunk if the stages before it leave less "
                        "(default: 4.5m, dry run 3s)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the bf16 dense peak for MFU (H100 and H200 SXM: 989)")
    p.add_argument("--thresholds", default=THRESHOLDS,
                   help="unseen MNIST accuracies whose time to reach the suite reports")
    return p


SUITE_RANGES = dict(minutes=(1e-3, 1e6), train_budget=(1e-3, 1e9), peak_tflops=(1e-3, 1e6))


class Stages:
    """Runs each stage as a subprocess with its own time limit, all output into suite.log, and
    keeps the suite's deadline."""

    def __init__(self, log_path, minutes):
        self.log_path, self.deadline = log_path, time.time() + 60 * minutes
        self.start, self.report = time.time(), {}

    def left(self):
        return self.deadline - time.time()

    def say(self, line):
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def run(self, name, cmd, limit, env=None):
        """Run cmd for at most limit seconds (and never past the deadline); True if it succeeded.
        A stage that fails or times out is recorded with the end of its output, and the suite
        carries on."""
        limit = max(1.0, min(limit, self.left()))
        self.say(f"\n[{name}] {shlex.join(cmd)}  (limit {limit:.0f} s)")
        begin, t = os.path.getsize(self.log_path), time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(self.log_path, "a") as log:
            # its own process group, so that a timeout also ends its workers (torch.compile's)
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                 start_new_session=True)
            try:
                status = "ok" if p.wait(timeout=limit) == 0 else f"failed (exit {p.returncode})"
            except BaseException as e:  # the time limit, or Ctrl-C on the suite
                with suppress(ProcessLookupError):  # none left, if it had just ended
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                if not isinstance(e, subprocess.TimeoutExpired):
                    raise
                status = f"timed out after {limit:.0f} s"
        self.report[name] = dict(status=status, seconds=round(time.time() - t, 1))
        if status != "ok":
            with open(self.log_path, errors="replace") as f:
                f.seek(begin)
                tail = f.read().replace("\r", "\n").strip().splitlines()[-5:]
            self.report[name]["tail"] = tail
            self.say(f"[{name}] {status}; the end of its output:\n  " + "\n  ".join(tail))
        return status == "ok"


def bench_grid(sizes, device, compiled, peak_tflops):
    """The bench.py argument lists of one stage, most wanted first: the paper's one-GPU setting
    (the smaller width and batch), then the authors' width, then the larger batch."""
    flags = ["--device", device, "--peak-tflops", str(peak_tflops), *sizes["bench"]]
    return [[*flags, "--width", str(w), "--batch-size", str(b), *(["--compile"] * compiled)]
            for b in sizes["batch_sizes"] for w in sizes["widths"]]


def grid(spec_path, out_path):
    """`python experiments/bench.py grid SPEC OUT` (the suite's bench stages): main() for each
    argument list in the JSON file SPEC, in one process (one start-up, MNIST loaded once), one
    JSON line per run appended to OUT as it finishes, so that a stage stopped at its limit keeps
    what it has."""
    for argv in json.load(open(spec_path)):
        torch._dynamo.reset()  # each run compiles afresh, with static shapes, as in its own process
        try:
            record = dict(argv=argv, result=main(argv))
        except SystemExit as e:  # a flag error, already printed
            record = dict(argv=argv, error=f"bench.py exited with {e.code}")
        except Exception as e:  # e.g. out of memory at the largest size: the next run still runs
            record = dict(argv=argv, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            print(record["error"], flush=True)
        with open(out_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bench_stage(stages, name, grid_argvs, work, limit, env=None):
    """One grid of benchmarks in one subprocess: [(argv, result or None, error or None)]."""
    stem = os.path.join(work, name.replace(" ", "_"))
    spec, out = stem + ".json", stem + ".jsonl"
    with open(spec, "w") as f:
        json.dump(grid_argvs, f)
    stages.run(name, [sys.executable, os.path.join(HERE, "bench.py"), "grid", spec, out], limit, env)
    done = ([json.loads(l) for l in open(out) if l.endswith("\n")]  # a kill may cut the last
            if os.path.exists(out) else [])
    runs = [(r["argv"], r.get("result"), r.get("error")) for r in done]
    return runs + [(a, None, f"not reached: {stages.report[name]['status']}")
                   for a in grid_argvs[len(done):]]


def bench_rows(runs, compiled):
    """The numbers of each benchmark for bench.json and the summary."""
    rows = []
    for argv, r, error in runs:
        row = dict(width=int(argv[argv.index("--width") + 1]),
                   batch_size=int(argv[argv.index("--batch-size") + 1]), compiled=compiled)
        if r is None:
            rows.append(dict(row, error=error))
            continue
        ours, ref = r["step"]["ours"], r["step"]["ref"]
        rows.append(dict(row, ours_ms=ours["ms"], ref_ms=ref["ms"], step_ratio=r["step_ratio"],
                         ours_tok_per_s=ours["tok_per_s"], ref_tok_per_s=ref["tok_per_s"],
                         ours_mfu=ours["mfu"], ref_mfu=ref["mfu"], task_share=r["task_share"],
                         task_ratio=r["task_ratio"], ours_peak_mib=ours["peak_mib"],
                         ref_peak_mib=ref["peak_mib"], max_abs_logit_diff=r["max_abs_logit_diff"],
                         full=r))
    return rows


def parse_suite(argv):
    """`bench.py suite FLAGS [-- TRAIN_FLAGS]` -> (args, the stages' sizes, train.py's argv
    without the budget and the folder, its flags as train.py reads them); every error is one
    line, before anything runs."""
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = suite_parser()
    args = parser.parse_args(argv[:cut])
    check_ranges(parser, args, SUITE_RANGES)
    text = args.thresholds
    try:
        args.thresholds = [float(t) for t in text.split(",")]
    except ValueError:
        args.thresholds = [math.nan]
    if not all(0 <= t <= 1 for t in args.thresholds):  # NaN too: it compares False
        parser.error(f"--thresholds {text!r}: each must be an accuracy in [0, 1], as in {THRESHOLDS}")
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    if args.device == "auto":
        args.device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    check_device(parser, args.device)
    args.minutes = args.minutes or (2 if args.dry_run else 8)
    args.train_budget = args.train_budget or (3 if args.dry_run else 270)
    train_argv = ["--device", args.device, *sizes["train"], *argv[cut + 1:]]
    train_parser = train.get_parser()
    train_parser.prog = "train.py (the flags after --)"
    train_flags = train_parser.parse_args(train_argv)
    train.apply_preset(train_flags)
    train.check_flags(train_parser, train_flags)  # the ranges, and flags that must fit together
    try:
        os.makedirs(args.out, exist_ok=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        parser.error(f"--out {args.out!r}: {getattr(e, 'strerror', None) or e}")
    args.out = os.path.abspath(args.out)  # the stages run in the repository's folder
    there = [f for f in SUITE_FILES if os.path.exists(os.path.join(args.out, f))]
    if there:
        parser.error(f"--out {args.out!r} already holds {', '.join(there)}; choose another folder")
    return args, sizes, train_argv, train_flags


def train_stage(stages, args, train_argv, work):
    """train.py under a time budget that leaves time for Table 1 and the compiled benchmark;
    its log.jsonl and summary.json are copied to --out. -> (argv, records, summary, ckpt)."""
    budget = max(1.0, min(args.train_budget, stages.left() - (30 if args.dry_run else 120)))
    argv = [*train_argv, "--time-budget", f"{budget:g}"]
    run_dir = os.path.join(work, "run")
    stages.run("train", [sys.executable, os.path.join(ROOT, "train.py"), *argv, "--out-dir", run_dir],
               budget + (30 if args.dry_run else 90), env=dict(TQDM_MININTERVAL="10"))
    for f in ("log.jsonl", "summary.json"):
        if os.path.exists(os.path.join(run_dir, f)):
            shutil.copy(os.path.join(run_dir, f), args.out)
    log, summary = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "summary.json")
    records = ([json.loads(l) for l in open(log) if l.endswith("\n")]  # a killed run's last
               if os.path.exists(log) else [])                          # line may be cut
    summary = json.load(open(summary)) if os.path.exists(summary) else {}
    return argv, records, summary, os.path.join(run_dir, "ckpt.pt")


def suite(argv):
    """The four stages, then suite.json, bench.json and one screen of numbers."""
    args, sizes, train_argv, train_flags = parse_suite(argv)
    stages, measured = run_stages(args, sizes, train_argv)
    result = write_results(stages, args, train_flags, measured)
    for line in summary_lines(result):
        stages.say(line)
    return result


def run_stages(args, sizes, train_argv):
    """The stages, in their order, into a temporary folder that is removed at the end (the
    checkpoint stays there); -> (the Stages, what they measured)."""
    stages = Stages(os.path.join(args.out, "suite.log"), args.minutes)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    stages.say(f"GPU suite{' (dry run)' if args.dry_run else ''} | {args.device}"
               f"{f' ({gpu})' if gpu else ''} | torch {torch.__version__} | limit "
               f"{args.minutes:g} min | files -> {args.out}")
    if not args.dry_run and not gpu:
        stages.say("note: no GPU; the suite's sizes take long here (--dry-run checks the plumbing)")
    grid_of = lambda compiled: bench_grid(sizes, args.device, compiled, args.peak_tflops)

    def interrupt(signum, frame):  # a kill (a time limit around the suite) ends the stage too
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="gpicl-suite-") as work:
            eager = bench_stage(stages, "bench eager", grid_of(False), work, limit=90)  # cheap, first
            run_argv, records, summary, ckpt = train_stage(stages, args, train_argv, work)
            if os.path.exists(ckpt):
                stages.run("table1", [sys.executable, os.path.join(HERE, "metatest.py"),
                                      "--device", args.device, *sizes["table1"], "table1", ckpt,
                                      "--out-dir", args.out,
                                      *(["--tasks", "4", "--seqs", "8"] if args.dry_run else [])], 60)
            else:
                stages.report["table1"] = dict(status="skipped: no checkpoint", seconds=0.0)
            # on a CPU compiling takes minutes: the dry run checks this stage's plumbing only
            compiled = bench_stage(stages, "bench compiled", grid_of(True), work,
                                   limit=stages.left() - 5,
                                   env=dict(TORCH_COMPILE_DISABLE="1") if args.dry_run else None)
    except KeyboardInterrupt:
        stages.say(f"\ninterrupted; what the stages printed is in {stages.log_path}")
        sys.exit(130)
    return stages, dict(gpu=gpu, rows=bench_rows(eager, False) + bench_rows(compiled, True),
                        run_argv=run_argv, records=records, summary=summary)


def write_results(stages, args, train_flags, m):
    """bench.json (every benchmark in full) and suite.json (the stages, the times to accuracy,
    the numbers of the printed summary); -> suite.json's dict."""
    note = ("dry run: tiny sizes on the CPU; compiled rows ran with TORCH_COMPILE_DISABLE=1, so "
            "they check the plumbing, not torch.compile" if args.dry_run else None)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(device=args.device, gpu=m["gpu"], peak_tflops=args.peak_tflops,
                       precision="bf16 autocast, TF32 matmuls" if m["gpu"] else "fp32", note=note,
                       runs=m["rows"]), f, indent=1)
    table1 = os.path.join(args.out, "table1.json")
    table1 = json.load(open(table1))["checkpoints"][0] if os.path.exists(table1) else None
    summary = m["summary"]
    result = dict(
        dry_run=args.dry_run, device=args.device, gpu=m["gpu"], torch=torch.__version__,
        limit_s=60 * args.minutes, wall_s=round(time.time() - stages.start, 1),
        stages=stages.report,
        train=dict(argv=m["run_argv"], seq_len=train_flags.seq_len,
                   **{k: summary.get(k) for k in ("step", "stopped_by", "train_time_s")},
                   log_wall_s=max((r["time"] for r in m["records"]), default=None),
                   unseen_mnist_last=summary.get("results", {}).get("unseen mnist", {}).get("last")),
        time_to_unseen_mnist_acc_at_last=time_to_accuracy(m["records"], args.thresholds),
        table1_pct=table1 and {k: table1["accuracy_pct"][k] for k in ("MNIST", "UCI digits", "Random")},
        bench=[{k: v for k, v in r.items() if k != "full"} for r in m["rows"]], bench_note=note,
        peak_tflops=args.peak_tflops)
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def summary_lines(r):
    """One screen: the benchmark table, the meta-training run, Table 1 and the stages."""
    pct = lambda v: "" if v is None else f"{v:.1%}"
    mib = lambda a, b: "" if a is None else f"{a:,.0f}/{b:,.0f}"
    lines = ["", f"=== GPU suite{' (dry run)' if r['dry_run'] else ''} | {r['device']}"
                 f"{' ' + r['gpu'] if r['gpu'] else ''} | torch {r['torch']} | {r['wall_s']:.0f} s "
                 f"of {r['limit_s']:.0f} ===",
             f"training step, ours vs plain PyTorch (median ms/step); MFU against "
             f"{r['peak_tflops']:g} TFLOP/s, the bf16 dense peak (--peak-tflops)",
             f"{'d_model':>7} {'batch':>5} {'mode':<8} {'ours ms':>8} {'ref ms':>8} {'ours/ref':>8} "
             f"{'ours tok/s':>11} {'MFU':>6} {'tasks':>6} {'peak MiB ours/ref':>18}",
             "(tasks: making the meta-batch's share of a step, sample / (sample + step))"]
    for b in r["bench"]:
        head = f"{b['width']:>7} {b['batch_size']:>5} {'compiled' if b['compiled'] else 'eager':<8}"
        lines.append(f"{head} {b['error']}" if "error" in b else
                     f"{head} {b['ours_ms']:8.2f} {b['ref_ms']:8.2f} {b['step_ratio']:8.3f} "
                     f"{b['ours_tok_per_s']:11,.0f} {pct(b['ours_mfu']):>6} "
                     f"{pct(b['task_share']):>6} {mib(b['ours_peak_mib'], b['ref_peak_mib']):>18}")
    if r["bench_note"]:
        lines.append(f"({r['bench_note']})")
    t, T = r["train"], r["train"]["seq_len"]
    lines.append(f"meta-training: train.py {' '.join(t['argv'][2:])}")
    if t["step"] is not None:
        lines.append(f"  {t['step']} steps in {t['train_time_s']} s, stopped by {t['stopped_by']}; "
                     f"unseen MNIST acc@{T} {t['unseen_mnist_last']:.3f}")
    lines.append(f"seconds of training to unseen MNIST acc@{T} >= " + " | ".join(
        f"{k}: {'None' if v is None else f'{v:.1f}'}"
        for k, v in r["time_to_unseen_mnist_acc_at_last"].items()))
    if r["table1_pct"]:
        lines.append(f"Table 1, acc % at example {T} on unseen tasks: " + " | ".join(
            f"{k} {c['acc']:.1f} ± {c['ci']:.1f}" if "acc" in c else f"{k} missing"
            for k, c in r["table1_pct"].items()))
    lines.append("stages: " + " | ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)"
                                         for k, v in r["stages"].items()))
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["suite"]:
        suite(sys.argv[2:])
    elif sys.argv[1:2] == ["grid"] and len(sys.argv) == 4:
        grid(*sys.argv[2:])
    else:
        main()
