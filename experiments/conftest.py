"""
What the folder's tests share: paths, tiny checkpoints in train.py's format, toy data, tiny
benchmark flags, and the demo learner as a classifier (a fixture).
"""
import csv
import os
import sys

import numpy as np
import pytest
import torch

import metatest
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
HERE = os.path.join(ROOT, "experiments")
PY = sys.executable
TRAINED = os.path.join(ROOT, "checkpoints", "mnist7_demo.pt")  # the demo learner, 7x7 MNIST

# bench.py at the smallest sizes that still time something
BENCH_TINY = ["--threads", "1", "--width", "32", "--n-layer", "1", "--n-head", "2",
              "--image-size", "7", "--seq-len", "10", "--batch-size", "4",
              "--steps", "2", "--warmup", "1", "--repeats", "3"]


def tiny_checkpoint(path, kind="transformer", image_size=2, seq_len=10, tweak=None, **given):
    """A checkpoint as train.py writes one (weights only), of an untrained learner."""
    n_in = image_size ** 2 + 10
    sizes = models.learner_sizes(kind, n_in, seq_len, **given)
    model_args = dict(kind=kind, n_in=n_in, n_out=10, **sizes)
    torch.manual_seed(0)
    model = models.build(**model_args)
    if tweak:
        tweak(model)
    torch.save(dict(model=model.state_dict(), optimizer=None, model_args=model_args, step=0,
                    elapsed=0.0, flags=dict(dataset="mnist", image_size=image_size,
                                            seq_len=seq_len)), path)
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
    d = np.load(os.path.join(ROOT, "data", "uci_digits.npz"))
    X, y = d["x"].reshape(len(d["y"]), -1).astype(float), d["y"]
    p = np.random.default_rng(seed).permutation(len(y))
    c, q = p[:n_context], p[n_context:n_context + n_query]
    return X[c], y[c], X[q], y[q]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return metatest.InContextClassifier(TRAINED, members=8, seed=0)
