"""
What test_gpicl.py and test_harness.py share: tiny flags for train.py, small learners, tiny
checkpoints, toy data, and the demo learner as a fixture.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import metatest
import models

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


def kinds(*slow):
    """Every learner kind for a parametrized test, the named ones marked slow (> ~3 s here)."""
    return [pytest.param(k, marks=pytest.mark.slow) if k in slow else k for k in models.MODELS]


def small(kind, seq_len=12, n_x=6):
    given = dict(width=16, n_layer=2, n_head=2, key_size=4)
    sizes = models.learner_sizes(kind, n_x + 10, seq_len, **{k: v for k, v in given.items()
                                                          if k in models.MODELS[kind].defaults})
    torch.manual_seed(0)
    return models.build(kind, n_x + 10, 10, **sizes).eval()


TINY = ["--image-size", "7", "--seq-len", "10", "--batch-size", "8", "--model", "transformer",
        "--width", "16", "--n-layer", "1", "--n-head", "2", "--eval-tasks", "2", "--eval-seqs", "4",
        "--eval-datasets", "", "--threads", "1"]


def run_train(args, timeout=300, **kw):
    return subprocess.run([PY, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=timeout, **kw)


TRAINED = os.path.join(HERE, "checkpoints", "mnist7_demo.pt")  # the demo learner, 7x7 MNIST


def tiny_checkpoint(path, kind="transformer", image_size=2, seq_len=10, tweak=None, channels=1,
                    **given):
    """A train.py-format checkpoint of an untrained learner."""
    n_x = channels * image_size ** 2
    sizes = models.learner_sizes(kind, n_x + 10, seq_len, **given)
    torch.manual_seed(0)
    model = models.build(kind, n_x + 10, 10, **sizes)
    if tweak:
        tweak(model)
    torch.save(dict(model=model.state_dict(), optimizer=None, step=0, elapsed=0.0,
                    flags=dict(dataset="mnist", image_size=image_size, seq_len=seq_len,
                               channels=channels),
                    learner=dict(kind=kind, n_in=n_x + 10, n_out=10, sizes=sizes), format=3), path)
    return str(path)


def blobs(labels, n_per, d=5, seed=0):
    """Well-separated Gaussian classes, shuffled: (X (n, d), y (n,) with the given labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (len(labels), d))
    X = np.concatenate([c + rng.normal(0, 1, (n_per, d)) for c in centres])
    y = np.repeat(np.asarray(labels, dtype=object), n_per)
    p = rng.permutation(len(y))
    return X[p], y[p]


def uci_split(n_context=99, n_query=300, seed=0):
    d = np.load(os.path.join(HERE, "data", "uci_digits.npz"))
    X, y = d["x"].reshape(len(d["y"]), -1).astype(float), d["y"]
    p = np.random.default_rng(seed).permutation(len(y))
    c, q = p[:n_context], p[n_context:n_context + n_query]
    return X[c], y[c], X[q], y[q]


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return metatest.InContextClassifier.from_checkpoint(TRAINED, members=8, seed=0)
