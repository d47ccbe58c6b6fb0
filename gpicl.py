"""
Meta-testing a general-purpose in-context learner (paper sections 2 and 4): evaluation.

A learner reads a sequence of examples from one task (data.make_tokens) and predicts each label
before it sees it; train.py meta-trains it on the cross-entropy at every position. After
meta-training the learner learns new tasks in context, without a gradient step (the paper's
claim): its accuracy on tasks it never saw rises along the sequence as it reads more examples.
`evaluate` measures exactly that, per position, on seen tasks, unseen tasks and unseen tasks of
other datasets, beside 1-NN, logistic regression and SGD scored on the very same sequences (so
a curve can be read against learners that need no meta-training), and `regime` names which of
the paper's three regimes a learner is in. (A meta-trained learner as a classifier for your own
table of numbers is experiments/metatest.py's InContextClassifier.)

Uses data.py (tasks, sequences, tokens) and models.py (learners); train.py drives it.
"""
import functools
import math
import os
import pickle
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
import models

# -----------------------------------------------------------------------------
# Evaluation: the sequences, and the learner's predictions on them

EVAL_SEED = 12345  # evaluation sequences are fixed, and never drawn in meta-training


def seen_task_ids(eval_tasks, num_tasks, device):
    """Ids 0 .. eval_tasks - 1 of the training range (as the authors' meta_test), each taken
    modulo num_tasks: every training task in turn when there are fewer than eval_tasks. Training
    draws ids uniformly, so these were trained on when num_tasks is small against the number of
    training sequences; with more tasks (or data.FRESH ones) most were never drawn."""
    return torch.arange(eval_tasks, device=device) % num_tasks


def eval_sets(base, others, num_tasks, eval_tasks, eval_seqs, device, bias=0.0):
    """{name: (x_all, y_all, task_ids[, identity_labels])}: the base dataset's test split on
    seen and unseen tasks and as it is (no projection, no relabelling, as the authors also
    report), and each other dataset's test split on unseen tasks.

    A seen task is the task as meta-training drew it: under --bias F an id that training
    labelled with the identity (data.keeps_identity_labels) keeps it here (ours: the authors'
    meta_test reports seen ids with every label map permuted and with none, mnist_projections.py
    L357-385 and L449, `permute_labels`; neither is what a biased id was trained on). Unseen
    tasks permute."""
    per_seq = lambda ids: ids.repeat_interleave(eval_seqs)          # (eval_tasks * eval_seqs,)
    unseen = per_seq(data.unseen_task_ids(eval_tasks, device))
    name, splits = base
    seen = per_seq(seen_task_ids(eval_tasks, num_tasks, device))
    sets = {f"seen {name}": (*splits["test"], seen, data.keeps_identity_labels(seen, bias)),
            f"unseen {name}": (*splits["test"], unseen),
            f"identity {name}": (*splits["test"], torch.full_like(unseen[:eval_seqs],
                                                                   data.IDENTITY_TASK))}
    for other, splits in others.items():
        sets[f"unseen {other}"] = (*splits["test"], unseen)
    return sets


def eval_batches(x_all, y_all, task_ids, seq_len, batch_size=256, identity_labels=None):
    """The evaluation sequences of the given tasks, batch by batch: (seq_index (b,), x (b, T, N_x),
    y (b, T)). Sequence i is the same however the set is batched (data.task_sequences)."""
    for i in range(0, len(task_ids), batch_size):
        seq_index = torch.arange(i, min(i + batch_size, len(task_ids)), device=task_ids.device)
        kept = None if identity_labels is None else identity_labels[seq_index]
        yield seq_index, *data.task_sequences(x_all, y_all, task_ids[seq_index], seq_len=seq_len,
                                              seq_index=seq_index, seed=EVAL_SEED,
                                              identity_labels=kept)


def learner_predict(model, x, y, ctx=None):
    """The learner's label at every position: x (B, T, N_x), y (B, T) -> (B, T)."""
    with ctx or nullcontext():
        return model(data.make_tokens(x, y)).argmax(-1)


# -----------------------------------------------------------------------------
# Evaluation: a learning curve and its confidence intervals
#
# Sequences of one task are not independent (they share its projection and labels), so the
# intervals are taken over per-task means.

def summarize(correct, task_ids=None):
    """Correct predictions (N, T) bool -> the accuracy curve, the accuracy at the first and
    last position and the improvement within the sequence (last minus first), with 95%
    confidence intervals over tasks (task_ids (N,)). Without task_ids, or when all sequences
    are of one task (a single training task: no other task to generalise to), every sequence
    counts as its own group."""
    c = correct.float()                                              # (N, T)
    curve = c.mean(0)                                                # (T,)
    each_sequence = torch.arange(len(c), device=c.device)            # (N,)
    groups = each_sequence if task_ids is None else task_index(task_ids)   # (N,)
    tasks = int(groups.max()) + 1
    if tasks == 1:
        groups = each_sequence
    last = group_means(c[:, -1], groups)                             # (groups,)
    gain = group_means(c[:, -1] - c[:, 0], groups)                   # (groups,)
    return {"curve": [round(v, 4) for v in curve.tolist()],
            "first": curve[0].item(),
            "last": curve[-1].item(), "last_ci": ci95(last),
            "improvement": gain.mean().item(), "improvement_ci": ci95(gain),
            "n": len(c), "tasks": tasks}


def task_index(task_ids):
    """Which task each sequence is of: ids (N,) -> (N,) in 0 .. tasks - 1."""
    return torch.unique(task_ids, return_inverse=True)[1]


def group_means(values, groups):
    """The mean of values (N,) within each group: groups (N,) in 0 .. G - 1 -> (G,)."""
    sums = torch.zeros(int(groups.max()) + 1, device=values.device).index_add_(0, groups, values)
    return sums / torch.bincount(groups)


def ci95(values):
    """Half-width of the 95% normal interval for the mean of values (1-D); NaN for one value."""
    n = len(values)
    return 1.96 * values.std().item() / math.sqrt(n) if n > 1 else float("nan")


# -----------------------------------------------------------------------------
# Classic baselines, scored per position on the very sequences the learner reads
#
# A learning curve alone does not say whether 0.2 at the 100th example is good. Three learners
# that need no meta-training answer that, each reading the same x and y as the learner and
# predicting example t from examples 0..t-1 only:
#   1-NN: the label of the nearest earlier example (ours: the simplest learner there is; it is
#         cheap, so it runs on every sequence)
#   logistic regression: a linear softmax classifier refitted on examples 0..t-1 at every t,
#         its L2 chosen on training tasks (ours: the classic learner a meta-learner must beat to
#         be more than a lookup; on 8 sequences of each task, for cost)
#   SGD:  the paper's own baseline (Table 1), models.SGD: a fresh MLP per sequence, one Adam step
#         per example; T sequential steps, run on every sequence so that its interval is as
#         narrow as the learner's


def k_nearest(x_ctx, y_ctx, x_query, k=1, earlier_only=False):
    """k-NN: each query gets the majority label of its k nearest context examples (Euclidean; a
    tie in the vote goes to the nearest one's label, a tie in distance to the earliest).
    x_ctx (B, J, n), y_ctx (B, J), x_query (B, Q, n) -> (B, Q). earlier_only: query t may only
    look at context examples j < t (Q = J, the per-position baseline); a query with none
    predicts label 0, and k > 1 is refused there (a query t < k would count later labels)."""
    if earlier_only and k > 1:
        raise ValueError("k_nearest: earlier_only takes k = 1")
    # cdist's fast |a|^2 + |b|^2 - 2ab form (3x faster than exact here) rounds, which can only
    # reorder near-ties; an example repeated earlier in the sequence is still the nearest
    dist = torch.cdist(x_query, x_ctx)                                      # (B, Q, J)
    if earlier_only:
        Q, J = dist.shape[1:]
        earlier = torch.ones(Q, J, dtype=torch.bool, device=dist.device).tril(-1)  # j < t
        dist = dist.masked_fill(~earlier, float("inf"))
    nearest = dist.argmin(-1, keepdim=True)                                 # (B, Q, 1) earliest
    if k > 1:
        nearest = torch.cat([nearest, dist.scatter(-1, nearest, float("inf")).topk(
            min(k, dist.shape[-1]) - 1, largest=False).indices], -1)       # (B, Q, k)
    labels = torch.gather(y_ctx[:, None].expand(-1, dist.shape[1], -1), 2, nearest)  # (B, Q, k)
    votes = F.one_hot(labels, data.NUM_CLASSES).float()                     # (B, Q, k, C)
    pred = (votes.sum(2) + 0.5 * votes[:, :, 0]).argmax(-1)                 # (B, Q)
    if earlier_only:
        pred[:, 0] = 0                                                      # nothing to look at
    return pred


def nearest_neighbour(x, y):
    """Per-position 1-NN: at position t the label of the nearest of examples 0..t-1 (Euclidean,
    on the projected inputs A x; a tie goes to the earliest). x (B, T, N_x), y (B, T) -> (B, T).
    Position 0 has no context: it predicts label 0, right by chance only, since every task
    permutes the labels at random."""
    return k_nearest(x, y, x, k=1, earlier_only=True)


def gradient_descent(x, y):
    """The sgd learner (models.SGD, its defaults) run on the tokens of x, y -> labels (B, T).
    Deterministic: every sequence starts from its own init, seeded by its content
    (models.GradientLearner)."""
    n_in = x.shape[-1] + data.NUM_CLASSES
    model = models.build("sgd", n_in, data.NUM_CLASSES,
                         **models.learner_sizes("sgd", n_in, x.shape[1])).to(x.device)
    return learner_predict(model, x, y)


def logistic_regression(x, y, l2=1e-2, steps=30):
    """Per-position logistic regression: at position t a linear softmax classifier, fitted on
    examples 0..t-1 of the sequence, predicts example t. x (B, T, N_x), y (B, T) -> (B, T);
    position 0 has no context and predicts label 0, as 1-NN. W_t is close to W_{t-1}, so each
    fit (fit_logistic) starts from the last one and takes `steps` more steps."""
    B, T, n = x.shape
    xb = F.pad(x.float(), (0, 1), value=1.0)                                # (B, T, n+1) bias
    target = F.one_hot(y, data.NUM_CLASSES).float()                        # (B, T, C)
    W = xb.new_zeros(B, n + 1, data.NUM_CLASSES)                           # (B, n+1, C)
    pred = torch.zeros_like(y)
    for t in range(1, T):
        W = fit_logistic(xb[:, :t], target[:, :t], l2=l2, steps=steps, W=W)  # on j < t
        pred[:, t] = (xb[:, t, None] @ W)[:, 0].argmax(-1)                  # (B,)
    return pred


def fit_logistic(X, Y, l2, steps, W=None):
    """Multinomial logistic regression, for B problems at once: X (B, J, n+1) with a bias
    column last, Y (B, J, C) one-hot -> W (B, n+1, C), after `steps` of FISTA (accelerated
    gradient descent) from W (zeros if None) on

        1/J sum_j CE(W^T x_j, y_j) + l2/2 |W|^2     (the bias row not penalised)

    The loss is convex; its gradient is L-Lipschitz with L = lambda_max(X^T X / J) / 2 + l2
    (the softmax's Hessian is at most I/2 in the logits), so the step is 1/L, lambda_max by
    power iteration."""
    B, J, n1 = X.shape
    W = X.new_zeros(B, n1, Y.shape[-1]) if W is None else W
    cov = X.transpose(1, 2) @ X / J                                         # (B, n+1, n+1)
    v = torch.ones(B, n1, 1, device=X.device)
    for _ in range(10):
        v = F.normalize(cov @ v, dim=1)
    lr = 1 / ((v.transpose(1, 2) @ cov @ v) / 2 + l2)                       # (B, 1, 1): 1 / L
    penalised = torch.ones(n1, 1, device=X.device)
    penalised[-1] = 0                                                       # not the bias
    W_prev = W
    for k in range(steps):
        Z = W + (k / (k + 3)) * (W - W_prev)                                # FISTA's look-ahead
        grad = X.transpose(1, 2) @ ((X @ Z).softmax(-1) - Y) / J + l2 * penalised * Z
        W_prev, W = W, Z - lr * grad
    return W


L2_GRID = (1e-3, 1e-2, 1e-1)


def choose_l2(x_all, y_all, seq_len, grid=L2_GRID, n_tasks=16, seqs_per_task=2):
    """The L2 of logistic regression, chosen on training tasks (ids 0 .. n_tasks - 1) of a
    training split, never on an evaluation set: the one whose accuracy over the second half of
    the sequence is highest (ties: the smaller)."""
    ids = torch.arange(n_tasks, device=y_all.device).repeat_interleave(seqs_per_task)
    x, y = data.task_sequences(x_all, y_all, ids, seq_len=seq_len,
                               seq_index=torch.arange(len(ids), device=ids.device),
                               seed=EVAL_SEED + 1)
    score = lambda l2: (logistic_regression(x, y, l2) == y)[:, seq_len // 2:].float().mean()
    return max(grid, key=lambda l2: (score(l2).item(), -l2))


def make_baselines(l2=1e-2):
    """{name: (predict(x, y) -> labels (B, T), sequences per task it runs on; None: all)}"""
    return {"1-NN": (nearest_neighbour, None),
            "logistic regression": (functools.partial(logistic_regression, l2=l2), 8),
            "SGD": (gradient_descent, None)}


BASELINES = make_baselines()


def first_per_task(task_ids, k):
    """(N,) bool: the first k sequences of every task in the set (all of them for k None)."""
    if k is None:
        return torch.ones_like(task_ids, dtype=torch.bool)
    group = task_index(task_ids)                                           # (N,)
    order = torch.argsort(group, stable=True)                              # tasks, in set order
    start = torch.cumsum(torch.bincount(group), 0) - torch.bincount(group) # first slot per task
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - start[group[order]]
    return rank < k


# -----------------------------------------------------------------------------
# Evaluation of a learner, beside the baselines

@torch.no_grad()
def evaluate(model, sets, seq_len, batch_size=256, ctx=None, baselines=None):
    """{name: summary} for every evaluation set; the model is left in the mode it was in.

    baselines: None, or a dict like BASELINES. Each baseline is scored on the same x, y tensors
    as the learner (on its subset of sequences) and added as
    summary["baselines"] = {baseline name: summary}."""
    baselines = baselines or {}
    was_training = model.training
    model.eval()
    out = {}
    for name, (x_all, y_all, task_ids, *kept) in sets.items():  # kept: the seen set's labels
        runs = {b: (predict, first_per_task(task_ids, k))                 # (N,) bool each
                for b, (predict, k) in baselines.items()}
        correct = correct_predictions(model, x_all, y_all, task_ids, seq_len=seq_len,
                                      batch_size=batch_size, ctx=ctx, runs=runs,
                                      identity_labels=kept[0] if kept else None)
        out[name] = summarize(correct.pop("learner"), task_ids)
        if baselines:
            out[name]["baselines"] = {b: summarize(c, task_ids[runs[b][1]])
                                      for b, c in correct.items()}
    model.train(was_training)
    return out


class Evaluator:
    """evaluate() the model again and again on the same sets, as meta-training does. The
    baselines read only the evaluation sequences, which never change: they are scored at the
    first call and attached to the results of every later one."""

    def __init__(self, model, sets, seq_len, baselines=None, ctx=None):
        self.model, self.sets, self.seq_len, self.ctx = model, sets, seq_len, ctx
        self.baselines, self.scored, self.results = baselines, None, None

    def __call__(self):
        self.results = evaluate(self.model, self.sets, self.seq_len, ctx=self.ctx,
                                baselines=None if self.scored else self.baselines)
        if self.baselines and self.scored is None:
            self.scored = {name: r["baselines"] for name, r in self.results.items()}
        for name, r in self.results.items():
            if self.scored:
                r["baselines"] = self.scored[name]
        return self.results


def correct_predictions(model, x_all, y_all, task_ids, seq_len, batch_size, ctx, runs,
                        identity_labels=None):
    """{"learner": (N, T), baseline: (N_b, T)} bool, right or wrong at every position: each
    evaluation sequence is made once, read by the learner and passed to every baseline whose
    runs (name: (predict, (N,) bool)) include it.

    A baseline's sequences wait until they fill a batch: SGD takes T steps whatever the batch,
    so its sequences are better run together than a few per batch."""
    correct = {who: [] for who in ["learner", *runs]}
    waiting = {b: [] for b in runs}                                       # (x, y) not yet run

    def run(b):
        x, y = (torch.cat(t) for t in zip(*waiting[b]))
        correct[b].append(runs[b][0](x, y) == y)                          # (b, T)
        waiting[b] = []

    for seq_index, x, y in eval_batches(x_all, y_all, task_ids, seq_len=seq_len,
                                        batch_size=batch_size, identity_labels=identity_labels):
        correct["learner"].append(learner_predict(model, x, y, ctx) == y)   # (b, T)
        for b, (_, keep) in runs.items():
            keep = keep[seq_index]                                        # (b,)
            if keep.any():
                waiting[b].append((x, y) if keep.all() else (x[keep], y[keep]))
            if sum(len(w[1]) for w in waiting[b]) >= batch_size:
                run(b)
    for b in runs:
        if waiting[b]:
            run(b)
    return {who: torch.cat(c) for who, c in correct.items()}


POSITIONS = (1, 5, 10, 20, 50, 100)  # examples at which summary.json keeps the accuracy


def compact(results):
    """results without the per-position curves (for summary.json): each summary keeps first,
    last, improvement and the accuracy at the POSITIONS (1-based examples) the sequence has."""
    def brief(r):
        out = {k: v for k, v in r.items() if k not in ("curve", "baselines")}
        out["acc_at"] = {str(p): r["curve"][p - 1] for p in POSITIONS if p <= len(r["curve"])}
        if "baselines" in r:
            out["baselines"] = {b: brief(s) for b, s in r["baselines"].items()}
        return out
    return {name: brief(r) for name, r in results.items()}


# -----------------------------------------------------------------------------
# The paper's three regimes (Figure 4), read off the improvement within the sequence
#
# instance memorisation: no improvement along the sequence, on seen or unseen tasks
# task memorisation:     seen tasks improve (the learner identifies which task it is in)
# learning-to-learn:     unseen tasks improve (the learner learns the task from the context)

def regime(results, base="mnist", threshold=0.05):
    """The regime reached, from the seen and unseen improvement on the base dataset. A set
    counts as improving when its improvement is above threshold with 95% confidence."""
    improves = lambda r: r["improvement"] - r["improvement_ci"] > threshold
    if improves(results[f"unseen {base}"]):
        return "learning-to-learn"
    if improves(results[f"seen {base}"]):
        return "task memorisation"
    return "instance memorisation"


def format_results(results):
    """One row per set, and under it one indented row per baseline scored on its sequences."""
    row = lambda name, r: (f"{name:<34} {r['first']:7.3f} {r['last']:8.3f} ± {r['last_ci']:.3f}"
                           f" {r['improvement']:+10.3f} ± {r['improvement_ci']:.3f}")
    lines = [f"{'set':<34} {'acc@1':>7} {'acc@last':>15} {'improvement':>17}"]
    for name, r in results.items():
        lines.append(row(name, r))
        lines += [row(f"  {b} ({s['n']} seqs)", s) for b, s in r.get("baselines", {}).items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# A trained learner from a checkpoint

def load_checkpoint(path, device="cpu"):
    """The dict of a train.py checkpoint, read safely: weights_only=True rebuilds only tensors,
    dicts, lists, numbers and strings, never an arbitrary object, so a file from a stranger
    cannot run code as it loads (a pickle may name any function to call). A missing, cut or
    refused file is a one-line ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # refused, or garbage the safe unpickler cannot read
        why = (str(e).partition("WeightsUnpickler error:")[2].strip() or str(e)).splitlines()[0]
        raise ValueError(f"{path} is refused: not made of tensors, numbers and strings only "
                         f"({why[:120]})") from None
    except Exception as e:  # cut short or corrupted: zip, pickle and storage errors alike
        why = (str(e).splitlines() or [""])[0][:100]
        raise ValueError(f"{path} is cut short or corrupted ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "flags"} <= set(ckpt):
        raise ValueError(f"{path} is not a train.py checkpoint")
    return ckpt


def load_learner(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint; a one-line ValueError
    for a file that is not one."""
    ckpt = load_checkpoint(path, device)
    try:
        model = models.build(**ckpt["model_args"]).to(device)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = (str(e).splitlines() or [""])[0][:100]
        raise ValueError(f"{path} holds no learner that models.py can build "
                         f"({type(e).__name__}: {why})") from None
    return model.eval(), ckpt
