"""
General-purpose in-context learning by meta-learning (paper section 2): the meta-learning logic.

A learner reads a sequence of examples from one task and predicts each label before it sees it:

    token t = [A x_t ; onehot(rho(y_{t-1}))],  zeros in place of the label at t = 0
    loss    = cross-entropy of the prediction at every position, averaged

"After meta-training, the learner is able to learn new tasks in-context, without any gradient
step": its accuracy on tasks it never saw rises along the sequence as it reads more examples.
`evaluate` measures exactly that, per position, on seen tasks, unseen tasks and unseen tasks of
other datasets, and `regime` names which of the paper's three regimes a learner is in.
`InContextClassifier` then uses a meta-trained learner on any table of numbers, as a
classifier with fit/predict, beside two classic baselines (kNN, logistic regression).

Uses data.py (tasks, sequences) and models.py (learners); imported by train.py.
"""
import math
import os
import pickle
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import data
import models

# -----------------------------------------------------------------------------
# Tokens and loss


def make_tokens(x, y):
    """[x_t ; onehot(y_{t-1})]: x (B, T, N_x), y (B, T) -> tokens (B, T, N_x + 10).
    Position t carries the label of example t-1, never its own."""
    y_prev = F.one_hot(y[:, :-1], data.NUM_CLASSES).to(x.dtype)     # (B, T-1, 10)
    y_prev = F.pad(y_prev, (0, 0, 1, 0))                             # (B, T, 10), zeros at t = 0
    return torch.cat([x, y_prev], dim=-1)                            # (B, T, N_x + 10)


def meta_loss(model, x, y):
    """Cross-entropy averaged over every position of every sequence."""
    logits = model(make_tokens(x, y))                                # (B, T, 10)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


# -----------------------------------------------------------------------------
# Evaluation: per-position accuracy on seen tasks, unseen tasks and other datasets

EVAL_SEED = 12345  # evaluation sequences are fixed, and never drawn in meta-training


def seen_task_ids(n_tasks, num_tasks, device):
    """n_tasks ids from the training range [0, num_tasks), the same every time: every training
    task in turn when there are no more than n_tasks, else a random draw. Training draws ids
    uniformly, so these were trained on when num_tasks is small against the number of training
    sequences; with more tasks (or fresh ones) most were never drawn."""
    if num_tasks is not None and num_tasks <= n_tasks:
        return torch.arange(n_tasks, device=device) % num_tasks
    bits = data.random_bits(data.hash_key(EVAL_SEED), n_tasks).to(device)
    return data.random_below(bits, num_tasks or 2 ** 62)


def eval_sets(base, others, num_tasks, n_tasks, seqs_per_task, device):
    """{name: (x_all, y_all, task_ids)}: the base dataset's test split on seen and unseen tasks,
    and each other dataset's test split on unseen tasks."""
    per_seq = lambda ids: ids.repeat_interleave(seqs_per_task)      # (n_tasks * seqs_per_task,)
    unseen = per_seq(data.unseen_task_ids(n_tasks, device))
    name, splits = base
    sets = {f"seen {name}": (*splits["test"], per_seq(seen_task_ids(n_tasks, num_tasks, device))),
            f"unseen {name}": (*splits["test"], unseen)}
    for other, splits in others.items():
        sets[f"unseen {other}"] = (*splits["test"], unseen)
    return sets


@torch.no_grad()
def accuracy_per_position(model, x_all, y_all, task_ids, seq_len, batch_size=256, ctx=None):
    """Correct predictions (N, T) bool for the evaluation sequences of the given tasks."""
    correct = []
    for i in range(0, len(task_ids), batch_size):
        seq_index = torch.arange(i, min(i + batch_size, len(task_ids)), device=task_ids.device)
        x, y = data.task_sequences(x_all, y_all, task_ids[seq_index], seq_len, seq_index, EVAL_SEED)
        with ctx or nullcontext():
            logits = model(make_tokens(x, y))                        # (b, T, 10)
        correct.append(logits.argmax(-1) == y)
    return torch.cat(correct)


def ci95(values):
    """Half-width of the 95% normal interval for the mean of values (1-D); NaN for one value."""
    n = len(values)
    return 1.96 * values.std().item() / math.sqrt(n) if n > 1 else float("nan")


def summarize(correct, task_ids=None):
    """Accuracy curve, accuracy at the last position and the improvement within the sequence
    (last minus first), each with a 95% confidence interval.

    Sequences of one task are not independent (they share its projection and labels), so the
    intervals are taken over per-task means when task_ids (N,) are given; without them, or when
    all sequences are of one task (a single training task: no other task to generalise to),
    every sequence counts as its own group."""
    c = correct.float()                                              # (N, T)
    curve = c.mean(0)                                                # (T,)
    groups = torch.unique(task_ids, return_inverse=True)[1] if task_ids is not None \
        else torch.arange(len(c), device=c.device)                   # (N,) task index
    tasks = int(groups.max()) + 1
    if tasks == 1:
        groups = torch.arange(len(c), device=c.device)
    n = int(groups.max()) + 1
    count = torch.zeros(n, device=c.device).index_add_(0, groups, torch.ones_like(c[:, 0]))
    per_task = lambda v: torch.zeros(n, device=c.device).index_add_(0, groups, v) / count  # (n,)
    last, gain = per_task(c[:, -1]), per_task(c[:, -1] - c[:, 0])   # (n,) each
    return {"curve": [round(v, 4) for v in curve.tolist()],
            "first": curve[0].item(),
            "last": curve[-1].item(), "last_ci": ci95(last),
            "improvement": gain.mean().item(), "improvement_ci": ci95(gain),
            "n": len(c), "tasks": tasks}


def evaluate(model, sets, seq_len, batch_size=256, ctx=None):
    """{name: summary} for every evaluation set; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    out = {name: summarize(accuracy_per_position(model, *s, seq_len, batch_size, ctx), s[2])
           for name, s in sets.items()}
    model.train(was_training)
    return out


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
    lines = [f"{'set':<22} {'acc@1':>7} {'acc@last':>15} {'improvement':>17}"]
    for name, r in results.items():
        lines.append(f"{name:<22} {r['first']:7.3f} {r['last']:8.3f} ± {r['last_ci']:.3f}"
                     f" {r['improvement']:+10.3f} ± {r['improvement_ci']:.3f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# A trained learner from a checkpoint

def load_checkpoint(path, device="cpu"):
    """The dict of a train.py checkpoint, read safely: the one place where checkpoints are loaded.

    torch.load(weights_only=True) rebuilds only tensors, dicts, lists, tuples, numbers, strings
    and None, never an arbitrary object, so a file from a stranger cannot run code as it loads
    (a pickle may name any function to call; this refuses every one). A missing, truncated or
    corrupted file, or one that is refused, is a one-line ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} " + ("is a folder, not a file" if os.path.isdir(path)
                                                  else "does not exist"))
    try:
        with warnings.catch_warnings():  # e.g. a pickle protocol warning: our error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except PermissionError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except pickle.UnpicklingError as e:  # refused, or garbage that the safe unpickler cannot read
        why = str(e).partition("WeightsUnpickler error:")[2].strip() or str(e)
        why = why.splitlines()[0].split(" was not an allowed global")[0]
        raise ValueError(f"{path} is refused: it is not made of tensors, numbers and strings only "
                         f"({why}); loading it could run code, or it is corrupted") from None
    except Exception as e:  # truncated or corrupted: zip, pickle and storage errors alike
        why = (str(e).splitlines() or [""])[0][:100]
        raise ValueError(f"{path} is truncated or corrupted ({type(e).__name__}: {why})") from None
    missing = [k for k in ("model", "model_config", "config")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (no {', '.join(missing)} in it)")
    return ckpt


def load_learner(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint; a one-line ValueError
    for a file that is not one."""
    ckpt = load_checkpoint(path, device)
    try:
        m = ckpt["model_config"]
        model = models.build(m["kind"], m["n_in"], m["n_out"], **m["cfg"]).to(device)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = (str(e).splitlines() or [""])[0][:100]
        raise ValueError(f"{path} holds no learner that models.py can build "
                         f"({type(e).__name__}: {why})") from None
    return model.eval(), ckpt


# -----------------------------------------------------------------------------
# A meta-trained learner as a classifier for your own table of numbers
#
# The learner only ever read sequences of (A x, rho(y)): x a z-normalised N_x-vector, A a random
# N(0, 1/N_x) matrix, rho a random relabelling. A table of any width d is brought to that form
# the same way: z-normalise, project by a fixed random d x N_x matrix, map the labels to ids and
# permute them. Each such random choice is one "task" for the learner; an ensemble averages a few.


def check_matrix(X, name="X", width=None):
    """A finite float matrix (N, d), or a one-line ValueError saying what is wrong."""
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers only") from None
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {X.shape}")
    if X.shape[1] == 0:
        raise ValueError(f"{name} has width 0: no features to learn from")
    if width is not None and X.shape[1] != width:
        raise ValueError(f"{name} has {X.shape[1]} features but the context rows have {width}")
    if not np.isfinite(X).all():
        row = np.argwhere(~np.isfinite(X))[0, 0]
        raise ValueError(f"{name} holds NaN or infinite values (row {row})")
    return X


@torch.no_grad()
def last_position_logits(model, x_ctx, y_ctx, x_query, batch_size=512):
    """One sequence per query: the context, then the query last. x_ctx (n, N_x), y_ctx (n,),
    x_query (Q, N_x) -> logits (Q, 10) at the query. No query sees another."""
    n, out = len(y_ctx), []
    for i in range(0, len(x_query), batch_size):
        xq = x_query[i:i + batch_size]
        x = torch.cat([x_ctx.expand(len(xq), n, -1), xq[:, None]], 1)          # (B, n+1, N_x)
        y = F.pad(y_ctx.expand(len(xq), n), (0, 1))     # (B, n+1); the query's label is never read
        out.append(model(make_tokens(x, y))[:, -1].float())                   # (B, 10)
    return torch.cat(out) if out else x_query.new_zeros(0, data.NUM_CLASSES)


class InContextClassifier:
    """fit(X, y) stores the context rows; predict(X) / predict_proba(X) run, for every query
    row, the sequence [context rows with their labels ; the query] and read the learner's
    prediction at the last position, all queries in one batch of sequences.

    Features: z-normalised with the context's mean and std, then projected by a random d x N_x
    matrix with entries N(0, 1/d), so each projected feature has variance ~1, as in meta-training.
    normalize="column" (default) takes the statistics per column, so no column's units dominate;
    "global" takes one mean and std over all columns, as meta-training did for pixels: better
    when the columns share one unit (UCI digits pixels: 0.75 vs 0.63 with 16 members).
    Labels: up to 10 values of any type, sorted, mapped to ids 0..k-1, then permuted into the
    learner's 10 labels; probabilities are renormalised over the k labels in use.

    Ensemble: each of `members` members draws its own projection, label permutation and order of
    the context rows (all seeded by `seed`, so results are reproducible). Context longer than
    seq_len - 1 rows is split, per member, into ceil(n / (seq_len - 1)) near-equal chunks, each
    its own sequence; predict_proba averages the probabilities over all members and chunks.
    """

    def __init__(self, checkpoint, device="cpu", seed=0, members=32, normalize="column",
                 batch_size=512):
        if normalize not in ("column", "global"):
            raise ValueError(f"normalize must be 'column' or 'global', not {normalize!r}")
        self.model, ckpt = load_learner(checkpoint, device)
        self.n_x = ckpt["model_config"]["n_in"] - data.NUM_CLASSES
        self.seq_len = ckpt["config"]["seq_len"]
        self.device, self.seed, self.members, self.normalize = device, seed, members, normalize
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path, device="cpu", seed=0, **kw):
        return cls(path, device=device, seed=seed, **kw)

    def fit(self, X, y):
        X, y = check_matrix(X), np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must hold one label per row of X: {len(X)} rows, y of shape {y.shape}")
        if len(X) < 2:
            raise ValueError(f"need at least 2 context rows to learn from, got {len(X)}")
        self.classes_, ids = np.unique(y, return_inverse=True)
        if len(self.classes_) > data.NUM_CLASSES:
            raise ValueError(f"y has {len(self.classes_)} classes; the learner tells at most "
                             f"{data.NUM_CLASSES} apart")
        axis = 0 if self.normalize == "column" else None
        self.mean_, std = X.mean(axis), X.std(axis)
        self.std_ = np.where(std > 0, std, 1.0)                     # constant columns become 0
        self.x_ctx = self.standardize(X)                            # (n, d)
        self.y_ctx = torch.as_tensor(ids.reshape(-1), device=self.device)   # (n,) ids 0..k-1
        return self

    def standardize(self, X):
        """z-normalise by the context's statistics: (N, d) array -> tensor."""
        return torch.as_tensor((X - self.mean_) / self.std_, dtype=torch.float32, device=self.device)

    def predict_proba(self, X):
        """(Q, k) probabilities, columns in the order of classes_."""
        if not hasattr(self, "classes_"):
            raise ValueError("call fit(X, y) before predict or predict_proba")
        x_q = self.standardize(check_matrix(X, width=self.x_ctx.shape[1]))        # (Q, d)
        (n, d), k = self.x_ctx.shape, len(self.classes_)
        chunks = math.ceil(n / (self.seq_len - 1))
        proba = torch.zeros(len(x_q), k, device=self.device)
        for m in range(self.members):
            key = lambda stream: data.hash_key(self.seed, m, stream).to(self.device)
            P = data.random_normal(key(1), d * self.n_x).view(d, self.n_x) / d ** 0.5  # (d, N_x)
            rho = data.random_bits(key(2), data.NUM_CLASSES).argsort()[:k]   # class -> label
            order = data.random_bits(key(3), n).argsort()
            x_c, x_p = self.x_ctx @ P, x_q @ P                                # (n, N_x), (Q, N_x)
            for idx in torch.tensor_split(order, chunks):
                logits = last_position_logits(self.model, x_c[idx], rho[self.y_ctx[idx]], x_p,
                                              self.batch_size)               # (Q, 10)
                proba += logits[:, rho].softmax(-1)                          # (Q, k)
        return (proba / (self.members * chunks)).cpu().numpy()

    def predict(self, X):
        proba = self.predict_proba(X)                               # (Q, k)
        return self.classes_[proba.argmax(1)]


# -----------------------------------------------------------------------------
# Baselines on the same context rows (already z-normalised): kNN and logistic regression

def knn_predict(x_ctx, y_ctx, x_query, k=1):
    """Majority of the k nearest context rows (Euclidean); a tie goes to the nearest one's class."""
    idx = torch.cdist(x_query, x_ctx).topk(min(k, len(y_ctx)), largest=False).indices  # (Q, k)
    n_cls = int(y_ctx.max()) + 1
    votes = F.one_hot(y_ctx[idx], n_cls).sum(1) + 0.5 * F.one_hot(y_ctx[idx[:, 0]], n_cls)
    return votes.argmax(1)


def logreg_predict(x_ctx, y_ctx, x_query, l2=1e-2, iters=200):
    """Multinomial logistic regression, full-batch L-BFGS on cross-entropy + l2/2 |W|^2."""
    W = torch.zeros(x_ctx.shape[1] + 1, int(y_ctx.max()) + 1, device=x_ctx.device,
                    requires_grad=True)                                 # (d+1, k)
    a = F.pad(x_ctx, (0, 1), value=1.0)                                 # (n, d+1), bias column
    opt = torch.optim.LBFGS([W], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ W, y_ctx) + l2 / 2 * W[:-1].pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return (F.pad(x_query, (0, 1), value=1.0) @ W.detach()).argmax(1)
