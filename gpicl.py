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
    confidence intervals over tasks (task_ids (N,); see units)."""
    c = correct.float()                                              # (N, T)
    curve = c.mean(0)                                                # (T,)
    groups = units(task_ids, len(c), c.device)                       # (N,)
    tasks = len(c) if task_ids is None else int(task_index(task_ids).max()) + 1
    last = group_means(c[:, -1], groups)                             # (groups,)
    gain = group_means(c[:, -1] - c[:, 0], groups)                   # (groups,)
    return {"curve": [round(v, 4) for v in curve.tolist()],
            "first": curve[0].item(),
            "last": curve[-1].item(), "last_ci": ci95(last),
            "improvement": gain.mean().item(), "improvement_ci": ci95(gain),
            "n": len(c), "tasks": tasks}


def units(task_ids, n, device):
    """What an interval is taken over: each sequence's task, (N,) in 0 .. G - 1; each sequence
    on its own without task_ids, or when all n are of one task (a single training task: no
    other task to generalise to)."""
    each_sequence = torch.arange(n, device=device)
    groups = each_sequence if task_ids is None else task_index(task_ids)
    return each_sequence if int(groups.max()) == 0 else groups


def task_index(task_ids):
    """Which task each sequence is of: ids (N,) -> (N,) in 0 .. tasks - 1."""
    return torch.unique(task_ids, return_inverse=True)[1]


def group_means(values, groups):
    """The mean of values (N, ...) within each group: groups (N,) in 0 .. G - 1 -> (G, ...)."""
    sums = values.new_zeros(int(groups.max()) + 1, *values.shape[1:]).index_add_(0, groups, values)
    return sums / torch.bincount(groups).view(-1, *[1] * (values.dim() - 1))


def ci95(values):
    """Half-width of the 95% t interval for the mean of values (n, ...) over their first axis:
    a float for 1-D values, a tensor otherwise; NaN for one value."""
    n = len(values)
    half = t95(n - 1) * values.std(0) / math.sqrt(n) if n > 1 else torch.tensor(float("nan"))
    return half.item() if half.dim() == 0 else half


def t95(df):
    """Student's t 97.5% quantile with df degrees of freedom (2.131 for 16 tasks, where the
    normal's 1.96 would be 8% too narrow): a table up to 4, then Hill's series in the normal
    quantile z, within 1e-3 of the exact value there and better beyond."""
    if df <= 4:
        return (12.706, 4.303, 3.182, 2.776)[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def paired(learner, baseline, task_ids):
    """The learner minus a baseline on the very same sequences, at every position: correct
    (N, T) bool each -> {"diff": mean differences (T,), "diff_ci": 95% t half-widths (T,)}, the
    per-task means being the units (a task's sequences share its projection and labels)."""
    groups = units(task_ids, len(learner), learner.device)              # as summarize's
    per_task = group_means(learner.float() - baseline.float(), groups)   # (G, T)
    round4 = lambda t: [round(v, 4) for v in t.tolist()]
    return {"diff": round4(per_task.mean(0)), "diff_ci": round4(ci95(per_task))}


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
#         be more than a lookup)
#   SGD:  the paper's own baseline (Table 1), models.SGD: a fresh MLP per sequence, one Adam step
#         per example; T sequential steps, run on every sequence so that its interval is as
#         narrow as the learner's


def nearest_neighbour(x, y):
    """Per-position 1-NN: at position t the label of the nearest of examples 0..t-1 (Euclidean,
    on the projected inputs A x; a tie goes to the earliest). x (B, T, N_x), y (B, T) -> (B, T).
    Position 0 has no context: it predicts label 0, right by chance only, since every task
    permutes the labels at random."""
    T = x.shape[1]
    # cdist's fast |a|^2 + |b|^2 - 2ab form (3x faster than exact here) rounds, which can only
    # reorder near-ties; an example repeated earlier in the sequence is still the nearest
    dist = torch.cdist(x, x)                                                 # (B, T, T)
    earlier = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)   # j < t
    nearest = dist.masked_fill(~earlier, float("inf")).argmin(-1)            # (B, T) earliest
    pred = torch.gather(y, 1, nearest)
    pred[:, 0] = 0                                                           # nothing to look at
    return pred


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
    """{name: predict(x, y) -> labels (B, T)}: each reads every evaluation sequence."""
    return {"1-NN": nearest_neighbour,
            "logistic regression": functools.partial(logistic_regression, l2=l2),
            "SGD": gradient_descent}


BASELINES = make_baselines()


# -----------------------------------------------------------------------------
# Evaluation of a learner, beside the baselines

def evaluate(model, sets, seq_len, batch_size=256, ctx=None, baselines=None):
    """{name: summary} for every evaluation set. baselines: None, or a dict like BASELINES;
    each is scored on the very x, y tensors the learner reads, and added as
    summary["baselines"][name] = its summary and the learner minus it, paired (paired)."""
    return report(score(model, sets, seq_len, batch_size, ctx, baselines), sets)


@torch.no_grad()
def score(model, sets, seq_len, batch_size=256, ctx=None, baselines=None):
    """{set name: {"learner": (N, T), baseline: (N, T)}} bool, right or wrong at every position:
    each evaluation sequence is made once and read by the learner and every baseline. The
    model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    out = {}
    for name, (x_all, y_all, task_ids, *kept) in sets.items():  # kept: the seen set's labels
        correct = {who: [] for who in ["learner", *(baselines or {})]}
        for _, x, y in eval_batches(x_all, y_all, task_ids, seq_len, batch_size,
                                    identity_labels=kept[0] if kept else None):
            correct["learner"].append(learner_predict(model, x, y, ctx) == y)   # (b, T)
            for b, predict in (baselines or {}).items():
                correct[b].append(predict(x, y) == y)                       # (b, T)
        out[name] = {who: torch.cat(c) for who, c in correct.items()}
    model.train(was_training)
    return out


def report(correct, sets):
    """The summaries of score()'s predictions: the learner's, and each baseline's beside the
    learner minus it on the same sequences."""
    out = {}
    for name, c in correct.items():
        task_ids = sets[name][2]
        out[name] = summarize(c["learner"], task_ids)
        others = {b: v for b, v in c.items() if b != "learner"}
        if others:
            out[name]["baselines"] = {b: dict(summarize(v, task_ids),
                                              **paired(c["learner"], v, task_ids))
                                      for b, v in others.items()}
    return out


class Evaluator:
    """evaluate() the model again and again on the same sets, as meta-training does. The
    baselines read only the evaluation sequences, which never change: they are scored at the
    first call, and every later one pairs the learner of the moment with those predictions."""

    def __init__(self, model, sets, seq_len, baselines=None, ctx=None):
        self.model, self.sets, self.seq_len, self.ctx = model, sets, seq_len, ctx
        self.baselines, self.scored, self.results = baselines, None, None

    def __call__(self):
        correct = score(self.model, self.sets, self.seq_len, ctx=self.ctx,
                        baselines=None if self.scored else self.baselines)
        if self.scored is None:
            self.scored = {name: {b: v for b, v in c.items() if b != "learner"}
                           for name, c in correct.items()}
        for name, c in correct.items():
            c.update(self.scored[name])
        self.results = report(correct, self.sets)
        return self.results


POSITIONS = (1, 5, 10, 20, 50, 100)  # examples at which summary.json keeps the accuracy


def compact(results):
    """results without the per-position curves (for summary.json): each summary keeps first,
    last, improvement and the accuracy at the POSITIONS (1-based examples) the sequence has."""
    def brief(r):
        out = {k: v for k, v in r.items() if k not in ("curve", "baselines", "diff", "diff_ci")}
        at = [p for p in POSITIONS if p <= len(r["curve"])]
        out["acc_at"] = {str(p): r["curve"][p - 1] for p in at}
        if "diff" in r:  # the learner minus this baseline, paired, and its interval
            out["diff_at"] = {str(p): [r["diff"][p - 1], r["diff_ci"][p - 1]] for p in at}
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
    """One row per set, and under it one indented row per baseline scored on its sequences,
    with the learner minus it at the last example, paired over tasks."""
    row = lambda name, r: (f"{name:<30} {r['first']:6.3f} {r['last']:7.3f} ± {r['last_ci']:.3f}"
                           f" {r['improvement']:+7.3f} ± {r['improvement_ci']:.3f}")
    versus = lambda r: f" {r['diff'][-1]:+10.3f} ± {r['diff_ci'][-1]:.3f}" if "diff" in r else ""
    lines = [f"{'set':<30} {'acc@1':>6} {'acc@last':>15} {'improvement':>15} "
             f"{'learner - it @last':>18}"]
    for name, r in results.items():
        lines.append(row(name, r))
        lines += [row(f"  {b}", s) + versus(s) for b, s in r.get("baselines", {}).items()]
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
