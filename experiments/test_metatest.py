"""
metatest.py: a trained learner as a classifier for your own table of numbers
(InContextClassifier, kNN and logistic regression beside it), UCI digits, Table 1, and the csv
command line.
"""
import csv
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch

import data
import gpicl
import metatest
from conftest import HERE, PY, ROOT, TRAINED, blobs, tiny_checkpoint, uci_split, write_csv


def always_label(label):
    """A tweak that makes a tiny Transformer predict `label` whatever it reads."""
    def tweak(model):
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), 10) * 5.0)
    return tweak


# -----------------------------------------------------------------------------
# InContextClassifier and the baselines beside it

@pytest.mark.parametrize("labels", [[3, 7, 11], ["cat", "dog", "emu"]])
def test_in_context_classifier_fit_predict_round_trip_in_the_users_labels(trained, labels):
    X, y = blobs(labels, 40)
    trained.fit(X[:60], y[:60])
    pred, proba = trained.predict(X[60:]), trained.predict_proba(X[60:])
    assert list(trained.classes_) == sorted(labels)
    assert set(pred) <= set(labels) and pred.shape == (60,)
    assert proba.shape == (60, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert np.array_equal(pred, trained.classes_[proba.argmax(1)])
    # separated classes: a mapping back to the wrong labels would score ~1/3 or less
    assert np.mean(pred == y[60:]) > 0.8


def test_in_context_classifier_predictions_do_not_depend_on_the_order_or_company_of_queries(trained):
    X, y = blobs([0, 1, 2, 3], 30, seed=1)
    trained.fit(X[:80], y[:80])
    q = X[80:]
    proba = trained.predict_proba(q)
    perm = np.random.default_rng(0).permutation(len(q))
    assert np.allclose(trained.predict_proba(q[perm]), proba[perm], atol=1e-5)
    assert np.allclose(trained.predict_proba(q[3:4]), proba[3:4], atol=1e-5)  # alone
    # and a different seed is a different ensemble (the check above could not pass vacuously)
    other = metatest.InContextClassifier(TRAINED, members=8, seed=1).fit(X[:80], y[:80])
    assert not np.allclose(other.predict_proba(q), proba, atol=1e-3)


@pytest.mark.parametrize("fit_args, match", [
    ((np.zeros((30, 3)), np.arange(30) % 11), "11 classes"),
    ((np.full((4, 2), np.nan), [0, 1, 0, 1]), "NaN"),
    ((np.array([[1.0, np.inf], [0, 0]]), [0, 1]), "infinite"),
    ((np.ones((1, 3)), [0]), "at least 2 context rows"),
    ((np.zeros((5, 0)), [0, 1, 0, 1, 0]), "width 0"),
    ((np.zeros((5, 2)), [0, 1, 0]), "one label per row"),
    (([["a", "b"], ["c", "d"]], [0, 1]), "numbers only"),
])
def test_in_context_classifier_bad_context_is_one_clear_error(trained, fit_args, match):
    with pytest.raises(ValueError, match=match) as e:
        metatest.InContextClassifier(TRAINED, members=1).fit(*fit_args)
    assert "\n" not in str(e.value)


def test_in_context_classifier_bad_queries_are_one_clear_error(trained):
    fresh = metatest.InContextClassifier(TRAINED, members=1)
    with pytest.raises(ValueError, match="before predict"):
        fresh.predict(np.zeros((2, 3)))
    fresh.fit(np.random.default_rng(0).normal(size=(10, 3)), [0, 1] * 5)
    with pytest.raises(ValueError, match="has 4 features but the context rows have 3"):
        fresh.predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fresh.predict_proba(np.array([[0, np.nan, 0]]))


def test_in_context_classifier_splits_a_long_context_into_chunks_that_fit(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path / "t.pt", seq_len=10, width=16, n_layer=1, n_head=2)
    seen = []
    real = metatest.last_position_logits
    monkeypatch.setattr(metatest, "last_position_logits",
                        lambda m, xc, yc, xq, **kw: seen.append(len(yc)) or real(m, xc, yc, xq, **kw))
    X = np.random.default_rng(0).normal(size=(25, 6))
    clf = metatest.InContextClassifier(path, members=2).fit(X, np.arange(25) % 3)
    proba = clf.predict_proba(X[:4])
    assert seen == [9, 8, 8, 9, 8, 8]          # 25 rows -> 3 chunks per member, each <= seq_len - 1
    assert proba.shape == (4, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_in_context_classifier_trained_learns_uci_digits_and_a_random_one_not(tmp_path):
    # 99 context rows, 300 queries. Chance is 0.1: a learner at chance exceeds 0.2 with
    # probability < 1e-9 (binomial, n = 300); the demo learner scores ~0.55 here.
    torch.set_num_threads(1)
    Xc, yc, Xq, yq = uci_split()
    untrained = tiny_checkpoint(tmp_path / "u.pt", image_size=7, seq_len=100, width=32,
                                n_layer=2, n_head=4)
    acc = {}
    for name, path in (("trained", TRAINED), ("untrained", untrained)):
        clf = metatest.InContextClassifier(path, members=8).fit(Xc, yc)
        acc[name] = np.mean(clf.predict(Xq) == yq)
    assert acc["untrained"] < 0.2 < 0.35 < acc["trained"], acc


def test_knn_and_logreg_baselines_learn_separable_classes():
    X, y = blobs([0, 1, 2], 40, seed=2)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y.astype(int))
    assert torch.equal(metatest.knn_predict(X, y, X, k=1), y)           # each row is its own neighbour
    assert (metatest.knn_predict(X[:60], y[:60], X[60:], k=3) == y[60:]).float().mean() > 0.9
    assert (metatest.logreg_predict(X[:60], y[:60], X[60:]) == y[60:]).float().mean() > 0.9
    # and a shuffled context teaches them nothing (the checks above can fail)
    y_bad = y[:60][torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    assert (metatest.logreg_predict(X[:60], y_bad, X[60:]) == y[60:]).float().mean() < 0.7


def test_uci_comparison_scores_the_learner_and_the_baselines_on_the_same_splits(tmp_path):
    # a learner that always says one label predicts one digit for every query, whatever the
    # path and the ensemble: it scores that digit's share of the queries (about 0.1), while
    # kNN and logistic regression learn the digits from the same 99 context rows (about 0.9)
    const = tiny_checkpoint(tmp_path / "const.pt", seq_len=100, width=16, n_layer=1, n_head=2,
                            tweak=always_label(3))
    acc = metatest.compare_on_uci_digits(const, splits=2, n_context=99, n_queries=50, members=2)
    learner = [k for k in acc if k.startswith("GPICL")]
    assert sorted(learner) == ["GPICL image path, 1 task", "GPICL image path, 2 tasks",
                               "GPICL table path, column z-norm, 1 member",
                               "GPICL table path, column z-norm, 2 members",
                               "GPICL table path, global z-norm, 2 members"]
    assert len(acc) == len(learner) + 6                  # kNN k=1, k=3 and logistic, per z-norm
    for name, (mean, ci) in acc.items():
        assert (mean < 0.3) if name in learner else (mean > 0.7), (name, mean)
        assert ci >= 0


# -----------------------------------------------------------------------------
# Table 1 and the command lines

def run_metatest(args, **kw):
    return subprocess.run([PY, os.path.join(HERE, "metatest.py"), "--threads", "1", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


@pytest.mark.slow
def test_csv_command_prints_accuracies_and_writes_predictions(tmp_path):
    X, y = blobs(["a", "b", "c"], 30, d=4, seed=3)
    rows = [[*map(str, x), lab] for x, lab in zip(X, y)]
    train = write_csv(tmp_path / "train.csv", ["f1", "f2", "label", "f3"],
                      [[r[0], r[1], r[4], r[2]] for r in rows[:60]])   # label in the middle
    test = write_csv(tmp_path / "test.csv", ["f3", "label", "f1", "f2"],      # other order
                     [[r[2], r[4], r[0], r[1]] for r in rows[60:]])
    out = tmp_path / "preds.csv"
    p = run_metatest(["csv", "--ckpt", TRAINED, "--train", train, "--test", test, "--label", "label",
                      "--out", str(out), "--members", "4"])
    assert p.returncode == 0, p.stderr
    accs = [float(a) for a in re.findall(r"\b\d\.\d{3}\b", p.stdout)]   # GPICL, kNN, logreg
    assert len(accs) == 3 and all(a > 0.8 for a in accs), p.stdout
    got = list(csv.reader(open(out)))
    assert got[0] == ["prediction", "knn_k1", "logreg", "p_a", "p_b", "p_c"] and len(got) == 31
    for col, acc in enumerate(accs):  # the file holds the predictions whose accuracy was printed
        assert abs(np.mean([g[col] == lab for g, lab in zip(got[1:], y[60:])]) - acc) < 6e-4


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing", "cannot read"), ("label", "no column 'label'"), ("text", "'x' is not a number"),
    ("binary", "not a text CSV"), ("device", "--device 'foo'")])
def test_csv_command_errors_are_one_line_exit_2(tmp_path, case, message):
    good = write_csv(tmp_path / "good.csv", ["f1", "label"], [["1", "a"], ["2", "b"]])
    (tmp_path / "binary.csv").write_bytes(b"f1,label\n\xff\xfe\x00,a\n")
    bad = {"missing": str(tmp_path / "nope.csv"),
           "label": write_csv(tmp_path / "nolabel.csv", ["f1", "y"], [["1", "a"], ["2", "b"]]),
           "text": write_csv(tmp_path / "text.csv", ["f1", "label"], [["1", "a"], ["x", "b"]]),
           "binary": str(tmp_path / "binary.csv"), "device": good}[case]
    device = ["--device", "foo"] if case == "device" else []
    p = run_metatest([*device, "csv", "--ckpt", TRAINED, "--train", bad, "--test", good,
                      "--label", "label", "--out", str(tmp_path / "p.csv")])
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


@pytest.mark.slow
def test_table1_reports_missing_datasets_and_writes_the_right_values(tmp_path):
    const = tiny_checkpoint(tmp_path / "const.pt", width=16, n_layer=1, n_head=2,
                            tweak=always_label(3))
    sgd = tiny_checkpoint(tmp_path / "sgd.pt", kind="sgd", width=8)       # no parameters at all
    env = dict(os.environ, GPICL_DATA=str(tmp_path / "empty"), GPICL_MIRROR="http://127.0.0.1:9")
    p = run_metatest(["table1", const, sgd, "--tasks", "4", "--seqs", "8", "--out-dir",
                      str(tmp_path / "out")], env=env)
    assert p.returncode == 0, p.stderr
    md = open(tmp_path / "out" / "table1.md").read()
    res = json.load(open(tmp_path / "out" / "table1.json"))
    assert "| GPICL Transformer (paper) | 73.70 | 62.24 | 53.39 | 100.00 | 19.40 | 14.58 |" in md
    for name in ("fashion_mnist", "kmnist", "cifar10", "svhn"):
        assert f"missing — fetch with `python experiments/datasets.py fetch {name}`" in md
    row = res["checkpoints"][0]["accuracy_pct"]
    assert row["KMNIST"] == {"missing": "fetch with `python experiments/datasets.py fetch kmnist`"}
    # the expected accuracy: how often the label at position 10 of each unseen-task sequence is 3
    ids = data.unseen_task_ids(4).repeat_interleave(8)
    for column, name in (("MNIST", "mnist"), ("Random", "random"), ("UCI digits", "uci_digits")):
        x_all, y_all = data.load_dataset(name, 2)["test"]
        _, y = data.task_sequences(x_all, y_all, ids, 10, torch.arange(32), gpicl.EVAL_SEED)
        expect = 100 * (y[:, -1] == 3).float().mean().item()
        assert row[column]["n"] == 32 and abs(row[column]["acc"] - expect) < 0.01, (column, row)
        assert f"{row[column]['acc']:.2f} ± {row[column]['ci']:.2f}" in md
    # the sgd learner's column: its own predictions at position 10, counted here
    sgd_row, (model, _) = res["checkpoints"][1], gpicl.load_learner(sgd)
    x_all, y_all = data.load_dataset("random", 2)["test"]
    x, y = data.task_sequences(x_all, y_all, ids, 10, torch.arange(32), gpicl.EVAL_SEED)
    expect = 100 * (gpicl.learner_predict(model, x, y)[:, -1] == y[:, -1]).float().mean().item()
    assert sgd_row["learner"] == "sgd"
    assert abs(sgd_row["accuracy_pct"]["Random"]["acc"] - expect) < 0.01, (expect, sgd_row)


def test_paired_command_reports_the_learner_minus_each_baseline_on_the_same_sequences(tmp_path,
                                                                                     capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.pt", image_size=4, seq_len=10, width=8, n_layer=1,
                           n_head=2)
    out = tmp_path / "paired.json"
    metatest.main(["--threads", "1", "paired", "--ckpt", ckpt, "--tasks", "3", "--seqs", "2",
                   "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    r = json.load(open(out))
    assert (r["tasks"], r["seqs"], r["results"]["n"]) == (3, 2, 6) and r["commit"]
    # the same numbers, from the evaluation itself: every baseline on all 6 sequences
    s, l2 = metatest.compare_paired(ckpt, 3, 2)
    assert l2 == r["l2"] and s["last"] == r["results"]["last"]
    for b in ("1-NN", "logistic regression", "SGD"):
        got = r["results"]["baselines"][b]
        assert got["n"] == 6 and got["diff_at"]["10"] == [s["baselines"][b]["diff"][9],
                                                          s["baselines"][b]["diff_ci"][9]]
        assert s["baselines"][b]["diff"][9] == pytest.approx(s["curve"][9] -
                                                             s["baselines"][b]["curve"][9],
                                                             abs=1e-3)  # mean of diffs
    assert any(l.startswith("  learner - SGD") for l in printed)
