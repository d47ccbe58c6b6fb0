"""
The lesson's tests, in the reading order: 1. tasks, 2. sequences, 3. tokens, 4. causality,
5. learners and their state sizes, 6. the loss and its optimizer, 7. evaluation, 8. in-context
learning; then 9. train.py's command line and what a run needs to lose nothing (resume, signals,
a non-finite loss, the time budget, torchrun). The folder's own tests are in experiments/.

    python -m pytest -q test_gpicl.py experiments                 # everything (CI)
    python -m pytest -q -m "not slow" test_gpicl.py experiments   # the quick set
"""
import argparse
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import data
import gpicl
import models
import train

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
TINY = ["--image-size", "7", "--seq-len", "10", "--batch-size", "8", "--model", "transformer",
        "--width", "16", "--n-layer", "1", "--n-head", "2", "--eval-tasks", "2", "--eval-seqs", "4",
        "--eval-datasets", "", "--threads", "1"]  # train.py at its smallest


def run_train(args, timeout=300, **kw):
    return subprocess.run([PY, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=timeout, **kw)


def kinds(*slow):
    """Every learner kind for a parametrized test, the named ones marked slow (> ~3 s here)."""
    return [pytest.param(k, marks=pytest.mark.slow) if k in slow else k for k in models.MODELS]


def small(kind, seq_len=12, n_x=6):
    given = dict(width=16, n_layer=2, n_head=2, key_size=4)
    sizes = models.learner_sizes(kind, n_x + 10, seq_len, **{k: v for k, v in given.items()
                                                          if k in models.MODELS[kind].defaults})
    torch.manual_seed(0)
    return models.build(kind, n_x + 10, 10, **sizes).eval()


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "log.jsonl")))
            if "loss" in r]


# -----------------------------------------------------------------------------
# 1. Tasks: a projection and a label permutation per task id (data.py)

# The generator, pinned: the reference below writes every constant out as a literal, none read
# from data.py, so a changed constant there (which would silently change every task, and the
# shipped checkpoint's) fails these tests; so does int64 arithmetic that did not wrap modulo
# 2^64 as splitmix64 needs (the reference computes modulo 2^64 in Python).

def splitmix64(key, i):
    """Word i of key: splitmix64's mixer applied to key + i * golden, in Python integers."""
    mask = 2 ** 64 - 1
    z = (key + i * 0x9E3779B97F4A7C15) & mask
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 1)):
        z = ((z ^ (z >> shift)) * mult) & mask
    return z


def key_of(*parts):
    """data.hash_key in Python integers: each part mixed into the key in turn."""
    key = 0x243F6A8885A308D3
    for part in parts:
        key = splitmix64(key ^ (part & (2 ** 64 - 1)), 0)
    return key


def test_random_normal_matches_a_plain_python_splitmix64():
    # the reference itself: splitmix64's published first outputs for seed 0, and two task words
    assert [splitmix64(0, i) for i in (1, 2, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                     0x06C45D188009454F]
    assert key_of(-3, 1) == 0x228E50AAC81EA53C and splitmix64(key_of(-3, 1), 1) == 0x3181F08352003986
    assert splitmix64(key_of(2 ** 40, 1), 100) == 0x9548D871F38EF1E9
    ids = [-3, 0, 2 ** 40]
    for n_x in (49, 196):                               # N_x^2 = 2401 is odd: no last sine
        A = data.task_projection(torch.tensor(ids), n_x).flatten(1) * math.sqrt(n_x)   # (3, N_x^2)
        n, half = n_x * n_x, (n_x * n_x + 1) // 2       # word i: the normals i and half + i
        for b, task in enumerate(ids):
            for i in (0, 1, 100, 1000, half - 1):
                w = splitmix64(key_of(task, 1), i)      # stream 1: projections
                u1, u2 = [((w >> s & 0xFFFFFF) + 0.5) * 2.0 ** -24 for s in (40, 8)]
                r = math.sqrt(-2 * math.log(u1))
                normals = [(i, r * math.cos(2 * math.pi * u2))]
                if half + i < n:
                    normals.append((half + i, r * math.sin(2 * math.pi * u2)))
                for j, v in normals:
                    assert abs(A[b, j].item() - v) < 1e-5 * max(1, abs(v)), (n_x, b, j)
    for task in (7, -1):                                # stream 2: the ranks of 10 words
        words = [splitmix64(key_of(task, 2), i) for i in range(10)]
        signed = [w - 2 ** 64 if w >= 2 ** 63 else w for w in words]    # torch sorts int64
        rho = sorted(range(10), key=lambda c: signed[c])
        assert data.task_permutation(torch.tensor([task]))[0].tolist() == rho


def test_sample_sequences_matches_a_plain_python_splitmix64():
    # which task (stream 4) and which examples (stream 3) each sequence gets, and the Random
    # dataset's images (stream 5), all from the literal reference above
    seed, step, n = 5, 9, 5
    x_all, y_all = torch.randn(n, 4), torch.arange(n)   # 5 < 2T: examples drawn with replacement
    x, y, ids = data.sample_sequences(x_all, y_all, seed, step, torch.arange(3), 3, data.FRESH)
    for s in range(3):
        task = splitmix64(key_of(seed, step, s, 4), 0) & (2 ** 62 - 1)
        assert ids[s].item() == task
        idx = [(splitmix64(key_of(seed, step, s, 3), t) & (2 ** 62 - 1)) % n for t in range(3)]
        rho = data.task_permutation(ids[s:s + 1])[0]
        assert y[s].tolist() == [rho[i].item() for i in idx], s
    pixels = data.RandomImages(2).images(torch.tensor([11]))[0].flatten()     # (10 * 2,)
    for i in (0, 7, 19):
        u = ((splitmix64(key_of(11, 5), i) >> 40 & 0xFFFFFF) + 0.5) * 2.0 ** -24
        assert abs(pixels[i].item() - (u - 0.5) * math.sqrt(12)) < 1e-6


def test_task_projection_entries_have_variance_one_over_n_x():
    for n_x in (49, 196):
        A = data.task_projection(torch.arange(64), n_x)                  # (64, N_x, N_x)
        assert A.shape == (64, n_x, n_x)
        var = A.var().item()
        # 64 * N_x^2 samples: the estimate is within 2% of the truth; std 1/N_x would give 1/N_x^2
        assert abs(var * n_x - 1) < 0.02, var
        assert abs(A.mean().item()) < 4 / math.sqrt(n_x) / math.sqrt(A.numel())   # 4 standard errors
        z = A.flatten() * math.sqrt(n_x)                                 # standard normal?
        assert abs((z ** 4).mean().item() - 3) < 0.1                     # Gaussian kurtosis
        assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.005


def test_task_projection_is_dense_and_keeps_norms():
    n_x = 196
    A = data.task_projection(torch.tensor([7]), n_x)[0]
    assert (A != 0).all() and A.abs().std() > 0                         # dense, not a diagonal scaling
    x = torch.randn(1000, n_x)
    ratio = (x @ A.T).norm(dim=1) / x.norm(dim=1)
    assert abs(ratio.mean().item() - 1) < 0.1                           # |Ax| ~ |x|


def test_apply_tasks_same_id_same_task_different_ids_differ():
    ids = torch.tensor([0, 1, 2, -1, -2, 2 ** 40, 123456789])
    A1, A2 = data.task_projection(ids, 49), data.task_projection(ids.clone(), 49)
    P1, P2 = data.task_permutation(ids), data.task_permutation(ids.clone())
    assert torch.equal(A1, A2) and torch.equal(P1, P2)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert not torch.allclose(A1[i], A1[j])
    assert len({tuple(p.tolist()) for p in P1}) == len(ids)


def test_apply_tasks_does_not_depend_on_batch_layout():
    ids = torch.tensor([5, -3, 17, 2 ** 33, 0, 99, 5])
    full = data.task_projection(ids, 196)
    parts = torch.cat([data.task_projection(ids[i:i + 3], 196) for i in range(0, len(ids), 3)])
    rev = data.task_projection(ids.flip(0), 196).flip(0)
    assert torch.equal(full, parts) and torch.equal(full, rev)
    assert torch.equal(full[0], full[-1])                                # the same id twice
    assert torch.equal(data.task_permutation(ids), data.task_permutation(ids.flip(0)).flip(0))


def test_task_permutation_relabels_whole_classes_per_task():
    ids = torch.arange(2000)
    P = data.task_permutation(ids)                                       # (2000, 10)
    assert torch.equal(P.sort(1).values, torch.arange(10).expand(2000, 10))  # permutations
    # every class goes to every label about equally often: no fixed or shared permutation
    counts = torch.zeros(10, 10)
    counts.index_put_((torch.arange(10).repeat(2000), P.flatten()), torch.ones(20000), accumulate=True)
    # ~4.3 sigma of Binomial(2000, .1)
    assert (counts - 200).abs().max() < 60
    # relabelling is by class: examples of one class get one label, which is rho(class)
    y = torch.tensor([[3, 3, 1, 3, 1, 0]] * 2)
    x = torch.zeros(2, 6, 4)
    _, y_task = data.apply_tasks(x, y, torch.tensor([11, 12]))
    for b, task in enumerate((11, 12)):
        rho = data.task_permutation(torch.tensor([task]))[0]
        assert torch.equal(y_task[b], rho[y[b]])


def test_sample_sequences_never_draws_unseen_ids_and_respects_num_tasks():
    x_all, y_all = torch.randn(50, 4), torch.randint(0, 10, (50,))
    unseen = set(data.unseen_task_ids(64).tolist())
    for num_tasks in (1, 16, 1000, data.FRESH):
        drawn = torch.cat([data.sample_sequences(x_all, y_all, 0, step, torch.arange(64), 5,
                                                 num_tasks)[2] for step in range(50)])
        assert drawn.min() >= 0 and not (set(drawn.tolist()) & unseen)
        assert drawn.max() < num_tasks
        if num_tasks <= 16:
            assert len(set(drawn.tolist())) == num_tasks                # uniform: all get drawn
    # fresh: ids from all 62 bits, so 3,200 sequences are 3,200 tasks (half of them above 2^61)
    assert len(set(drawn.tolist())) == len(drawn) and (drawn >= 2 ** 61).sum() > 1400
    assert train.num_tasks("fresh") == data.FRESH == train.num_tasks("2**62") == train.num_tasks("2^62")
    assert max(unseen) < 0


def test_identity_task_is_the_base_dataset_as_it_is():
    x, y = torch.randn(3, 5, 4), torch.randint(0, 10, (3, 5))
    ids = torch.tensor([data.IDENTITY_TASK, 7, data.IDENTITY_TASK])
    x_t, y_t = data.apply_tasks(x, y, ids)
    assert torch.equal(x_t[0], x[0]) and torch.equal(y_t[2], y[2])
    assert not torch.allclose(x_t[1], x[1])


def test_random_images_are_new_for_every_task():
    x_all, y_all = data.load_dataset("random", 7)["train"]
    imgs = x_all.images(torch.tensor([3, 3, 4]))                          # (3, 10, 49)
    assert imgs.shape == (3, 10, 49) and torch.equal(imgs[0], imgs[1])
    assert not torch.allclose(imgs[0], imgs[2])
    assert abs(imgs.mean().item()) < 0.2 and abs(imgs.std().item() - 1) < 0.1  # z-normalised
    x, y, ids = data.sample_sequences(x_all, y_all, 0, 0, torch.arange(4), 30, data.FRESH)
    assert x.shape == (4, 30, 49) and len(torch.unique(x[0], dim=0)) <= 10



# -----------------------------------------------------------------------------
# 2. Sequences: the meta-batch's task slots, the bias, the examples (data.py)

def test_sample_sequences_bias_labels_a_task_id_with_the_identity_in_every_batch_or_in_none():
    # 8 task ids, slots of 2, 30 steps: each id comes back many times; the bias is a property of
    # the id (the authors' per-id draw), never of the slot or the step
    x_all, y_all = torch.randn(500, 6), torch.randint(0, 10, (500,))
    kept = {}
    for step in range(30):
        args = (x_all, y_all, 0, step, torch.arange(40), 12, 8)
        x0, y0, ids0 = data.sample_sequences(*args, seqs_per_task=2)
        x1, y1, ids1 = data.sample_sequences(*args, bias=0.5, seqs_per_task=2)
        assert torch.equal(x0, x1) and torch.equal(ids0, ids1)           # projections stay random
        unpermuted = data.task_permutation(ids0).argsort(-1).gather(1, y0)  # rho^-1(y)
        for i, task in enumerate(ids1.tolist()):
            identity = torch.equal(y1[i], unpermuted[i])
            assert identity or torch.equal(y1[i], y0[i])                  # one of the two maps
            assert kept.setdefault(task, identity) == identity, task     # the same every time
    assert set(kept) == set(range(8)) and 0 < sum(kept.values()) < 8     # both kinds occur


def test_keeps_identity_labels_for_a_fraction_f_of_task_ids():
    ids = torch.arange(20_000)
    for f in (0.1, 0.5, 0.9):
        share = data.keeps_identity_labels(ids, f).float().mean().item()
        assert abs(share - f) < 0.015, (f, share)                        # binomial sd <= 0.0035
    assert not data.keeps_identity_labels(ids, 0.0).any()


def test_get_batch_bias_steps_end_the_bias_at_that_step():
    x_all, y_all = torch.randn(300, 5), torch.randint(0, 10, (300,))
    base = dict(lookup_steps=0, seed=0, seq_len=10, num_tasks=data.FRESH, batch_size=64,
                seqs_per_task=1, bias=0.9)
    splits = dict(train=(x_all, y_all), lookup=None)
    idx = torch.arange(64)
    with_bias = train.get_batch(argparse.Namespace(**base, bias_steps=0), splits, step=7, seq_index=idx)
    limited = lambda step: train.get_batch(argparse.Namespace(**base, bias_steps=5), splits,
                                           step=step, seq_index=idx)
    unbiased = train.get_batch(argparse.Namespace(**dict(base, bias=0.0), bias_steps=0), splits,
                               step=7, seq_index=idx)
    assert torch.equal(limited(7)[1], unbiased[1]) and not torch.equal(with_bias[1], unbiased[1])
    early = train.get_batch(argparse.Namespace(**base, bias_steps=0), splits, step=4, seq_index=idx)
    assert torch.equal(limited(4)[1], early[1])


def test_sample_sequences_of_one_slot_share_a_task_and_slots_differ():
    x_all, y_all = torch.randn(500, 6), torch.randint(0, 10, (500,))
    x, y, ids = data.sample_sequences(x_all, y_all, 1, 2, torch.arange(32), 20, data.FRESH,
                                      seqs_per_task=8)
    assert torch.equal(ids, ids[::8].repeat_interleave(8)) and len(set(ids.tolist())) == 4
    assert not torch.equal(x[0], x[1])                     # the same task, other examples


def test_draw_examples_never_repeats_within_a_sequence():
    x_all, y_all = torch.randn(1000, 8), torch.randint(0, 10, (1000,))
    for step in range(5):
        x = data.sample_sequences(x_all, y_all, 0, step, torch.arange(64), 100, data.FRESH)[0]
        for seq in x:                                      # a repeated example, a repeated row
            assert len(torch.unique(seq, dim=0)) == 100
    idx = data.draw_examples(data.hash_key(torch.arange(256)), 100, 60000)
    assert all(len(set(row)) == 100 for row in idx.tolist()) and idx.max() < 60000


def test_sample_sequences_does_not_depend_on_how_the_batch_is_split():
    d = {"x": torch.randn(100, 9), "y": torch.randint(0, 10, (100,))}
    whole = data.sample_sequences(d["x"], d["y"], 3, 7, torch.arange(8), 12, 2 ** 10)
    halves = [data.sample_sequences(d["x"], d["y"], 3, 7, torch.arange(4) + k, 12, 2 ** 10)
              for k in (0, 4)]
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    other_step = data.sample_sequences(d["x"], d["y"], 3, 8, torch.arange(8), 12, 2 ** 10)
    assert not torch.equal(whole[1], other_step[1])


def test_load_dataset_z_normalises_with_training_statistics():
    d = data.load_dataset("mnist", 14)
    x_train, y_train = d["train"]
    assert x_train.shape == (60000, 196) and d["test"][0].shape == (10000, 196)
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4
    assert abs(d["test"][0].mean().item()) < 0.05                      # test uses train stats
    assert torch.equal(torch.bincount(y_train), torch.tensor(
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]))
    uci = data.load_dataset("uci_digits", 7)["test"]
    assert uci[0].shape == (1797, 49)
    rnd = data.load_dataset("random", 7)["test"]
    assert len(rnd[0]) == 10 and rnd[0].n_x == 49 and torch.equal(rnd[1], torch.arange(10))



# -----------------------------------------------------------------------------
# 3. Tokens: [A x_t ; onehot(y_{t-1})] (data.make_tokens)

def test_make_tokens_carry_the_previous_label_and_zeros_first():
    x = torch.randn(2, 5, 3)
    y = torch.tensor([[4, 1, 9, 0, 2], [0, 0, 3, 3, 7]])
    tok = data.make_tokens(x, y)
    assert tok.shape == (2, 5, 13)
    assert torch.equal(tok[..., :3], x)
    assert (tok[:, 0, 3:] == 0).all()
    for t in range(1, 5):
        assert torch.equal(tok[:, t, 3:].argmax(-1), y[:, t - 1])
        assert torch.equal(tok[:, t, 3:].sum(-1), torch.ones(2))



# -----------------------------------------------------------------------------
# 4. Causality: the output at t depends on tokens 0..t only (models.py)

@pytest.mark.parametrize("kind", kinds("lstm", "fwm", "vsml"))  # recurrences step by step
def test_every_learner_is_causal_no_position_sees_its_own_label_or_the_future(kind):
    T, n_x = 12, 6
    model = small(kind, T, n_x)
    x, y = torch.randn(3, T, n_x), torch.randint(0, 10, (3, T))
    with torch.no_grad():
        base = model(data.make_tokens(x, y))
        for t in range(T):
            x2, y2 = x.clone(), y.clone()
            y2[:, t] = (y2[:, t] + 1) % 10                              # its own label
            x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])             # everything after t
            y2[:, t + 1:] = torch.randint(0, 10, y2[:, t + 1:].shape)
            out = model(data.make_tokens(x2, y2))
            assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5), (kind, t)
            if t + 1 < T:                                               # and the future does matter
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_transformer_of_width_1_to_3_builds_and_stays_causal(width):
    T = 8
    sizes = models.learner_sizes("transformer", 16, T, width=width, n_layer=2)
    torch.manual_seed(0)
    model = models.build("transformer", 16, 10, **sizes).eval()
    tokens = torch.randn(4, T, 16)
    later = tokens.clone()
    later[:, 5:] = torch.randn(4, T - 5, 16)
    with torch.no_grad():
        out, out_later = model(tokens), model(later)
    assert out.shape == (4, T, 10)
    assert torch.equal(out[:, :5], out_later[:, :5])                    # the past ignores the future
    if width >= 2:  # (at width 1 LayerNorm maps every vector to its bias: blind by design)
        assert not torch.allclose(out[:, 5:], out_later[:, 5:])         # and the future matters



# -----------------------------------------------------------------------------
# 5. Learners and their state sizes (models.py)

def state_read_while_running(model, tokens, monkeypatch):
    """Floats the learner reads back from its past while it runs on tokens, per sequence, counted
    from the tensors its computation really takes, not from what its class declares: the keys
    and values every attention call reads (the KV cache), nn.LSTM's final h and c, the state an
    outer-product cell is handed at its last step, the weights and Adam moments of the sgd
    learner's last inner step."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def attention(q, k, v, **kw):
        seen.append(k.numel() + v.numel())
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(models.F, "scaled_dot_product_attention", attention)
    adam_step = models.adam_step

    def inner_step(w, g, m, v, t, lr):
        seen[:] = [sum(p.numel() for p in (*w, *m, *v))]                 # the last step's
        return adam_step(w, g, m, v, t, lr)
    monkeypatch.setattr(models, "adam_step", inner_step)
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.LSTM):
            hooks.append(module.register_forward_hook(
                lambda m, i, out: seen.append(sum(s.numel() for s in out[1]))))
        if isinstance(module, models.OuterLSTMCell):
            hooks.append(module.register_forward_pre_hook(
                lambda m, i: seen.__setitem__(slice(None), [sum(s.numel() for s in i[1])])))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return sum(seen) // len(tokens)


@pytest.mark.parametrize("kind", ["transformer", "lstm", "outer_lstm", "sgd", "mlp"])
def test_state_size_is_what_the_learner_reads_back_while_it_runs(kind, monkeypatch):
    T = 12
    model = small(kind, T)
    assert state_read_while_running(model, torch.randn(2, T, 16), monkeypatch) == model.state_size(T)


@pytest.mark.parametrize("kind", kinds("vsml", "maml"))
def test_state_size_is_the_floats_every_learner_carries_from_step_to_step(kind):
    # carried_state: the very tensors run() carries to the next step (the KV cache, h and c, the
    # fast weights, the inner loop's weights and moments), counted per sequence
    T, B = 12, 3
    model = small(kind, T)
    carried = model.carried_state(torch.randn(B, T, 16))
    assert all(t.shape[0] == B or t.shape[1] == B for t in carried)      # one state per sequence
    assert sum(t.numel() for t in carried) == B * model.state_size(T)
    if kind == "mlp":
        assert carried == [] and model.state_size(T) == 0                # it carries nothing


def test_transformer_state_is_the_kv_cache_attention_reads_whatever_the_width(monkeypatch):
    T, n_in = 20, 26
    for width in (2, 16, 64):
        sizes = models.learner_sizes("transformer", n_in, T, width=width, n_layer=2, n_head=3,
                                     key_size=5)
        model = models.build("transformer", n_in, 10, **sizes).eval()
        read = state_read_while_running(model, torch.randn(2, T, n_in), monkeypatch)
        assert read == model.state_size(T) == 2 * 2 * T * 3 * 5   # keys and values: not the width


def test_a_window_of_w_tokens_keeps_w_keys_and_values_and_every_parameter():
    # --window W: position t attends to t-W+1..t, so one layer's output at t cannot see token
    # t-W, and the cache (the state) holds W positions; the weights are the same at every W
    T, n_in = 12, 16
    sizes = lambda w: models.learner_sizes("transformer", n_in, T, width=16, n_layer=1, n_head=2,
                                           key_size=4, window=w)
    torch.manual_seed(0)
    full = models.build("transformer", n_in, 10, **sizes(None)).eval()
    x = torch.randn(2, T, n_in)
    for w in (1, 3, T):
        model = models.build("transformer", n_in, 10, **sizes(w)).eval()
        model.load_state_dict(full.state_dict())                     # the same parameters
        moved = x.clone()
        moved[:, 4] += 1.0
        changed = (model(moved) - model(x)).abs().sum(-1).amax(0) > 0    # (T,)
        assert changed.tolist() == [4 <= t < 4 + w for t in range(T)], w
        assert model.state_size(T) == 2 * 1 * w * 2 * 4
        assert sum(t.numel() for t in model.carried_state(x)) == 2 * model.state_size(T)
    assert torch.equal(model(x), full(x))                            # W = T: plain attention


def test_learner_sizes_solves_for_a_state_size_or_names_the_nearest():
    assert models.learner_sizes("lstm", 206, 100, state_size=1024)["width"] == 512
    sizes = models.learner_sizes("transformer", 206, 100, n_layer=4, n_head=8, state_size=204800)
    assert sizes["key_size"] == 32 and sizes["width"] == 512                 # the width stays
    sizes = models.learner_sizes("transformer", 206, 100, width=64, n_head=4, state_size=12800)
    assert sizes["key_size"] == 4 and sizes["width"] == 64
    with pytest.raises(ValueError, match="nearest reachable state sizes are 6400 or 12800"):
        models.learner_sizes("transformer", 206, 100, n_layer=4, n_head=8, state_size=10000)
    with pytest.raises(ValueError, match="1022 or 1024"):
        models.learner_sizes("lstm", 206, 100, state_size=1023)


@pytest.mark.parametrize("kind, sizes, match", [
    ("lstm", dict(n_head=8), "n_head does not apply"),
    ("lstm", dict(key_size=8), "key_size does not apply"),
    ("fwm", dict(n_layer=2), "n_layer does not apply"),
    ("mlp", dict(n_head=2), "n_head does not apply"),
    ("outer_lstm", dict(n_layer=2), "n_layer does not apply"),
    ("sgd", dict(n_layer=3), "n_layer does not apply"),
    ("lstm", dict(width=64, state_size=1024), "width or state_size, not both"),
    ("transformer", dict(key_size=8, state_size=204800), "key_size or state_size, not both"),
])
def test_learner_sizes_rejects_what_a_learner_would_ignore(kind, sizes, match):
    with pytest.raises(ValueError, match=match) as e:
        models.learner_sizes(kind, 26, 100, **sizes)
    assert "\n" not in str(e.value)


def test_haiku_lstm_init_starts_the_gates_as_haikus():
    for lstm in (small("lstm").lstm, small("fwm").lstm, small("vsml").cell):
        h = lstm.hidden_size
        for name, p in lstm.named_parameters():
            if name.startswith("bias_ih"):                              # i, f, g, o
                assert torch.equal(p[h:2 * h], torch.ones(h)), name
                assert torch.equal(p[:h], torch.zeros(h)) and torch.equal(p[2 * h:], torch.zeros(2 * h))
            elif name.startswith("bias_hh"):
                assert torch.equal(p, torch.zeros_like(p)), name
                assert not p.requires_grad, name                        # one bias per gate
            elif name.startswith("weight_ih"):                          # fan-in: [x, h]
                w = torch.cat([p, getattr(lstm, name.replace("ih", "hh"))], 1)
                std = w.shape[1] ** -0.5             # hk.Linear: TruncatedNormal(1 / sqrt(fan_in))
                assert w.abs().max() <= 2 * std + 1e-7                 # cut at 2 sigma
                assert w.abs().max() > 1.8 * std                        # and not narrower
                assert abs(w.std().item() / (0.87962566 * std) - 1) < 0.1, (name, w.std().item())
    lin = small("lstm").encoder[0]                                      # the encoder too
    assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert lin.weight.abs().max() <= 2 * lin.in_features ** -0.5 + 1e-7


def test_haiku_lstm_init_gate_bias_moves_as_one_bias_under_adam():
    # Haiku has one bias per gate; torch's bias_ih + bias_hh would take two Adam steps of ~lr
    torch.manual_seed(0)
    model = small("lstm")
    lstm = model.lstm
    before = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().clone()
    opt = models.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01, eps_root=0.0)
    x, y = torch.randn(4, 6, 6), torch.randint(0, 10, (4, 6))
    F.cross_entropy(model(data.make_tokens(x, y)).flatten(0, 1), y.flatten()).backward()
    opt.step()
    moved = ((lstm.bias_ih_l0 + lstm.bias_hh_l0).detach() - before).abs()
    assert moved.max() <= 0.01 * (1 + 1e-4) and moved.max() > 0.005    # Adam's first step: ~lr


def test_sgd_learner_does_not_depend_on_the_batch_layout():
    model = models.build("sgd", 26, 10, **models.learner_sizes("sgd", 26, 10)).eval()
    tokens = torch.randn(8, 10, 26)
    whole = model(tokens)                                                # (8, 10, 10)
    assert torch.equal(whole[:1], model(tokens[:1])) and torch.equal(whole[3:5], model(tokens[3:5]))


def test_sgd_learner_gives_each_sequence_its_own_init_from_its_content():
    model = models.build("sgd", 26, 10, **models.learner_sizes("sgd", 26, 10)).eval()
    tokens = torch.randn(3, 10, 26)
    tokens[1] = tokens[0]                                                # same content, twice
    w0, _, w2, _ = model.initial_weights(tokens)                         # (3, 16, 128), (3, 128, 10)
    assert torch.equal(w0[0], w0[1]) and torch.equal(w2[0], w2[1])
    assert not torch.allclose(w0[0], w0[2]) and not torch.allclose(w2[0], w2[2])
    again = model.initial_weights(tokens.clone())[0]                     # deterministic
    assert torch.equal(again, w0)
    std = 16 ** -0.5                                                     # hk.Linear's: 1/sqrt(fan_in)
    assert w0.abs().max() <= 2 * std + 1e-7 and abs(w0.std().item() / (0.87962566 * std) - 1) < 0.1
    maml = models.build("maml", 26, 10, **models.learner_sizes("maml", 26, 10))
    w = maml.initial_weights(tokens)[0]                                  # one meta-learned init
    assert torch.equal(w[0], w[2])



# -----------------------------------------------------------------------------
# 6. The loss (train.py), and its optimizer: the authors' Adam (models.Adam)

def test_train_minimises_the_cross_entropy_at_every_position_of_the_meta_batch(tmp_path):
    argv = [*TINY, "--steps", "1", "--log-every", "1", "--eval-every", "1000", "--baselines", "off",
            "--out-dir", str(tmp_path / "r")]
    train.main(argv)
    logged = next(r["loss"] for r in map(json.loads, open(tmp_path / "r" / "log.jsonl")) if "loss" in r)
    # by hand: the same learner at its init, on step 0's meta-batch, -log p(y_t) averaged over t
    args = train.get_parser().parse_args(argv)
    train.apply_preset(args)
    splits = dict(train=data.load_dataset("mnist", args.image_size)["train"])
    tokens, y = train.get_batch(args, splits, step=0, seq_index=torch.arange(args.batch_size))
    n_in = tokens.shape[-1]
    torch.manual_seed(args.seed)
    model = models.build("transformer", n_in, 10, **models.learner_sizes(
        "transformer", n_in, args.seq_len, width=16, n_layer=1, n_head=2, key_size=32))
    with torch.no_grad():
        logp = model(tokens).log_softmax(-1)                                # (B, T, 10)
    by_hand = -logp.gather(-1, y[..., None]).mean().item()             # every position counts
    assert logged == pytest.approx(by_hand, rel=1e-5)


def test_adam_matches_optax_formula_with_eps_root():
    # two steps by hand: update = lr * m_hat / (sqrt(v_hat + eps_root) + eps)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3e-5]))
    grads = [torch.tensor([0.5, -1e-4, 2e-6]), torch.tensor([0.1, 3e-4, -1e-6])]
    opt = models.Adam([p], lr=0.1, eps=1e-8, eps_root=1e-8)
    want, m, v = p.detach().double().clone(), 0, 0
    for t, g in enumerate(grads, 1):
        p.grad = g.clone()
        opt.step()
        g = g.double()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        want -= 0.1 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t) + 1e-8).sqrt() + 1e-8)
        assert torch.allclose(p.detach().double(), want, rtol=1e-6, atol=1e-9)
    # eps_root damps a tiny gradient: its step is far below lr, where torch's Adam steps ~lr
    q, r = (torch.nn.Parameter(torch.tensor([0.0])) for _ in range(2))
    ours, ref = models.Adam([q], lr=0.1), torch.optim.Adam([r], lr=0.1, eps=1e-8)
    q.grad, r.grad = torch.tensor([2e-6]), torch.tensor([2e-6])
    ours.step(), ref.step()
    assert abs(q.item()) < 0.01 and abs(r.item()) > 0.09



def test_lr_at_wsd_schedule_holds_the_rate_then_cools_down_linearly_to_a_tenth():
    args = argparse.Namespace(lr=1e-3, warmup=0, schedule="wsd", steps=400)
    lr = [train.lr_at(s, args) for s in range(400)]
    assert lr[0] == lr[299] == 1e-3                                     # the first three quarters
    assert lr[350] == pytest.approx(1e-3 * (1 - 0.9 * 0.5))             # half-way down
    assert all(a > b for a, b in zip(lr[300:], lr[301:]))               # falling, to
    assert lr[-1] == pytest.approx(1e-4, rel=0.1)                       # 10% at the end


# -----------------------------------------------------------------------------
# 7. Evaluation: learning curves, intervals over tasks, regimes, baselines (gpicl.py)

def test_summarize_gives_the_curve_first_last_and_improvement():
    correct = torch.zeros(400, 5, dtype=torch.bool)
    correct[:100, 0] = True                                             # 25% at the start
    correct[:300, -1] = True                                            # 75% at the end
    s = gpicl.summarize(correct)
    assert s["first"] == 0.25 and s["last"] == 0.75
    assert abs(s["improvement"] - 0.5) < 1e-6
    last = correct[:, -1].float()
    assert abs(s["last_ci"] - gpicl.t95(399) * last.std().item() / math.sqrt(400)) < 1e-6
    assert 0 < s["improvement_ci"] < 0.1


def test_seen_task_ids_and_summarize_with_one_training_task():
    # with num_tasks 1 the seen set is that task; the interval is over its sequences (no NaN),
    # so "task memorisation" can be recognised
    ids = gpicl.seen_task_ids(32, 1, "cpu")
    assert ids.tolist() == [0] * 32
    assert gpicl.seen_task_ids(6, 4, "cpu").tolist() == [0, 1, 2, 3, 0, 1]      # every task
    correct = torch.zeros(64, 10, dtype=torch.bool)
    correct[:48, -1] = True                                                # 0.75 at the end
    s = gpicl.summarize(correct, torch.zeros(64, dtype=torch.long))
    assert s["tasks"] == 1 and math.isfinite(s["last_ci"]) and 0 < s["last_ci"] < 0.15
    res = {"seen mnist": s, "unseen mnist": gpicl.summarize(correct[:, :1].repeat(1, 10))}
    assert gpicl.regime(res) == "task memorisation"


def test_eval_sets_seen_tasks_keep_the_label_maps_training_gave_them():
    # under the bias an id trained with identity labels is evaluated with them: the label of an
    # example under seen task k is the one meta-training gave that example under task k
    x_all, y_all = torch.randn(300, 6), torch.arange(10).repeat(30)
    sets = gpicl.eval_sets(("d", {"test": (x_all, y_all)}), {}, num_tasks=16, eval_tasks=16,
                           eval_seqs=2, device="cpu", bias=0.5)
    _, _, ids, kept = sets["seen d"]
    assert torch.equal(kept, data.keeps_identity_labels(ids, 0.5)) and 0 < kept.sum() < len(kept)
    assert len(sets["unseen d"]) == 3                                     # unseen tasks permute
    x, y, task_ids = data.sample_sequences(x_all, y_all, seed=0, step=3, seq_index=torch.arange(64),
                                           seq_len=20, num_tasks=16, bias=0.5)
    trained = {(k, tuple(r.tolist())): l for xs, ys, k in zip(x, y, task_ids.tolist())
               for r, l in zip(xs.round(decimals=4), ys.tolist())}
    batches = gpicl.eval_batches(*sets["seen d"][:3], seq_len=20, identity_labels=kept)
    matches = [trained[k, r] == l
               for si, xe, ye in batches for xs, ys, k in zip(xe, ye, ids[si].tolist())
               for r, l in zip(map(tuple, xs.round(decimals=4).tolist()), ys.tolist())
               if (k, r) in trained]
    assert len(matches) > 50 and all(matches)


def test_summarize_takes_intervals_over_tasks_not_sequences():
    # 4 tasks x 100 sequences: two tasks always right at the end, two never. Over 400
    # "independent" sequences the interval would be +-0.05; over 4 tasks it is +-0.57.
    correct = torch.zeros(400, 5, dtype=torch.bool)
    correct[:200, -1] = True
    task_ids = torch.arange(4).repeat_interleave(100) * 7 - 3             # any ids, grouped
    s = gpicl.summarize(correct, task_ids)
    assert s["last"] == 0.5 and s["tasks"] == 4 and s["n"] == 400
    assert abs(s["last_ci"] - 3.182 * torch.tensor([1.0, 1, 0, 0]).std().item() / 2) < 1e-6
    assert abs(s["improvement_ci"] - s["last_ci"]) < 1e-6                 # first is all wrong


def test_regime_follows_seen_and_unseen_improvement():
    r = lambda imp: {"improvement": imp, "improvement_ci": 0.02}
    assert gpicl.regime({"seen mnist": r(0.0), "unseen mnist": r(0.0)}) == "instance memorisation"
    assert gpicl.regime({"seen mnist": r(0.5), "unseen mnist": r(0.01)}) == "task memorisation"
    assert gpicl.regime({"seen mnist": r(0.5), "unseen mnist": r(0.5)}) == "learning-to-learn"


# Baselines scored on the learner's own evaluation sequences (gpicl.evaluate)

class RecordingLearner(torch.nn.Module):
    """A learner that keeps every token batch it reads and always predicts label 0."""

    def __init__(self):
        super().__init__()
        self.tokens = []

    def forward(self, tokens):                                          # (B, T, N_x + 10)
        self.tokens.append(tokens.clone())
        return F.one_hot(torch.zeros(tokens.shape[:2], dtype=torch.long), 10).float()


def recording(predict, seen):
    def baseline(x, y):
        seen.append((x.clone(), y.clone()))
        return predict(x, y)
    return baseline


def test_evaluate_gives_the_baselines_the_very_sequences_the_learner_reads():
    torch.manual_seed(0)
    x_all, y_all = torch.randn(40, 4), torch.randint(0, 10, (40,))
    task_ids = data.unseen_task_ids(3).repeat_interleave(4)             # 3 tasks x 4 sequences
    T, nn_in, sgd_in, learner = 6, [], [], RecordingLearner()
    baselines = {"1-NN": recording(gpicl.nearest_neighbour, nn_in),
                 "SGD": recording(gpicl.gradient_descent, sgd_in)}
    r = gpicl.evaluate(learner, {"s": (x_all, y_all, task_ids)}, T, batch_size=5,
                       baselines=baselines)["s"]
    x, y = data.task_sequences(x_all, y_all, task_ids, T, torch.arange(12), gpicl.EVAL_SEED)
    tokens = torch.cat(learner.tokens)                                  # what the learner read
    assert torch.equal(tokens, data.make_tokens(x, y))
    for seen in (nn_in, sgd_in):                                        # every sequence, each
        assert len(seen) == 3 and torch.equal(torch.cat([a for a, _ in seen]), x)   # batch
        assert torch.equal(torch.cat([b for _, b in seen]), y)
    assert r["curve"] == gpicl.summarize(y == 0, task_ids)["curve"]     # the learner's own score
    nn = gpicl.nearest_neighbour(x, y) == y
    assert r["baselines"]["1-NN"] == dict(gpicl.summarize(nn, task_ids),
                                          **gpicl.paired(y == 0, nn, task_ids))
    assert r["baselines"]["SGD"]["n"] == 12 and r["baselines"]["SGD"]["tasks"] == 3
    default = gpicl.evaluate(learner, {"s": (x_all, y_all, task_ids)}, T, batch_size=5,
                             baselines=gpicl.BASELINES)["s"]
    assert list(default["baselines"]) == ["1-NN", "logistic regression", "SGD"]
    assert default["baselines"]["1-NN"] == r["baselines"]["1-NN"]
    assert "baselines" not in gpicl.evaluate(learner, {"s": (x_all, y_all, task_ids)}, T)["s"]


def test_paired_difference_is_over_tasks_with_a_t_interval():
    # 4 tasks x 3 sequences, 2 positions; the learner beats the baseline by 1/3, 2/3, 0, 1/3 of
    # a task's sequences at position 1, and ties everywhere at position 0
    task_ids = torch.arange(4).repeat_interleave(3)
    learner = torch.zeros(12, 2, dtype=torch.bool)
    learner[[0, 3, 4, 9], 1] = True
    baseline = torch.zeros(12, 2, dtype=torch.bool)
    d = gpicl.paired(learner, baseline, task_ids)
    per_task = torch.tensor([1, 2, 0, 1]) / 3
    assert d["diff"] == [0.0, round(per_task.mean().item(), 4)]
    assert d["diff_ci"][1] == round(3.182 * per_task.std().item() / 2, 4)   # t with 3 df
    assert d["diff_ci"][0] == 0.0
    assert gpicl.t95(15) == pytest.approx(2.1314, abs=1e-3)             # 16 tasks, not 1.96
    assert gpicl.t95(10 ** 6) == pytest.approx(1.96, abs=1e-3)


def test_evaluator_pairs_every_learner_with_the_baselines_scored_once():
    torch.manual_seed(0)
    sets = {"s": (torch.randn(40, 4), torch.randint(0, 10, (40,)),
                  data.unseen_task_ids(3).repeat_interleave(4))}
    calls = []
    baselines = {"1-NN": recording(gpicl.nearest_neighbour, calls)}
    learner = RecordingLearner()
    evaluator = gpicl.Evaluator(learner, sets, 6, baselines)
    first = evaluator()["s"]["baselines"]["1-NN"]
    learner.forward = lambda tokens: F.one_hot(torch.ones(tokens.shape[:2], dtype=torch.long),
                                               10).float()     # the learner changes: label 1
    second = evaluator()["s"]["baselines"]["1-NN"]
    assert len(calls) == 1                                              # scored once
    assert second["curve"] == first["curve"] and second["diff"] != first["diff"]
    x, y = data.task_sequences(*sets["s"][:2], sets["s"][2], 6, torch.arange(12), gpicl.EVAL_SEED)
    assert second == dict(gpicl.summarize(gpicl.nearest_neighbour(x, y) == y, sets["s"][2]),
                          **gpicl.paired(y == 1, gpicl.nearest_neighbour(x, y) == y, sets["s"][2]))


def test_nearest_neighbour_predicts_the_label_of_the_nearest_earlier_example():
    # 2-D points, worked by hand. Sequence 0: position 2 is as far from 0 as from 1 (a tie:
    # the earliest wins); position 3 repeats position 1; position 4 is nearest to position 2.
    x = torch.tensor([[[0., 0], [4, 0], [2, 0], [4, 0], [2, 1]],
                      [[0., 0], [0, 5], [0, 1], [0, 4], [9, 9]]])
    y = torch.tensor([[5, 6, 7, 8, 9],
                      [1, 2, 1, 2, 2]])
    pred = gpicl.nearest_neighbour(x, y)
    assert pred.tolist() == [[0, 5, 5, 6, 7],                         # position 0: label 0
                             [0, 1, 1, 2, 2]]
    acc = gpicl.summarize(pred == y)["curve"]
    assert acc == [0.0, 0.0, 0.5, 0.5, 0.5]
    # causal: changing the future (and the current label) changes no prediction before it
    y2, x2 = y.clone(), x.clone()
    y2[:, 3:], x2[:, 4] = 0, 100.0
    assert torch.equal(gpicl.nearest_neighbour(x2, y2)[:, :4], pred[:, :4])


def test_logistic_regression_separates_where_the_nearest_neighbour_misleads():
    # class 4 at x0 = -1, class 7 at x0 = +1, x1 spread; the query (0.5, -3) has a class-4
    # neighbour at (-1, -3) (distance 1.5) while every class-7 example is over 2 away: 1-NN
    # says 4, a linear classifier (the boundary x0 = 0) says 7
    x = torch.tensor([[[-1.0, -3.0], [1.0, 3.0], [-1.0, 3.0], [1.0, 1.0], [-1.0, 0.0],
                       [1.0, -1.0], [0.5, -3.0]]])
    y = torch.tensor([[4, 7, 4, 7, 4, 7, 7]])
    assert gpicl.nearest_neighbour(x, y)[0, -1] == 4
    pred = gpicl.logistic_regression(x, y, l2=1e-2)
    assert pred[0, 0] == 0                                               # nothing to fit at t = 0
    assert pred[0, -1] == 7 and pred[0, 4] == 4 and pred[0, 5] == 7      # x0's sign decides


def test_logistic_regression_fit_is_the_regularised_minimum():
    # the last position's fit against scipy-free first-order optimality: W* of the prefix has a
    # gradient of (nearly) zero, and the baseline's prediction is W*'s
    torch.manual_seed(0)
    x, y = torch.randn(1, 41, 5), torch.randint(0, 10, (1, 41))
    l2 = 0.1
    xb = torch.cat([x[0, :40], torch.ones(40, 1)], 1)                   # (40, 6)
    W = torch.zeros(6, 10, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
    def loss():
        opt.zero_grad()
        out = F.cross_entropy(xb @ W, y[0, :40]) + l2 / 2 * (W[:-1] ** 2).sum()
        out.backward()
        return out
    opt.step(loss)
    exact = (torch.cat([x[0, 40], torch.ones(1)]) @ W).argmax()
    assert gpicl.logistic_regression(x, y, l2=l2, steps=200)[0, 40] == exact


def test_choose_l2_picks_from_the_grid_on_training_tasks():
    # labels set by the sign of x0: a light penalty separates them, a heavy one (100) cannot
    x_all = torch.randn(300, 4)
    y_all = (x_all[:, 0] > 0).long() * 3                                 # labels 0 and 3
    assert gpicl.choose_l2(x_all, y_all, seq_len=30, grid=(100.0, 1e-2), n_tasks=2) == 1e-2


def test_evaluation_sequences_are_made_on_the_device_of_the_data(monkeypatch):
    # a GPU run evaluates on the GPU: every index the evaluation makes must live beside the data.
    # The "meta" device stands in for a GPU (no data, every shape and device checked)
    x_all = torch.empty(300, 4, device="meta")
    y_all = torch.empty(300, dtype=torch.long, device="meta")
    ids = torch.arange(3, device="meta")
    x, y = data.task_sequences(x_all, y_all, ids, 10, torch.arange(3), gpicl.EVAL_SEED)
    assert (x.device.type, y.device.type, x.shape, y.shape) == ("meta", "meta", (3, 10, 4), (3, 10))
    seen = []

    def recording(x_all, y_all, task_ids, seq_len, seq_index, **kw):
        seen.append({t.device.type for t in (x_all, y_all, task_ids, seq_index)})
        raise KeyboardInterrupt                      # enough: the L2 search itself needs values
    monkeypatch.setattr(data, "task_sequences", recording)
    with pytest.raises(KeyboardInterrupt):
        gpicl.choose_l2(x_all, y_all, seq_len=10)
    assert seen == [{"meta"}]


def test_compact_keeps_accuracy_at_fixed_examples():
    s = gpicl.summarize(torch.arange(120)[None].repeat(10, 1) < torch.arange(10)[:, None] * 12)
    r = gpicl.compact({"a": dict(s, baselines={"1-NN": s})})["a"]
    assert r["acc_at"] == {"1": 0.9, "5": 0.9, "10": 0.9, "20": 0.8, "50": 0.5, "100": 0.1}
    assert "curve" not in r and r["baselines"]["1-NN"]["acc_at"] == r["acc_at"]
    d = gpicl.paired(torch.ones(10, 120, dtype=torch.bool), torch.zeros(10, 120, dtype=torch.bool),
                     torch.arange(10))
    r = gpicl.compact({"a": dict(s, baselines={"1-NN": dict(s, **d)})})["a"]["baselines"]["1-NN"]
    assert r["diff_at"]["100"] == [1.0, 0.0] and "diff" not in r


@pytest.mark.slow
def test_train_shows_the_baselines_in_table_log_and_summary_and_the_flag_removes_them(tmp_path, capsys):
    flags = ["--device", "cpu", "--threads", "1", "--dataset", "random", "--image-size", "3",
             "--seq-len", "4", "--eval-datasets", "", "--eval-tasks", "2", "--eval-seqs", "3",
             "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--log-every", "1"]
    for on in ("on", "off"):
        out = tmp_path / on
        train.main([*flags, "--baselines", on, "--out-dir", str(out)])
        printed = capsys.readouterr().out
        ev = [json.loads(l) for l in open(out / "log.jsonl") if "eval" in l][-1]["eval"]
        summary = json.load(open(out / "summary.json"))["results"]
        if on == "off":
            assert "baselines" not in ev["unseen random"] and "baselines" not in summary["seen random"]
            assert "1-NN" not in printed and "SGD" not in printed
            continue
        for name in ("seen random", "unseen random"):
            b = ev[name]["baselines"]
            assert list(b) == ["1-NN", "logistic regression", "SGD"]
            assert b["1-NN"]["n"] == b["SGD"]["n"] == b["logistic regression"]["n"] == 6
            assert len(b["1-NN"]["curve"]) == 4
            s = summary[name]["baselines"]["1-NN"]
            assert "curve" not in s and s["acc_at"] == {"1": b["1-NN"]["curve"][0]}
            assert s["last"] == b["1-NN"]["last"]
        lines = printed.splitlines()
        at = lines.index(next(l for l in lines if l.startswith("unseen random")))
        assert [l[:22].rstrip() for l in lines[at + 1:at + 4]] == [
            "  1-NN", "  logistic regression", "  SGD"]
        diff = ev["unseen random"]["baselines"]["SGD"]["diff"][-1]
        assert f"{diff:+.3f}" in lines[at + 3]                         # learner - SGD, paired



# -----------------------------------------------------------------------------
# 8. In-context learning: meta-training learns it

@pytest.mark.slow
def test_train_meta_learns_in_context_on_unseen_tasks(tmp_path):
    # The Random dataset is pure in-context lookup: 10 noise images, one per label, and a task
    # projects them and permutes the labels. Fresh tasks every sequence, so nothing can be
    # memorised: accuracy on unseen tasks can only rise along the sequence by learning in context.
    # Seeds 0, 1 and 2 all pass the loss plateau by step ~1,500 and reach 0.45-0.47 at step 2,000.
    out = tmp_path / "r"
    p = run_train(["--dataset", "random", "--image-size", "4", "--seq-len", "10", "--num-tasks", "fresh",
                   "--model", "transformer", "--width", "32", "--n-layer", "2", "--n-head", "2",
                   "--batch-size", "64", "--lr", "3e-3", "--steps", "2000", "--eval-every", "2000",
                   "--eval-tasks", "16", "--eval-seqs", "32", "--eval-datasets", "",
                   "--log-every", "500", "--threads", "1", "--out-dir", str(out)], timeout=900)
    assert p.returncode == 0, p.stderr
    r = [json.loads(l) for l in open(out / "log.jsonl") if "eval" in l][-1]["eval"]["unseen random"]
    # a lookup learner is right when the query appeared before: at position t with probability
    # 1 - 0.9^t, so the curve must rise from chance (0.1) towards 0.65 at the 10th example
    assert r["first"] < 0.2
    assert r["last"] - r["last_ci"] > 0.25, r                         # chance is 0.1
    assert r["improvement"] - r["improvement_ci"] > 0.15, r
    assert sum(r["curve"][5:]) / 5 > sum(r["curve"][:5]) / 5 + 0.1      # rising along the sequence


# -----------------------------------------------------------------------------
# 9. train.py's command line, and what a run needs to lose nothing

BAD_FLAGS = [
    ["--num-tasks", "0"], ["--num-tasks", "lots"], ["--num-tasks", "2**-3"], ["--bias", "1.5"],
    ["--lr", "-1"], ["--lr", "nan"], ["--steps", "0"], ["--model", "gru"],
    ["--model", "transformer", "--state-size", "1001"], ["--batch-size", "7", "--seqs-per-task", "2"],
    ["--eval-datasets", "imagenet"], ["--image-size", "x"], ["--num-tasks", "2**70"],
    ["--seed", "99999999999999999999"], ["--device", "foo"], ["--device", "cuda:99"],
    ["--out-dir", "/dev/null/run"], ["--baselines", "maybe"], ["--time-budget", "5x"],
    ["--time-budget", "0"], ["--threads", "100000"], ["--eval-datasets", "fashion_mnist"],
    ["--schedule", "cosine"], ["--channels", "3"], ["--grad-accum", "2"], ["--bias-task", "0.5"],
]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=lambda f: " ".join(f))
def test_bad_flags_give_one_line_and_exit_2(flags, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPICL_DATA", str(tmp_path / "cache"))  # fashion_mnist: not downloaded
    with pytest.raises(SystemExit) as e:  # a flag wrongly accepted trains a step and returns
        train.main([*TINY, "--steps", "1", "--out-dir", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("train.py: error: "), err
    assert not (tmp_path / "r" / "ckpt.pt").exists()


@pytest.mark.parametrize("flag", [a for a in train.get_parser()._actions
                                  if a.type is not None], ids=lambda a: a.dest)
def test_fuzz_every_number_flag_is_refused_in_one_line_or_reaches_the_work(flag, tmp_path, capsys,
                                                                         monkeypatch):
    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached
    monkeypatch.setattr(data, "load_dataset", reached)  # where the expensive work starts
    for value in ["-1", "0", "1.5", "nan", "inf", "-inf", "1e400", "", " ", "abc", "0x10", "2**70",
                  "1_0", "\0", str(2 ** 31), str(2 ** 63), str(10 ** 40)]:
        try:
            train.main([*TINY, "--steps", "1", "--out-dir", str(tmp_path / "r"),
                        flag.option_strings[0], value])
            outcome = "trained"
        except Reached:
            outcome = "work"
        except SystemExit as e:
            outcome = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert outcome in ("work", 2), (flag.dest, value, outcome)
        assert outcome == "work" or (len(err) == 1 and "error:" in err[0]), (flag.dest, value, err)


def test_presets_fill_what_no_flag_gives_and_flags_win():
    def parse(*a):
        args = train.get_parser().parse_args(list(a))
        train.apply_preset(args)
        return args
    for device, preset in (("cpu", "cpu"), ("cuda:0", "paper")):            # the device picks
        args = parse("--device", device)
        assert args.preset == preset
        assert all(getattr(args, k) == v for k, v in train.PRESETS[preset].items())
    args = parse("--preset", "paper", "--image-size", "9", "--steps", "5", "--width", "3")
    assert (args.image_size, args.steps, args.width) == (9, 5, 3)       # a flag given wins
    assert args.batch_size == train.PRESETS["paper"]["batch_size"]      # the rest: the preset
    args = parse("--preset", "cpu", "--model", "outer_lstm")      # sizes are the Transformer's
    assert args.width is None and args.n_head is None
    assert args.batch_size == 64 and args.time_budget == 13 * 60        # the other learners'
    widths = [parse("--preset", "cpu", "--model", "lstm", *extra).width
              for extra in ((), ("--width", "128"), ("--state-size", "1024"))]
    assert widths == [64, 128, None]               # the cpu preset's LSTM: 64 unless asked
    assert parse("--preset", "paper", "--model", "lstm").width is None  # its own default
    args = parse("--preset", "cpu", "--state-size", "3200")       # the state picks the key size
    assert args.key_size is None and args.width == 128


def test_first_line_names_the_learner_its_state_and_parameters_and_evaluations_print(tmp_path,
                                                                                     capsys):
    heads = TINY.index("--n-head")
    lstm = TINY[:heads] + TINY[heads + 2:]                              # an LSTM has no heads
    train.main([*lstm, "--model", "lstm", "--width", "8", "--n-layer", "1", "--steps", "2",
                "--eval-every", "1", "--baselines", "off", "--out-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out.splitlines()
    n = models.num_params(models.build("lstm", 59, 10, width=8, n_layer=1, seq_len=10))
    assert out[0].startswith(f"preset cpu: lstm (width 8, n_layer 1; state size 16 floats; "
                             f"{n:,} parameters) on 7x7 mnist, 2 steps or 13 minutes of 8 sequences")
    header = gpicl.format_results(json.loads(open(tmp_path / "r" / "log.jsonl").readline())["eval"])
    at = out.index("step 1:")                                          # the evaluation at step 1
    assert out[at + 1:at + 1 + len(header.splitlines())] == header.splitlines()


def test_refuses_to_write_over_a_run_or_to_continue_it_as_another(tmp_path, capsys):
    out = str(tmp_path / "r")
    train.main([*TINY, "--steps", "2", "--log-every", "1", "--out-dir", out])
    before = open(os.path.join(out, "log.jsonl")).read()
    capsys.readouterr()
    for argv, says in (([], "--resume"), (["--seed", "1", "--resume"], "--seed 0"),
                       (["--width", "8", "--resume"], "another learner")):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, "--steps", "4", "--out-dir", out, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err
        assert open(os.path.join(out, "log.jsonl")).read() == before    # nothing lost


def test_resume_from_weights_only_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    train.main([*TINY, "--steps", "1", "--out-dir", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer", "rng")}, out / "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--steps", "2", "--out-dir", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "weights only" in err[0], err


class MakesAFile:
    """Unpickled, this calls open(path, "w"): a file appears if loading a pickle runs its code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_load_as_weights_only_refusing_code_and_cut_files(tmp_path, capsys):
    out, marker = tmp_path / "r", tmp_path / "pickle_ran"
    args = [*TINY, "--steps", "1", "--out-dir", str(out)]
    train.main(args)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # what train.py saves reads back safely
    ckpt["flags"]["note"] = MakesAFile(str(marker))
    evil, cut = tmp_path / "evil.pt", tmp_path / "cut.pt"
    torch.save(ckpt, evil)
    cut.write_bytes((out / "ckpt.pt").read_bytes()[:5000])              # a copy cut short
    capsys.readouterr()
    for bad, why in ((evil, "refused"), (cut, "cut short or corrupted")):
        shutil.copy(bad, out / "ckpt.pt")
        with pytest.raises(SystemExit) as e:
            train.main([*args, "--steps", "2", "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and why in err[0], err
        with pytest.raises(ValueError, match=why) as e:
            gpicl.load_learner(str(bad))
        assert "\n" not in str(e.value)
    assert not marker.exists()                       # nothing above ran the pickle's code...
    torch.load(evil, weights_only=False)             # ...which an unsafe load would have run
    assert marker.exists()


def test_checkpoint_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "r"
    args = [*TINY, "--log-every", "1", "--ckpt-every", "1", "--eval-every", "1000",
            "--schedule", "constant", "--out-dir", str(out)]
    train.main([*args, "--steps", "1"])
    good = (out / "ckpt.pt").read_bytes()
    real_save = torch.save

    def dies_mid_write(state, f):  # a kill or a full disk while the checkpoint is written
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError):
        train.main([*args, "--steps", "2", "--resume"])
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "ckpt.pt").read_bytes() == good                       # the last good one


@pytest.mark.parametrize("log_every, ckpt_every", [(3, 2), (100, 1)])
def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoint_before_it(tmp_path, monkeypatch, capsys,
                                                                     log_every, ckpt_every):
    args = [*TINY, "--eval-every", "1000", "--log-every", str(log_every),
            "--ckpt-every", str(ckpt_every), "--schedule", "constant"]
    train.main([*args, "--steps", "4", "--out-dir", str(tmp_path / "good")])
    make_tokens, calls = data.make_tokens, []

    def nan_at_step_5(*a):  # NaN tokens, so a NaN loss, at step 5 (no evaluation before it)
        calls.append(1)
        tokens = make_tokens(*a)
        return tokens * math.nan if len(calls) == 5 else tokens
    monkeypatch.setattr(data, "make_tokens", nan_at_step_5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--steps", "8", "--out-dir", str(tmp_path / "nan")])
    assert str(e.value.code).startswith("train.py: error: the loss is not finite by step")
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    good = torch.load(tmp_path / "good" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4                        # never one of step 5 or later (log_every 3: 6)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in good["model"].items())
    assert all(s <= 4 for s, _ in losses(tmp_path / "nan"))       # no record of a NaN loss


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_inside_a_step_finishes_it_and_resumes_exactly(tmp_path, monkeypatch, sig):
    args = [*TINY, "--steps", "6", "--log-every", "2", "--eval-every", "1000"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train.main([*args, "--out-dir", whole])
    adam_step, calls = models.Adam.step, []

    def interrupt_then_step(self):  # the signal inside step 3: its loss is summed, Adam not yet run
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return adam_step(self)
    monkeypatch.setattr(models.Adam, "step", interrupt_then_step)
    with pytest.raises(SystemExit) as stopped:
        train.main([*args, "--out-dir", cut])
    assert stopped.value.code == 128 + sig                      # 130 for Ctrl-C, 143 for SIGTERM
    assert torch.load(os.path.join(cut, "ckpt.pt"), weights_only=True)["step"] == 3
    assert signal.getsignal(sig) is not train.ask_to_stop       # the handler as it was
    monkeypatch.undo()
    train.main([*args, "--out-dir", cut, "--resume"])
    assert losses(cut) == losses(whole)                         # step 3 counted once, whole


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 4])  # 4: checkpoints fall between loss records
def test_killed_run_resumes_with_the_same_losses(tmp_path, log_every):
    args = [*TINY, "--steps", "60", "--log-every", str(log_every), "--ckpt-every", "5",
            "--eval-every", "1000"]
    whole = str(tmp_path / "whole")
    assert run_train([*args, "--out-dir", whole]).returncode == 0
    # the same run, killed (SIGKILL: no chance to save) after its first checkpoints
    cut = str(tmp_path / "cut")
    proc = subprocess.Popen([PY, os.path.join(HERE, "train.py"), *args, "--out-dir", cut],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(cut, "ckpt.pt")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(ckpt) and
                                          torch.load(ckpt, weights_only=True)["step"] >= 10):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= stopped < 60
    p = run_train([*args, "--out-dir", cut, "--resume"])
    assert p.returncode == 0, p.stderr
    assert losses(cut) == losses(whole)                                 # bit for bit, no duplicates
    assert [s for s, _ in losses(cut)] == list(range(log_every, 61, log_every))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_even_in_a_background_job(tmp_path):
    # a non-interactive shell starts background jobs with SIGINT ignored; train.py re-arms it
    out = str(tmp_path / "r")
    proc = subprocess.Popen([PY, os.path.join(HERE, "train.py"), *TINY, "--steps", "100000",
                             "--eval-every", "100000", "--out-dir", out], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 0):
        time.sleep(0.05)                                                 # it is training
    proc.send_signal(signal.SIGINT)
    try:
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()                                                      # never left running
    assert proc.returncode == 130 and "--resume" in stdout
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] >= 50


def test_time_budget_reads_durations():
    assert [train.duration(s) for s in ("300", "300s", "5m", "1.5h", "2S", ".5m")] == \
        [300, 300, 300, 5400, 2, 30]
    for bad in ("5x", "1e3m5", "5ms", "", "m"):
        with pytest.raises(ValueError):
            train.duration(bad)


@pytest.mark.slow
def test_time_budget_ends_the_run_as_its_last_step_would_and_resume_continues(tmp_path):
    # log, evaluation and checkpoint intervals far beyond the run: all three come from the budget
    out = tmp_path / "r"
    args = [*TINY, "--log-every", "100000", "--eval-every", "100000", "--out-dir", str(out)]
    p = run_train([*args, "--steps", "1000000", "--time-budget", "2s"])
    assert p.returncode == 0, p.stderr
    summary = json.load(open(out / "summary.json"))
    n = summary["step"]
    assert summary["stopped_by"] == "time_budget" and 0 < n < 1000000
    assert 2.0 <= summary["train_time_s"] < 10
    assert f"stopped by --time-budget at step {n} of 1000000" in p.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == n and ckpt["last_logged"] == n
    records = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == [n, n] and "loss" in records[0]
    assert records[1]["eval"]["unseen mnist"]["last"] == summary["results"]["unseen mnist"]["last"]
    # resumed without a budget, it runs on to --steps
    p = run_train([*args, "--steps", str(n + 3), "--resume"])
    assert p.returncode == 0, p.stderr
    summary = json.load(open(out / "summary.json"))
    assert summary["step"] == n + 3 and summary["stopped_by"] == "steps"
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl")) if "eval" in r] == [n, n + 3]
    # resumed with one, the budget counts from the resume, not from the run's first step
    p = run_train([*args, "--steps", "1000000", "--time-budget", "1", "--resume"])
    assert p.returncode == 0, p.stderr
    later = json.load(open(out / "summary.json"))
    assert later["stopped_by"] == "time_budget" and later["step"] >= n + 3 + 3
    assert later["train_time_s"] >= summary["train_time_s"] + 1


@pytest.mark.slow
def test_lstm_with_state_size_1024_starts_and_reports_it(tmp_path):
    p = run_train(["--model", "lstm", "--state-size", "1024", "--steps", "1", "--batch-size", "2",
                   "--seq-len", "10", "--eval-tasks", "1", "--eval-seqs", "2",
                   "--out-dir", str(tmp_path / "r")])
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith("preset cpu: lstm (width 512, n_layer 1; state size 1,024 floats")
    # 7x7; the meta-parameters: 2,399,754 weights less the 2,048 of the frozen bias_hh
    assert "2,397,706 parameters" in first
    assert p.stdout.splitlines()[1].startswith("what to expect: in 13 minutes on 2 CPU cores")
    summary = json.load(open(tmp_path / "r" / "summary.json"))
    assert summary["state_size"] == 1024 and summary["parameters"] == 2397706


# Data parallel: torchrun with two CPU processes (gloo) trains exactly as one process does

DDP_TINY = ["--model", "transformer", "--width", "32", "--n-layer", "1", "--n-head", "2",
            "--image-size", "7", "--seq-len", "10", "--batch-size", "8", "--steps", "2",
            "--log-every", "1", "--eval-every", "2", "--eval-tasks", "2", "--eval-seqs", "4",
            "--eval-datasets", "", "--threads", "1"]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(HERE, "train.py")]


@pytest.mark.slow
def test_two_processes_under_torchrun_train_like_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p1 = subprocess.run([PY, os.path.join(HERE, "train.py"), *DDP_TINY, "--out-dir", one],
                        capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p1.returncode == 0, p1.stderr
    p2 = subprocess.run([*TORCHRUN, *DDP_TINY, "--out-dir", two],
                        capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:]
    assert p2.stdout.count("preset cpu:") == 1, p2.stdout                # said once, by rank 0
    # one record per step (only rank 0 writes), and the same losses: step 1 checks that the two
    # halves of the meta-batch are the single run's batch and that the loss is averaged over
    # ranks; step 2 that the gradients were averaged too (summed, or not reduced, it differs)
    a, b = losses(one), losses(two)
    assert [s for s, _ in b] == [1, 2] == [s for s, _ in a]
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-5), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_under_torchrun_stops_every_rank_at_one_step(tmp_path, sig):
    # torchrun passes SIGINT or SIGTERM on to the ranks; each may get it in a different step, so
    # they agree at the next loss record (an all-reduce): one checkpoint, no rank left waiting
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "r"
    run = [*TORCHRUN, *DDP_TINY, "--log-every", "10", "--eval-every", "100000"]
    proc = subprocess.Popen([*run, "--steps", "100000", "--out-dir", str(out)], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and
                                          (out / "log.jsonl").stat().st_size > 0):
        time.sleep(0.05)                                                 # both ranks train
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert output.count("interrupted at step") == 1, output[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] % 10 == 0 and ckpt["last_logged"] == ckpt["step"] and ckpt["step"] >= 10
    p = subprocess.run([*run, "--steps", str(ckpt["step"] + 10), "--out-dir", str(out), "--resume"],
                       capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert [s for s, _ in losses(out)] == list(range(10, ckpt["step"] + 11, 10))


@pytest.mark.slow
def test_time_budget_under_torchrun_stops_every_rank_at_one_step(tmp_path):
    # rank 0 decides at a loss record's all-reduce; a rank that stopped alone would leave the
    # other waiting in the next all-reduce (the test's timeout)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "r"
    p = subprocess.run([*TORCHRUN, *DDP_TINY, "--log-every", "10", "--eval-every", "100000",
                        "--steps", "100000", "--time-budget", "2", "--out-dir", str(out)],
                       capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("stopped by --time-budget") == 1, p.stdout[-2000:]
    summary = json.load(open(out / "summary.json"))
    n = summary["step"]
    assert summary["stopped_by"] == "time_budget" and n % 10 == 0 and 10 <= n < 100000
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == n
    records = [json.loads(l) for l in open(out / "log.jsonl")]
    assert records[-1]["step"] == n and "eval" in records[-1]
    assert [r["step"] for r in records if "loss" in r] == list(range(10, n + 1, 10))
