"""
General-purpose in-context learning by meta-learning (paper section 2): the meta-learning logic.

A learner reads a sequence of examples from one task and predicts each label before it sees it:

    token t = [A x_t ; onehot(rho(y_{t-1}))],  zeros in place of the label at t = 0
    loss    = cross-entropy of the prediction at every position, averaged

"After meta-training, the learner is able to learn new tasks in-context, without any gradient
step": its accuracy on tasks it never saw rises along the sequence as it reads more examples.
`evaluate` measures exactly that, per position, on seen tasks, unseen tasks and unseen tasks of
other datasets, and `regime` names which of the paper's three regimes a learner is in.

Uses data.py (tasks, sequences) and models.py (learners); imported by train.py.
"""
import math
from contextlib import nullcontext

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
    """n_tasks ids from the training range [0, num_tasks), the same every time."""
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


def summarize(correct):
    """Accuracy curve, accuracy at the last position and the improvement within the sequence
    (last minus first), each with a 95% confidence interval over sequences."""
    c = correct.float()                                              # (N, T)
    n = len(c)
    curve = c.mean(0)                                                # (T,)
    last = curve[-1].item()
    gain = c[:, -1] - c[:, 0]                                        # (N,)
    return {"curve": [round(v, 4) for v in curve.tolist()],
            "first": curve[0].item(),
            "last": last, "last_ci": 1.96 * math.sqrt(max(last * (1 - last), 1e-12) / n),
            "improvement": gain.mean().item(),
            "improvement_ci": 1.96 * gain.std().item() / math.sqrt(n) if n > 1 else float("nan"),
            "n": n}


def evaluate(model, sets, seq_len, batch_size=256, ctx=None):
    """{name: summary} for every evaluation set; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    out = {name: summarize(accuracy_per_position(model, *s, seq_len, batch_size, ctx))
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

def load_learner(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a train.py checkpoint."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    m = ckpt["model_config"]
    model = models.build(m["kind"], m["n_in"], m["n_out"], **m["cfg"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
