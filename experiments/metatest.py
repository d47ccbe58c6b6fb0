"""
Meta-test trained learners: the paper's Table 1, UCI digits against classic baselines, and your
own CSV files.

    python experiments/metatest.py table1 runs/*/ckpt.pt            # Table 1 beside the paper's
    python experiments/metatest.py uci --ckpt checkpoints/cpu_preset_7x7.pt   # 99 context rows
    python experiments/metatest.py csv --ckpt C --train a.csv --test b.csv --label target

A client of gpicl.py: a meta-trained learner as a classifier for any table of numbers
(InContextClassifier, with kNN and logistic regression beside it), and the commands above.
Its last section holds the checks every command line of this folder makes before any work
(a device, an output file, a number's range, memory), which bench.py and findings.py borrow.
"""
import csv
import json
import math
import os
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules live one folder up
import data
import gpicl
import train

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
        out.append(model(data.make_tokens(x, y))[:, -1].float())             # (B, 10)
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
        self.model, ckpt = gpicl.load_learner(checkpoint, device)
        self.n_x = ckpt["model_args"]["n_in"] - data.NUM_CLASSES
        self.seq_len = ckpt["flags"]["seq_len"]
        self.device, self.seed, self.members, self.normalize = device, seed, members, normalize
        self.batch_size = batch_size

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
                                              batch_size=self.batch_size)    # (Q, 10)
                proba += logits[:, rho].softmax(-1)                          # (Q, k)
        return (proba / (self.members * chunks)).cpu().numpy()

    def predict(self, X):
        proba = self.predict_proba(X)                               # (Q, k)
        return self.classes_[proba.argmax(1)]


# -----------------------------------------------------------------------------
# Baselines on the same context rows (already z-normalised): kNN and logistic regression

def knn_predict(x_ctx, y_ctx, x_query, k=1):
    """k-NN on one context: the majority label of the k nearest rows (Euclidean), a tie in the
    vote going to the nearest one's label. (n, d), (n,), (Q, d) -> (Q,)."""
    nearest = torch.cdist(x_query, x_ctx).topk(min(k, len(y_ctx)), largest=False).indices
    votes = F.one_hot(y_ctx[nearest], data.NUM_CLASSES).float()              # (Q, k, C)
    return (votes.sum(1) + 0.5 * votes[:, 0]).argmax(-1)                     # (Q,)


def logreg_predict(x_ctx, y_ctx, x_query, l2=1e-2, steps=500):
    """The evaluation's logistic regression (gpicl.fit_logistic) fitted on one whole context:
    (n, d), (n,), (Q, d) -> (Q,)."""
    X, Q = F.pad(x_ctx.float(), (0, 1), value=1.0), F.pad(x_query.float(), (0, 1), value=1.0)
    W = gpicl.fit_logistic(X[None], F.one_hot(y_ctx, data.NUM_CLASSES).float()[None], l2, steps)
    return (Q @ W[0]).argmax(1)


# -----------------------------------------------------------------------------
# UCI digits: the learner on a table of numbers vs the way it was trained, and the baselines

def compare_on_uci_digits(checkpoint, splits=50, n_context=99, n_queries=100, members=16, seed=0,
                          device="cpu"):
    """{method: (mean accuracy, 95% CI over splits)}. Each split draws n_context context rows
    and n_queries other rows as queries. "image path" feeds the digits as meta-testing does (a
    resized image under an unseen task's projection and relabelling, one task or an ensemble);
    "table path" is InContextClassifier on the 64 raw pixel values, as from a CSV. Ensemble
    members differ in projection, relabelling and context order; the order matters most, as the
    learner leans on the latest context rows."""
    raw = data.load_raw("uci_digits")["test"]
    images, y = raw[0], torch.as_tensor(raw[1], dtype=torch.long)
    X = images.reshape(len(y), -1) * 16                              # (1797, 64) values 0..16
    model, ckpt = gpicl.load_learner(checkpoint, device)
    tasks = data.unseen_task_ids(splits * members).view(splits, members)
    classifiers = {(norm, m): InContextClassifier(checkpoint, device=device, seed=0, members=m,
                                                    normalize=norm)
                   for norm, m in (("column", 1), ("column", members), ("global", members))}
    acc = {}
    add = lambda name, pred: acc.setdefault(name, []).append((pred.cpu() == y[q]).float().mean().item())
    size = ckpt["flags"]["image_size"]
    for s in range(splits):
        order = data.random_bits(data.hash_key(seed, s, 4), len(y)).argsort()
        c, q = order[:n_context], order[n_context:n_context + n_queries]
        stats = data.to_inputs(images[c], size)[1]                         # context's stats
        x_img = data.to_inputs(images, size, stats)[0].to(device)          # (N, N_x)
        proba = 0
        for j, task in enumerate(tasks[s]):  # each member: its own task and context order
            x_t, y_t = data.apply_tasks(x_img[None], y[None].to(device), task[None].to(device))
            cj = c[data.random_bits(data.hash_key(seed, s, j, 5), n_context).argsort()]
            logits = last_position_logits(model, x_t[0, cj], y_t[0, cj], x_t[0, q])  # (Q, 10)
            proba = proba + logits.softmax(-1)[:, data.task_permutation(task[None])[0]]
            if j == 0:
                add("GPICL image path, 1 task", proba.argmax(1))
        add(f"GPICL image path, {members} tasks", proba.argmax(1))
        for (norm, m), clf in classifiers.items():
            clf.seed = seed * 100003 + s                            # a fresh ensemble per split
            clf.fit(X[c], y[c])
            add(f"GPICL table path, {norm} z-norm, {m} member{'s' * (m > 1)}",
                torch.as_tensor(clf.predict(X[q])))
            if m > 1:
                x_q = clf.standardize(X[q])
                for k in (1, 3):
                    add(f"kNN k={k}, {norm} z-norm", knn_predict(clf.x_ctx, clf.y_ctx, x_q, k))
                add(f"logistic regression, {norm} z-norm",
                    logreg_predict(clf.x_ctx, clf.y_ctx, x_q))
    return {name: (float(np.mean(a)), gpicl.ci95(torch.tensor(a, dtype=torch.float64)))
            for name, a in acc.items()}


# -----------------------------------------------------------------------------
# The paper's Table 1: accuracy at the last example on unseen tasks of each dataset

TABLE1 = {"MNIST": "mnist", "FashionMNIST": "fashion_mnist", "KMNIST": "kmnist",
          "Random": "random", "CIFAR10": "cifar10", "SVHN": "svhn", "UCI digits": "uci_digits"}
PAPER_TABLE1 = {  # accuracy % at the 100th example, meta-trained on MNIST (paper, Table 1)
    "SGD (paper)": [70.31, 50.78, 37.89, 100, 14.84, 10.16],
    "LSTM (paper)": [25.39, 28.12, 18.10, 58.72, 12.11, 11.07],
    "GPICL Transformer (paper)": [73.70, 62.24, 53.39, 100, 19.40, 14.58]}


def table1(checkpoints, eval_tasks=32, eval_seqs=32, out_dir=".", device="cpu"):
    """Evaluate each checkpoint on every Table 1 dataset at its last position (its seq_len)
    and write table1.md and table1.json to out_dir; returns the Markdown. A dataset that is
    not on this machine is reported missing, with the command that fetches it."""
    rows, loaded = [], {}
    unseen = data.unseen_task_ids(eval_tasks, device).repeat_interleave(eval_seqs)
    for path in checkpoints:
        model, ckpt = gpicl.load_learner(path, device)
        flags, cells = ckpt["flags"], {}
        for column, name in TABLE1.items():
            key = (name, flags["image_size"])
            if key not in loaded:  # never try the network here: offline, it may hang
                try:
                    loaded[key] = (data.load_dataset(name, flags["image_size"], device)
                                   if data.available(name) else None)
                except (OSError, ValueError):  # e.g. a damaged cache file
                    loaded[key] = None
            if loaded[key] is None:
                cells[column] = {"missing": f"fetch with `python experiments/datasets.py fetch {name}`"}
                continue
            r = gpicl.evaluate(model, {name: (*loaded[key]["test"], unseen)},
                               flags["seq_len"])[name]                 # the learner's column only
            cells[column] = {"acc": round(100 * r["last"], 2), "ci": round(100 * r["last_ci"], 2),
                             "n": r["n"]}
        rows.append({"checkpoint": path, "learner": ckpt["model_args"]["kind"],
                     "meta_trained_on": flags["dataset"], "image_size": flags["image_size"],
                     "seq_len": flags["seq_len"], "step": ckpt["step"], "accuracy_pct": cells})
    cell = lambda c: (f"missing — {c['missing']}" if "missing" in c else
                      f"{c['acc']:.2f} ± {c['ci']:.2f}")
    md = ["| learner | " + " | ".join(TABLE1) + " |", "|---" * (len(TABLE1) + 1) + "|"]
    md += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " | – |"
           for name, vals in PAPER_TABLE1.items()]
    md += [f"| {r['checkpoint']} ({r['learner']}, {r['meta_trained_on']} {r['image_size']}x"
           f"{r['image_size']}, @{r['seq_len']}) | "
           + " | ".join(cell(c) for c in r["accuracy_pct"].values()) + " |" for r in rows]
    md = "\n".join(md) + (f"\n\nAccuracy (%) at the last example on {eval_tasks} unseen tasks x "
                          f"{eval_seqs} sequences, ± 95% CI; "
                          f"paper rows: Kirsch et al. 2022, Table 1.\n")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table1.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "table1.json"), "w") as f:
        json.dump({"paper_pct": {k: dict(zip(TABLE1, v)) for k, v in PAPER_TABLE1.items()},
                   "eval_tasks": eval_tasks, "eval_seqs": eval_seqs, "checkpoints": rows}, f, indent=1)
    return md


# -----------------------------------------------------------------------------
# Command line: csv, uci and table1, with one-line errors (exit 2)

def read_table(path, label, columns=None):
    """(feature names, X (N, d) float64, labels (N,) str or None) from a CSV with a header row.
    columns: the feature names to take, in that order (the test file follows the train file)."""
    try:
        with open(path, newline="") as f:
            header, *body = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text CSV file (UTF-8)") from None
    except ValueError:
        raise ValueError(f"{path} is empty") from None
    if columns is None and label not in header:
        raise ValueError(f"{path} has no column {label!r} (columns: {', '.join(header)})")
    columns = columns or [h for h in header if h != label]
    for name in columns:
        if name not in header:
            raise ValueError(f"{path} has no column {name!r}, which the training file has")
    where = [header.index(n) for n in columns]
    X = np.empty((len(body), len(columns)))
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path} line {i + 2} has {len(row)} fields, the header {len(header)}")
        for j, col in enumerate(where):
            try:
                X[i, j] = float(row[col])
            except ValueError:
                raise ValueError(f"{path} line {i + 2}, column {header[col]!r}: {row[col]!r} "
                                 "is not a number") from None
    labels = np.array([r[header.index(label)] for r in body]) if label in header else None
    return columns, X, labels


def run_csv(args):
    names, X, y = read_table(args.train, args.label)
    _, X_test, y_test = read_table(args.test, args.label, names)
    clf = InContextClassifier(args.ckpt, device=args.device, seed=args.seed, members=args.members,
                              normalize=args.normalize)
    clf.fit(X, y)
    proba = clf.predict_proba(X_test)
    pred = clf.classes_[proba.argmax(1)]
    x_q = clf.standardize(check_matrix(X_test, width=X.shape[1]))
    others = {f"knn_k{args.k}": knn_predict(clf.x_ctx, clf.y_ctx, x_q, args.k),
              "logreg": logreg_predict(clf.x_ctx, clf.y_ctx, x_q)}
    others = {k: clf.classes_[v.cpu().numpy()] for k, v in others.items()}
    if y_test is not None:
        print(f"accuracy on {len(pred)} rows of {args.test}: GPICL {np.mean(pred == y_test):.3f} | "
              f"kNN (k={args.k}) {np.mean(others[f'knn_k{args.k}'] == y_test):.3f} | "
              f"logistic regression {np.mean(others['logreg'] == y_test):.3f}")
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prediction", *others, *(f"p_{c}" for c in clf.classes_)])
        for i in range(len(pred)):
            w.writerow([pred[i], *(v[i] for v in others.values()), *(f"{p:.4f}" for p in proba[i])])
    print(f"predictions -> {args.out}")


def get_parser():
    p = train.Parser(prog="metatest.py", description="Meta-test trained in-context learners.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("csv", help="classify the rows of a CSV from a labelled CSV")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--train", required=True, help="labelled context rows (CSV with a header)")
    c.add_argument("--test", required=True, help="rows to predict (labels optional)")
    c.add_argument("--label", required=True, help="name of the label column")
    c.add_argument("--out", default="preds.csv")
    c.add_argument("--k", type=int, default=1, help="neighbours of the kNN baseline")
    c.add_argument("--members", type=int, default=32, help="ensemble members")
    c.add_argument("--normalize", choices=["column", "global"], default="column")
    c.add_argument("--seed", type=int, default=0)
    u = sub.add_parser("uci", help="UCI digits: the learner vs kNN and logistic regression")
    u.add_argument("--ckpt", required=True)
    u.add_argument("--splits", type=int, default=50)
    u.add_argument("--context", type=int, default=99)
    u.add_argument("--queries", type=int, default=100)
    u.add_argument("--members", type=int, default=16)
    c = sub.add_parser("paired", help="the learner minus 1-NN, logistic regression and SGD, "
                                      "paired over unseen tasks of its base dataset")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--tasks", type=int, default=64, help="unseen tasks")
    c.add_argument("--seqs", type=int, default=16, help="sequences per task")
    c.add_argument("--out", help="also write the numbers as JSON here")
    t = sub.add_parser("table1", help="the paper's Table 1 for one or more checkpoints")
    t.add_argument("ckpts", nargs="+")
    t.add_argument("--tasks", type=int, default=32, help="unseen tasks per dataset")
    t.add_argument("--seqs", type=int, default=32, help="sequences per task")
    t.add_argument("--out-dir", default=".")
    return p


COUNT = (1, 2 ** 31 - 1)  # counts stop below 2**31, where torch's C ints overflow
RANGES = dict(threads=(1, 256), k=COUNT, members=COUNT, splits=COUNT, context=COUNT,
              queries=COUNT, tasks=COUNT, seqs=COUNT, seed=(0, 2 ** 63 - 1))  # seed: int64


def main(argv=None):
    with out_of_memory_in_one_line("metatest.py", "--members, --splits, --tasks or --seqs"):
        meta_test(argv)


def meta_test(argv):
    p = get_parser()
    args = p.parse_args(argv)
    check_ranges(p, args, RANGES)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_device(p, args.device)
    # every check before any work: the checkpoints (read safely), then where results go
    for path in getattr(args, "ckpts", None) or [args.ckpt]:
        try:
            gpicl.load_learner(path)
        except ValueError as e:  # missing, truncated, corrupted, refused, or not train.py's
            p.error(str(e))
    if args.command in ("csv", "paired") and args.out is not None:
        check_out_file(p, "--out", args.out)
    if args.command == "table1":
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path
            p.error(f"--out-dir {args.out_dir!r}: {getattr(e, 'strerror', None) or e}")
    if args.command == "uci" and (args.context < 2 or args.context + args.queries > 1797):
        p.error("--context must be >= 2 and --context + --queries <= 1797 (UCI digits' rows)")
    try:
        if args.command == "csv":
            run_csv(args)
        elif args.command == "uci":
            run_uci(args)
        elif args.command == "paired":
            run_paired(args)
        else:
            print(table1(args.ckpts, eval_tasks=args.tasks, eval_seqs=args.seqs, out_dir=args.out_dir,
                         device=args.device))
    except (OSError, ValueError) as e:
        p.error(str(e))


def compare_paired(checkpoint, tasks=64, seqs=16, device="cpu"):
    """The learner against every baseline on `tasks` unseen tasks x `seqs` sequences of its base
    dataset's test split, each baseline reading every sequence the learner reads, the learner
    minus it paired over tasks (gpicl.paired). Logistic regression's L2 is chosen on training
    tasks, as train.py chooses it. -> (gpicl.evaluate's summary of the set, the L2)"""
    model, ckpt = gpicl.load_learner(checkpoint, device)
    flags = ckpt["flags"]
    base = data.load_dataset(flags["dataset"], flags["image_size"], device)
    unseen = data.unseen_task_ids(tasks, device).repeat_interleave(seqs)
    l2 = gpicl.choose_l2(*base["train"], flags["seq_len"])
    sets = {"unseen": (*base["test"], unseen)}
    return gpicl.evaluate(model, sets, flags["seq_len"], baselines=gpicl.make_baselines(l2))[
        "unseen"], l2


def run_paired(args):
    r, l2 = compare_paired(args.ckpt, args.tasks, args.seqs, args.device)
    at = [p for p in gpicl.POSITIONS if p <= len(r["curve"])]
    print(f"{args.ckpt}: unseen tasks x sequences = {args.tasks} x {args.seqs}; accuracy at "
          f"examples {', '.join(map(str, at))}; the learner minus each baseline, paired over "
          f"tasks, 95% t interval")
    print(f"{'learner':<22}" + "".join(f"{r['curve'][p - 1]:>16.3f}" for p in at))
    for b, s in r["baselines"].items():
        print(f"{b:<22}" + "".join(f"{s['curve'][p - 1]:>16.3f}" for p in at))
        print(f"{'  learner - ' + b[:10]:<22}" + "".join(
            f"{s['diff'][p - 1]:>+9.3f} ± {s['diff_ci'][p - 1]:.3f}" for p in at))
    if args.out:
        from findings import source_commit  # (findings imports this file: import it late)
        record = dict(checkpoint=args.ckpt, tasks=args.tasks, seqs=args.seqs, l2=l2,
                      commit=source_commit(), command="python experiments/metatest.py paired "
                      f"--ckpt {args.ckpt} --tasks {args.tasks} --seqs {args.seqs}",
                      results=gpicl.compact({"unseen": r})["unseen"])
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


def run_uci(args):
    res = compare_on_uci_digits(args.ckpt, splits=args.splits, n_context=args.context,
                                n_queries=args.queries, members=args.members, device=args.device)
    print(f"UCI digits, {args.context} context rows, {args.queries} queries, {args.splits} splits")
    for name, (m, ci) in res.items():
        print(f"{name:<44} {m:.3f} ± {ci:.3f}")


# -----------------------------------------------------------------------------
# The checks every command line of this folder makes before any work: a bad value is one line
# on stderr and exit 2 (train.Parser.error), a fault at run time one line and exit 1

def check_ranges(parser, args, ranges):
    """What type=int or float cannot say: {flag's dest: (lowest, highest)}, both allowed."""
    for dest, (low, high) in ranges.items():
        v = getattr(args, dest, None)
        if v is not None and not low <= v <= high:  # NaN too: it compares False
            parser.error(f"--{dest.replace('_', '-')} {v} is not in [{low}, {high}]")


def check_device(parser, device):
    """A device name torch does not know or cannot use here."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        parser.error(f"--device {device!r}: {(str(e).splitlines() or ['unusable'])[0]}")


def check_out_file(parser, flag, path, make_folder=False):
    """A file that cannot be written: no name, a NUL in it, a folder, read-only, or in a folder
    that does not exist (make_folder: that cannot be made)."""
    existed = os.path.exists(path)
    try:
        if make_folder:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "a").close()  # append: nothing in it is lost
    except (OSError, ValueError) as e:
        parser.error(f"{flag} {path!r}: {getattr(e, 'strerror', None) or e}")
    if not existed:
        os.remove(path)


@contextmanager
def out_of_memory_in_one_line(prog, smaller):
    """An allocation that fails (CUDA's OutOfMemoryError, or a RuntimeError from torch's CPU
    allocator) is a fault at run time, not a bad flag: one line and exit 1."""
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
