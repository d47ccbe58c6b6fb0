"""
General-purpose in-context learning by meta-learning (paper section 2): the meta-learning logic.

A learner reads a sequence of examples from one task and predicts each label before it sees it:

    token t = [A x_t ; onehot(rho(y_{t-1}))],  zeros in place of the label at t = 0
    loss    = cross-entropy of the prediction at every position, averaged

"After meta-training, the learner is able to learn new tasks in-context, without any gradient
step": its accuracy on tasks it never saw rises along the sequence as it reads more examples.
`evaluate` measures exactly that, per position, on seen tasks, unseen tasks and unseen tasks of
other datasets, beside 1-NN and SGD scored on the very same sequences (so a curve can be read
against learners that need no meta-training), and `regime` names which of the paper's three
regimes a learner is in.
`InContextClassifier` then uses a meta-trained learner on any table of numbers, as a
classifier with fit/predict, beside two classic baselines (kNN, logistic regression).

Uses data.py (tasks, sequences) and models.py (learners); imported by train.py.
"""
import math
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
    """Ids 0 .. n_tasks - 1 of the training range (as the authors' meta_test), each taken modulo
    num_tasks: every training task in turn when there are fewer than n_tasks. Training draws ids
    uniformly, so these were trained on when num_tasks is small against the number of training
    sequences; with more tasks (or fresh ones) most were never drawn."""
    ids = torch.arange(n_tasks, device=device)
    return ids % num_tasks if num_tasks is not None else ids


def eval_sets(base, others, num_tasks, n_tasks, seqs_per_task, device):
    """{name: (x_all, y_all, task_ids)}: the base dataset's test split on seen and unseen tasks
    and as it is (no projection, no relabelling, as the authors also report), and each other
    dataset's test split on unseen tasks."""
    per_seq = lambda ids: ids.repeat_interleave(seqs_per_task)      # (n_tasks * seqs_per_task,)
    unseen = per_seq(data.unseen_task_ids(n_tasks, device))
    name, splits = base
    sets = {f"seen {name}": (*splits["test"], per_seq(seen_task_ids(n_tasks, num_tasks, device))),
            f"unseen {name}": (*splits["test"], unseen),
            f"identity {name}": (*splits["test"], torch.full_like(unseen[:seqs_per_task],
                                                                   data.IDENTITY_TASK))}
    for other, splits in others.items():
        sets[f"unseen {other}"] = (*splits["test"], unseen)
    return sets


def eval_batches(x_all, y_all, task_ids, seq_len, batch_size=256):
    """The evaluation sequences of the given tasks, batch by batch: (seq_index (b,), x (b, T, N_x),
    y (b, T)). Sequence i is the same however the set is batched (data.task_sequences)."""
    for i in range(0, len(task_ids), batch_size):
        seq_index = torch.arange(i, min(i + batch_size, len(task_ids)), device=task_ids.device)
        yield seq_index, *data.task_sequences(x_all, y_all, task_ids[seq_index], seq_len,
                                              seq_index, EVAL_SEED)


def learner_predict(model, x, y, ctx=None):
    """The learner's label at every position: x (B, T, N_x), y (B, T) -> (B, T)."""
    with ctx or nullcontext():
        return model(make_tokens(x, y)).argmax(-1)


@torch.no_grad()
def accuracy_per_position(model, x_all, y_all, task_ids, seq_len, batch_size=256, ctx=None):
    """Correct predictions (N, T) bool for the evaluation sequences of the given tasks."""
    return torch.cat([learner_predict(model, x, y, ctx) == y
                      for _, x, y in eval_batches(x_all, y_all, task_ids, seq_len, batch_size)])


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


# -----------------------------------------------------------------------------
# Classic baselines, scored per position on the very sequences the learner reads
#
# A learning curve alone does not say whether 0.2 at the 100th example is good. Two learners
# that need no meta-training answer that, each reading the same x and y as the learner and
# predicting example t from examples 0..t-1 only:
#   1-NN: the label of the nearest earlier example (ours: the simplest learner there is; it is
#         cheap, so it runs on every sequence)
#   SGD:  the paper's own baseline (Table 1), models.SGD: a fresh MLP per sequence, one Adam step
#         per example; T sequential steps, so by default only on 2 sequences of each task


def nearest_neighbour(x, y):
    """Per-position 1-NN: at position t the label of the nearest of examples 0..t-1 (Euclidean,
    on the projected inputs A x; a tie goes to the earliest). x (B, T, N_x), y (B, T) -> (B, T).
    Position 0 has no context: it predicts label 0, right by chance only, since every task
    permutes the labels at random."""
    T = x.shape[1]
    # cdist's fast |a|^2 + |b|^2 - 2ab form (3x faster than exact here) rounds, which can only
    # reorder near-ties; an example repeated earlier in the sequence is still the nearest
    dist = torch.cdist(x, x)                                                # (B, T, T)
    earlier = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)  # j < t, strictly
    nearest = dist.masked_fill(~earlier, float("inf")).argmin(-1)          # (B, T)
    pred = torch.gather(y, 1, nearest)                                      # (B, T)
    pred[:, 0] = 0                                                          # nothing to look at
    return pred


def gradient_descent(x, y):
    """The sgd learner (models.SGD, its defaults) run on the tokens of x, y -> labels (B, T).
    Deterministic: every sequence starts from one fixed init (models.GradientLearner)."""
    n_in = x.shape[-1] + data.NUM_CLASSES
    model = models.build("sgd", n_in, data.NUM_CLASSES,
                         **models.model_config("sgd", n_in, x.shape[1])).to(x.device)
    return learner_predict(model, x, y)


# name: (predict(x, y) -> labels (B, T), sequences per task it runs on; None: all)
BASELINES = {"1-NN": (nearest_neighbour, None), "SGD": (gradient_descent, 2)}


def first_per_task(task_ids, k):
    """(N,) bool: the first k sequences of every task in the set (all of them for k None)."""
    if k is None:
        return torch.ones_like(task_ids, dtype=torch.bool)
    group = torch.unique(task_ids, return_inverse=True)[1]                 # (N,) task index
    order = torch.argsort(group, stable=True)                              # tasks, in set order
    start = torch.cumsum(torch.bincount(group), 0) - torch.bincount(group) # first slot per task
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - start[group[order]]
    return rank < k


# -----------------------------------------------------------------------------
# Evaluation of a learner, beside the baselines

@torch.no_grad()
def evaluate(model, sets, seq_len, batch_size=256, ctx=None, baselines=True):
    """{name: summary} for every evaluation set; the model is left in the mode it was in.

    baselines: True for BASELINES, False (or {}) for none, or a dict like BASELINES. Each is
    scored on the same x, y tensors as the learner (on its subset of sequences) and added as
    summary["baselines"] = {baseline name: summary}."""
    baselines = BASELINES if baselines is True else dict(baselines or {})
    was_training = model.training
    model.eval()
    out = {}
    for name, (x_all, y_all, task_ids) in sets.items():
        runs = {b: first_per_task(task_ids, k) for b, (_, k) in baselines.items()}  # (N,) each
        correct = {who: [] for who in ["learner", *baselines]}
        # a baseline's sequences wait until they fill a batch: SGD takes T steps whatever the
        # batch, so its 2 sequences per task are better run together than a few per batch
        waiting = {b: [] for b in baselines}

        def run(b):
            x, y = (torch.cat(t) for t in zip(*waiting[b]))
            correct[b].append(baselines[b][0](x, y) == y)                  # (b, T)
            waiting[b] = []

        for seq_index, x, y in eval_batches(x_all, y_all, task_ids, seq_len, batch_size):
            correct["learner"].append(learner_predict(model, x, y, ctx) == y)   # (b, T)
            for b in baselines:
                keep = runs[b][seq_index]                                   # (b,)
                if keep.any():
                    waiting[b].append((x, y) if keep.all() else (x[keep], y[keep]))
                if sum(len(w[1]) for w in waiting[b]) >= batch_size:
                    run(b)
        for b in baselines:
            if waiting[b]:
                run(b)
        out[name] = summarize(torch.cat(correct["learner"]), task_ids)
        if baselines:
            out[name]["baselines"] = {b: summarize(torch.cat(correct[b]), task_ids[runs[b]])
                                      for b in baselines}
    model.train(was_training)
    return out


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
    row = lambda name, r: (f"{name:<22} {r['first']:7.3f} {r['last']:8.3f} ± {r['last_ci']:.3f}"
                           f" {r['improvement']:+10.3f} ± {r['improvement_ci']:.3f}")
    lines = [f"{'set':<22} {'acc@1':>7} {'acc@last':>15} {'improvement':>17}"]
    for name, r in results.items():
        lines.append(row(name, r))
        lines += [row(f"  {b} ({s['n']} seqs)", s) for b, s in r.get("baselines", {}).items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# A trained learner from a checkpoint

def load_learner(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    m = ckpt["model_config"]
    model = models.build(m["kind"], m["n_in"], m["n_out"], **m["cfg"]).to(device)
    model.load_state_dict(ckpt["model"])
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
