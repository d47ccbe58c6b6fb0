"""
Meta-train a general-purpose in-context learner (paper sections 2 and 4).

    python train.py                                  # a preset: paper on a GPU, cpu elsewhere
    python train.py --model lstm --state-size 1024   # an LSTM whose state (h and c) is 1024 floats
    torchrun --nproc_per_node=8 train.py             # the same run, data parallel on 8 GPUs

A preset picks every default: `paper` (the authors' settings) on a GPU, `cpu` (a small run that
learns in minutes) elsewhere; any flag overrides it (`python train.py --help`, configurator.py).
A run writes into --out-dir: log.jsonl (training loss and evaluations, one JSON object per
line), ckpt.pt (weights, optimizer, RNG state, flags and step, replaced atomically) and
summary.json. `--resume` continues a run exactly where its last checkpoint left it: the
meta-batch of step s is a pure function of (seed, s), so the losses are the ones an
uninterrupted run would have had.

Read it top to bottom: meta_train (configuration, the learner, the optimizer, the run's folder
and its resume, data and tasks), meta_train_loop (batch -> loss -> backward -> step, then
evaluate and save), then what they call: get_batch, Adam, the evaluation and the summary.
From a task id to a parameter update the data passes three files (train.get_batch calls
data.py, the loop calls models.py, the rest is here):

    data.py     sample_sequences: task id -> projection A and label permutation rho -> a
                sequence of (A x_t, rho(y_t)); make_tokens: [A x_t ; onehot(rho(y_{t-1}))]
    models.py   the learner: tokens (B, T, N_x + 10) -> logits (B, T, 10)
    train.py    the loss at every position, loss.backward(), Adam's step

gpicl.py evaluates the learner (seen and unseen tasks, beside 1-NN, logistic regression and
SGD). The run's safety (Ctrl-C and SIGTERM, the folder lock, a non-finite loss, the time
budget, the ranks' agreement under torchrun, atomic checkpoints and their checks on resume) is
harness.py, entered below by one named call each; none of it is needed to follow the lesson.
"""
import json
import math
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import gpicl
import harness
import models
from configurator import apply_preset, check_flags, get_parser, preset_line


def main(argv=None):
    # the run's safety (harness.py): Ctrl-C or SIGTERM ends the run after its step, a failed
    # allocation is one line, the lock on --out-dir is held until the run ends
    with harness.guarded_run("train.py", "the learner, --batch-size or --eval-*") as guard:
        meta_train(argv, guard)


def meta_train(argv, guard):
    # --- configuration: a preset picks every default, a flag overrides it (configurator.py)
    parser = get_parser()
    args = parser.parse_args(argv)
    apply_preset(args)
    args.ckpt_every = args.ckpt_every or args.eval_every
    if args.threads:
        torch.set_num_threads(args.threads)
    env = harness.setup_processes(parser, args)  # one process, or one per GPU under torchrun
    others = check_flags(parser, args, env.world)  # one line for flags that do not fit together

    # --- the learner (models.py): by name, by its sizes, or by the size of its state
    n_in = args.channels * args.image_size ** 2 + data.NUM_CLASSES  # a token: x_t and y_{t-1}
    try:
        sizes = models.learner_sizes(args.model, n_in, args.seq_len, width=args.width,
                                     n_layer=args.n_layer, n_head=args.n_head,
                                     state_size=args.state_size, key_size=args.key_size)
    except ValueError as e:
        parser.error(f"--model {args.model}: {e}")
    learner = dict(kind=args.model, n_in=n_in, n_out=data.NUM_CLASSES, sizes=sizes)  # to rebuild it
    torch.manual_seed(args.seed)
    model = models.build(args.model, n_in, data.NUM_CLASSES, **sizes).to(args.device)

    # --- the optimizer: the authors' Adam (below); sgd learns inside each sequence only
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = Adam(params, lr=args.lr, eps=args.adam_eps, eps_root=args.adam_eps_root) \
        if params else None
    if optimizer is None:
        args.steps = 0  # nothing to meta-train: evaluate it as it is

    # --- the run's folder, locked to this run; --resume continues its checkpoint exactly
    ckpt = harness.open_run(parser, args, guard, learner, master=env.master, trains=bool(params))
    step = 0 if ckpt is None else resume(ckpt, args, model, optimizer)
    # the checkpoint: weights, optimizer, RNG, flags (harness.py: written atomically)
    save = lambda step: harness.save_run(args, guard, step, model=model, optimizer=optimizer,
                                         learner=learner)

    # --- data and tasks: the base dataset's train split becomes tasks, test splits evaluate
    tasks, eval_sets = load_data(parser, args, others)
    if env.master:
        harness.restart_log(args, step)  # keeps the records up to the checkpoint resumed
        print(preset_line(args, sizes, model.state_size(args.seq_len)))
        print(f"device {args.device} | {env.world} process(es) x {args.grad_accum} accumulation "
              f"steps x {env.micro} sequences = meta-batch {args.batch_size} | parameters "
              f"{models.num_params(model):,} | steps {step} -> {args.steps}")
    evaluation = Evaluation(args, model, eval_sets, ctx=env.ctx, guard=guard,
                            train_split=tasks["train"])
    guard.start(args, ddp=env.ddp, master=env.master, ckpt=ckpt)  # the clocks and the loss
    stopping, out_of_time, step = meta_train_loop(args, env, guard, model=model,
                                                  optimizer=optimizer, tasks=tasks,
                                                  evaluation=evaluation, step=step, save=save)
    guard.exit_if_interrupted(stopping, step, args.steps)  # exit 130 / 143, --resume continues
    if env.master:
        finish(args, guard, evaluation, step, sizes=sizes, save=save, out_of_time=out_of_time)
    guard.end()


def meta_train_loop(args, env, guard, *, model, optimizer, tasks, evaluation, step, save):
    """Minimise the meta-loss with Adam until --steps, a Ctrl-C or SIGTERM, or the
    --time-budget. -> (stopping, out_of_time, the step reached)"""
    # the loop may call a compiled and DDP-wrapped model; evaluation and save keep the plain one
    if args.compile and optimizer:
        model = torch.compile(model)
    if env.ddp and optimizer:  # (sgd has no parameters: nothing to average)
        model = torch.nn.parallel.DistributedDataParallel(model)
    bar = tqdm(total=args.steps, initial=step, disable=not env.master, dynamic_ncols=True)
    stopping = out_of_time = False
    while step < args.steps and not stopping and not out_of_time:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        for micro_step in range(args.grad_accum):  # micro-batches, their gradients summed
            first = (micro_step * env.world + env.rank) * env.micro  # its place in the meta-batch
            seq_index = torch.arange(first, first + env.micro, device=args.device)
            tokens, y = get_batch(args, tasks, step=step, seq_index=seq_index)  # (B, T, N_x + 10)
            # DDP averages gradients over processes inside backward(); no_sync skips that for all
            # but the last micro-batch, so it happens once per step
            last_micro = micro_step == args.grad_accum - 1
            with (model.no_sync() if env.ddp and not last_micro else nullcontext()), env.ctx:
                logits = model(tokens)  # (B, T, 10): a prediction of y_t at every position t
                # the meta-loss: cross-entropy at every position, averaged (paper section 2)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / args.grad_accum
            loss.backward()
            guard.add_loss(loss.detach(), step)  # summed on the device: no host sync per step
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # does the run stop here (Ctrl-C, SIGTERM, --time-budget; under torchrun all ranks
        # agree)? a non-finite loss ends it here, before anything of this step is written
        stopping, out_of_time, record = guard.after_step(step, args, bar)
        if record:  # the mean loss since the last record (under torchrun: over the ranks)
            mean_loss = guard.mean_loss(step)
            if env.master:
                harness.log(args, dict(step=step, loss=mean_loss, lr=lr_at(step - 1, args),
                                       time=guard.elapsed))
                bar.set_postfix(loss=f"{mean_loss:.3f}", **evaluation.postfix())
        last = step == args.steps or (out_of_time and not stopping)
        if env.master and (step % args.eval_every == 0 or last):  # rank 0 evaluates alone
            evaluation.run(step, show=not last)  # the last table: finish() prints it
        if step % args.ckpt_every == 0 or last or stopping:
            guard.before_save()  # under torchrun: the running loss averaged over the ranks
            if env.master:
                save(step)
    bar.close()
    return stopping, out_of_time, step


def resume(ckpt, args, model, optimizer):
    """Load a checkpoint's weights, optimizer and RNG state; -> its step."""
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the flags win over the saved values
            group["eps"], group["eps_root"] = args.adam_eps, args.adam_eps_root
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())  # map_location moved it to the device
    return ckpt["step"]


# -----------------------------------------------------------------------------
# The meta-batch: sequences of (x, y) pairs from freshly augmented tasks (data.py)

def get_batch(args, tasks, *, step, seq_index):
    """The sequences seq_index of step `step`'s meta-batch, as the learner's tokens
    [A x_t ; onehot(y_{t-1})] and the targets y_t. A pure function of (seed, step, seq_index):
    every process draws its own slice of the same meta-batch, and a resumed run draws exactly
    what an uninterrupted one would have. The first --lookup-steps draw from the lookup
    curriculum (random images, short sequences), the rest from the real tasks."""
    lookup = step < args.lookup_steps
    x_all, y_all = tasks["lookup"] if lookup else tasks["train"]
    x, y, _ = data.sample_sequences(
        x_all, y_all, seed=args.seed, step=step, seq_index=seq_index,
        seq_len=args.lookup_seq_len if lookup else args.seq_len, num_tasks=args.num_tasks,
        bias=bias_at(step, args), batch_size=args.batch_size,
        seqs_per_task=args.seqs_per_task, bias_task=args.bias_task)  # (B, T, N_x), (B, T)
    return data.make_tokens(x, y), y  # (B, T, N_x + 10), (B, T)


def bias_at(step, args):
    """The --bias in force at `step`: all along, or until --bias-steps if that is set."""
    return args.bias if not args.bias_steps or step < args.bias_steps else 0.0


def load_data(parser, args, others):
    """The base dataset's train split for meta-training (and the random images of the lookup
    curriculum), test splits for meta-testing. Loaded after every check of the flags and of the
    run to resume: a bad one costs no wait."""
    load = lambda name: data.load_dataset(name, args.image_size, args.device,
                                          channels=args.channels)
    try:
        base, other_sets = load(args.dataset), {d: load(d) for d in others}
    except (OSError, RuntimeError, ValueError) as e:
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    tasks = dict(train=base["train"], lookup=load("random")["train"] if args.lookup_steps else None)
    # the seen tasks with the label maps training gives them at its last step
    eval_sets = gpicl.eval_sets((args.dataset, base), other_sets, num_tasks=args.num_tasks,
                                eval_tasks=args.eval_tasks, eval_seqs=args.eval_seqs,
                                device=args.device, bias=bias_at(args.steps - 1, args))
    return tasks, eval_sets


# -----------------------------------------------------------------------------
# The optimizer: the authors' Adam (its eps_root is part of the lesson, paper 4.3)

class Adam(torch.optim.Optimizer):
    """Adam as optax's, the authors' optimizer (optimizers/optax_opts.py, eps_root 1e-8):

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        update = lr * m_hat / (sqrt(v_hat + eps_root) + eps),   m_hat, v_hat bias-corrected

    torch.optim.Adam has no eps_root. With it, a parameter whose gradients are all tiny (as on
    a loss plateau) takes steps ~ lr g / sqrt(eps_root) instead of ~ lr: it damps them. (The sgd
    and maml learners take the same step inside each sequence, out of place: models.adam_step.)"""

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
# Evaluation (gpicl.py), the log and the summary

class Evaluation:
    """Meta-test the learner on seen and unseen tasks (gpicl.evaluate), print its table and log
    it. Only rank 0 evaluates; the others wait for it in the next all-reduce. The baselines read
    only the evaluation sequences, which are the same at every evaluation: they are scored once
    per process, and the same summaries are attached to every later evaluation."""

    def __init__(self, args, model, sets, ctx, guard, train_split):
        self.args, self.model, self.sets, self.ctx, self.guard = args, model, sets, ctx, guard
        self.train_split = train_split  # where logistic regression's L2 is chosen
        self.results = self.baselines = None

    def run(self, step, show=False):
        args, first = self.args, self.args.baselines == "on" and self.baselines is None
        if first:  # logistic regression's L2, chosen on training tasks, never on these sets
            first = gpicl.make_baselines(gpicl.choose_l2(*self.train_split, args.seq_len))
        self.results = gpicl.evaluate(self.model, self.sets, args.seq_len, ctx=self.ctx,
                                      baselines=first)
        if first:
            self.baselines = {name: r["baselines"] for name, r in self.results.items()}
        elif args.baselines == "on":
            for name, r in self.results.items():
                r["baselines"] = self.baselines[name]
        harness.log(args, dict(step=step, time=self.guard.elapsed_now(), eval=self.results,
                               regime=gpicl.regime(self.results, args.dataset)))
        if show:  # on lines of their own, above the progress bar
            tqdm.write(f"step {step}:\n{gpicl.format_results(self.results)}")

    def postfix(self):
        if self.results is None:
            return {}
        return {"unseen@last": f"{self.results[f'unseen {self.args.dataset}']['last']:.3f}"}


def finish(args, guard, evaluation, step, *, sizes, save, out_of_time):
    """The last evaluation (unless the loop just made it), a checkpoint for a learner with
    nothing to train (sgd), and summary.json."""
    if evaluation.results is None:
        evaluation.run(step)
    if not os.path.exists(harness.ckpt_path(args)):
        save(step)
    model = evaluation.model
    stopped_by = "time_budget" if out_of_time and step < args.steps else "steps"
    results = evaluation.results
    summary = dict(step=step, stopped_by=stopped_by, train_time_s=round(guard.elapsed, 1),
                   model=args.model, sizes=sizes, parameters=models.num_params(model),
                   state_size=model.state_size(args.seq_len),
                   regime=gpicl.regime(results, args.dataset), results=gpicl.compact(results),
                   flags=harness.plain(vars(args)))  # every flag the run used
    harness.write_text(os.path.join(args.out_dir, "summary.json"), json.dumps(summary, indent=1))
    print(gpicl.format_results(results))
    print(f"regime: {summary['regime']} | {step} steps in {guard.elapsed / 60:.1f} min")
    if stopped_by == "time_budget":
        print(f"stopped on the time budget ({args.time_budget:g} s) at step {step} of "
              f"{args.steps}; --resume continues to --steps")


if __name__ == "__main__":
    main()
