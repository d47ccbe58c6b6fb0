"""
Benchmark: is our meta-training step as fast as plain PyTorch's, and is making tasks cheap?

    python bench.py --threads 1                                  # CPU, a small meta-batch
    python bench.py --device cuda --batch-size 128 --compile     # the paper's one-GPU setting
    python bench.py --image-size 28 --out bench.json             # full-size MNIST tasks, JSON too

Two comparisons, each against a plain-PyTorch reference run in the same process on the same
inputs, timed as the median over --repeats repeats of --steps calls each (warm-up excluded):

1. The training step as train.py takes it (forward, backward, gradient clip, Adam) of our
   models.Transformer against the same network assembled from torch.nn.TransformerEncoder
   (pre-LN, GELU, 4x MLP, causal mask) with the same input and output layers, learned positions
   and weights (copied from ours, and checked to compute the same logits). Reported: ms/step,
   sequences/s, tokens/s, TFLOP/s, the ratio ours/ref (below 1: ours is faster), and on CUDA
   the peak memory and the model FLOPs utilisation (MFU) against --peak-tflops.
2. Task generation. data.py makes the tasks of a whole meta-batch (a projection A and a label
   permutation per sequence) in a few batched kernels from a counter-based hash; the reference
   is what one writes first, one seeded torch.Generator per sequence. Reported: the ratio, and
   the share of a training step that making the meta-batch costs: sample / (sample + step).
   The batched hash is built for the GPU, where the reference pays a host round trip and a few
   small launches per sequence; on one CPU thread, torch's Mersenne Twister randn is faster than
   our op-by-op eager hash, and slower than its --compile'd, fused form.
"""
import argparse
import json
import math
import os
import resource
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

import data
import gpicl
import models
from train import (MAX_TASKS, Parser, check_device, check_out_file, image_size_int, layer_count,
                   nonneg_int, out_of_memory_in_one_line, positive_float, positive_int,
                   thread_count, typed)


def get_parser():
    p = Parser(description="Time our training step and task generation against plain PyTorch.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, then cpu), or a torch device")
    p.add_argument("--batch-size", type=positive_int,
                   help="sequences per step (default: 128 on cuda, 16 on cpu)")
    p.add_argument("--image-size", type=image_size_int, default=14, help="N_x = image_size^2")
    p.add_argument("--seq-len", type=positive_int, default=100, help="examples per sequence")
    p.add_argument("--width", type=positive_int, default=256, help="d_model")
    p.add_argument("--n-layer", type=layer_count, default=4, help="layers")
    p.add_argument("--n-head", type=positive_int, default=8, help="attention heads")
    p.add_argument("--num-tasks", default=2 ** 25,
                   type=typed(int, lambda v: 0 < v <= MAX_TASKS, "a number of tasks in [1, 2**62]"),
                   help="task ids are drawn below this")
    p.add_argument("--steps", type=positive_int, default=3, help="timed calls per repeat")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed calls first (compilation)")
    p.add_argument("--repeats", type=positive_int, default=5, help="repeats; the median is reported")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models and our task generation")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0,
                   help="the device's peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--threads", type=thread_count,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", help="also write the results here as JSON")
    return p


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

def main(argv=None):
    with out_of_memory_in_one_line("bench.py", "the learner or --batch-size"):
        return bench(argv)


def bench(argv):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(parser, args.device)
    device_type = torch.device(args.device).type
    if args.out is not None:
        check_out_file(parser, "--out", args.out)
    cuda = device_type == "cuda"
    B = args.batch_size or (128 if cuda else 16)
    T, n_x, seed = args.seq_len, args.image_size ** 2, 0
    if cuda:  # as train.py: TF32 matmuls and bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if cuda else nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fns, calls):
        """{name: median over repeats of the seconds per call of fn(i)}, and every repeat's.
        The functions take turns within each repeat, so a busy machine slows them alike."""
        for fn in fns.values():
            for i in range(args.warmup):
                fn(i)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                for i in range(calls):
                    fn(i)
                sync()
                times[name].append((time.perf_counter() - t0) / calls)
        return {name: statistics.median(t) for name, t in times.items()}, times

    # --- the two models, built as train.py builds ours, with the same weights
    n_in = n_x + data.NUM_CLASSES
    try:
        cfg = models.model_config("transformer", n_in, T, args.width, args.n_layer, args.n_head)
    except ValueError as e:
        parser.error(str(e))
    # (N, N_x), (N,)
    x_train, y_train = data.load_dataset("mnist", args.image_size, args.device)["train"]
    torch.manual_seed(seed)
    ours = models.build("transformer", n_in, data.NUM_CLASSES, **cfg).to(args.device)
    ref = Reference(n_in, data.NUM_CLASSES, T, args.width, args.n_layer, args.n_head)
    ref = ref.copy_from(ours).to(args.device)
    # (B, T, N_x), (B, T)
    batches = [data.sample_sequences(x_train, y_train, seed, s, torch.arange(B, device=args.device),
                                     T, args.num_tasks)[:2] for s in range(args.steps)]
    with torch.no_grad():
        tokens = gpicl.make_tokens(*batches[0])                      # (B, T, N_x + 10)
        same = (ours(tokens) - ref(tokens)).abs().max().item()       # fp32, before autocast

    def make_step(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        run = torch.compile(model) if args.compile else model

        def train_step(i):  # as train.py: forward, backward, clip, Adam
            with ctx:
                loss = gpicl.meta_loss(run, *batches[i % len(batches)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return train_step

    steps = {"ours": make_step(ours), "ref": make_step(ref)}
    sec, times = timed(steps, args.steps)
    step = {}
    for name, model in (("ours", ours), ("ref", ref)):
        peak = None
        if cuda:  # one more step, alone: weights, grads, Adam's moments and activations
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            steps[name](0)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        n = sum(p.numel() for k, p in model.named_parameters() if k != "pos")
        flops = 6 * n * B * T + 12 * args.n_layer * args.width * T * B * T  # nanoGPT's count, per step
        s = sec[name]
        step[name] = dict(ms=1e3 * s, ms_repeats=[1e3 * t for t in times[name]], seq_per_s=B / s,
                          tok_per_s=B * T / s, tflops=flops / s / 1e12,
                          mfu=flops / s / (args.peak_tflops * 1e12) if cuda else None, peak_mib=peak)
    paired = lambda t, a, b: statistics.median(x / y for x, y in zip(t[a], t[b]))  # per repeat
    step_ratio = paired(times, "ours", "ref")

    # --- task generation, on the same raw examples and task ids
    if args.compile:
        data.compile_task_generation()  # compiled in the untimed warm-up calls
    g = torch.Generator().manual_seed(seed)
    raw = []
    for _ in range(args.steps):
        idx = torch.randint(len(y_train), (B, T), generator=g).to(args.device)        # (B, T)
        ids = torch.randint(args.num_tasks, (B,), generator=g).to(args.device)        # (B,)
        # (B, T, N_x), (B, T), (B,)
        raw.append((x_train[idx], y_train[idx], ids))
    seq_index = torch.arange(B, device=args.device)
    sample = lambda i: data.sample_sequences(x_train, y_train, seed, i, seq_index, T, args.num_tasks)
    tasks, task_times = timed({"ours_sample_sequences": sample,
                               "ours_apply_tasks": lambda i: data.apply_tasks(*raw[i % len(raw)]),
                               "ref_per_sequence": lambda i: reference_tasks(*raw[i % len(raw)],
                                                                             seed, args.num_tasks)},
                              args.steps)
    tasks = {k: 1e3 * v for k, v in tasks.items()}                   # ms per meta-batch
    task_ratio = paired(task_times, "ours_apply_tasks", "ref_per_sequence")
    share = tasks["ours_sample_sequences"] / (tasks["ours_sample_sequences"] + step["ours"]["ms"])

    # --- report
    threads = f", {torch.get_num_threads()} threads" if not cuda else ""
    print(f"bench | {args.device}{threads}{' | compiled' if args.compile else ''} | transformer "
          f"d {args.width} x {args.n_layer} layers x {args.n_head} heads, "
          f"{models.num_params(ours):,} params"
          f" | batch {B} x seq {T}, N_x {n_x} | median of {args.repeats} x {args.steps} calls")
    print(f"max |logits ours - ref| at the same weights: {same:.1e}")
    print(f"{'training step':<24}{'ms':>9}{'seq/s':>9}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak MiB':>10}")
    for name, label in (("ours", "ours (models.py)"), ("ref", "ref (nn.Transformer)")):
        s = step[name]
        print(f"{label:<24}{s['ms']:9.1f}{s['seq_per_s']:9.1f}{s['tok_per_s']:10.0f}{s['tflops']:9.3f}"
              f"{'' if s['mfu'] is None else format(s['mfu'], '.1%'):>7}"
              f"{'' if s['peak_mib'] is None else format(s['peak_mib'], '.0f'):>10}")
    print(f"{'ratio ours/ref':<24}{step_ratio:9.3f}   (median of the per-repeat ratios)")
    print(f"{'task generation':<24}{'ms':>9}")
    for k, v in tasks.items():
        print(f"{k:<24}{v:9.2f}")
    print(f"{'ratio ours/ref (tasks)':<24}{task_ratio:9.3f}   (apply_tasks vs ref_per_sequence)")
    print(f"share of a step spent making the meta-batch: {share:.1%}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if not cuda:
        print(f"peak RSS of the whole process (both models, data): {rss:.0f} MiB")
    result = dict(config=dict(vars(args), batch_size=B, n_x=n_x, params=models.num_params(ours),
                              threads=torch.get_num_threads(), torch=torch.__version__),
                  max_abs_logit_diff=same, step=step, step_ratio=step_ratio, tasks_ms=tasks,
                  task_ratio=task_ratio, task_share=share,
                  process_peak_rss_mib=None if cuda else rss)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
