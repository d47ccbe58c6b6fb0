"""
datasets.py: every download, faked in its publisher's format and served on 127.0.0.1, is
verified, converted and cached where data.load_dataset reads it; a bad one leaves nothing.
"""
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import subprocess
import tarfile
import threading
import zlib

import numpy as np
import pytest

import data
import datasets
from conftest import PY, ROOT


def idx_gz(array):
    dims = array.shape
    header = struct.pack(">I", 0x0800 | len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def cifar_tar(x_train, y_train, x_test, y_test):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, payload):
            raw = pickle.dumps(payload)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        rows = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)   # channels first, as CIFAR
        for i, part in enumerate(np.array_split(np.arange(len(x_train)), 5)):
            add(f"data_batch_{i + 1}", {b"data": rows(x_train[part]), b"labels": y_train[part].tolist()})
        add("test_batch", {b"data": rows(x_test), b"labels": y_test.tolist()})
        add("batches.meta", {b"label_names": [b"x"] * 10})
    return buf.getvalue()


def mat_v5(arrays):
    """A MATLAB v5 file with zlib-compressed matrices, as MATLAB writes SVHN's."""
    classes = {np.uint8: (9, 2), np.float64: (6, 9)}                  # (mx class, mi type)
    def el(kind, data):
        return struct.pack("<II", kind, len(data)) + data + b"\0" * (-len(data) % 8)
    out = (b"MATLAB 5.0 MAT-file, written by test_datasets".ljust(116) + b"\0" * 8 +
           struct.pack("<H", 0x0100) + b"IM")
    for name, a in arrays.items():
        mx, mi = classes[a.dtype.type]
        body = (el(6, struct.pack("<II", mx, 0)) + el(5, struct.pack(f"<{a.ndim}i", *a.shape)) +
                el(1, name.encode()) + el(mi, a.tobytes(order="F")))
        packed = zlib.compress(el(14, body))
        out += struct.pack("<II", 15, len(packed)) + packed               # not padded at top level
    return out


def fake_dataset(name, rng):
    """Small files in the real format of each download, and the arrays they hold."""
    shape = (28, 28) if name in ("fashion_mnist", "kmnist") else (32, 32, 3)
    x_tr, x_te = (rng.integers(0, 256, (n, *shape), dtype=np.uint8) for n in (50, 20))
    y_tr, y_te = (rng.integers(0, 10, n).astype(np.uint8) for n in (50, 20))
    if name in ("fashion_mnist", "kmnist"):
        names = list(datasets.DOWNLOADS[name][1])
        files = dict(zip(names, (idx_gz(x_tr), idx_gz(y_tr), idx_gz(x_te), idx_gz(y_te))))
    elif name == "cifar10":
        files = {"cifar-10-python.tar.gz": cifar_tar(x_tr, y_tr, x_te, y_te)}
    else:  # svhn: X (32, 32, 3, N) uint8, y (N, 1) double with 10 for the digit 0
        mat = lambda x, y: mat_v5({"X": x.transpose(1, 2, 3, 0).copy(),
                                   "y": np.where(y == 0, 10, y).astype(np.float64)[:, None]})
        files = {"train_32x32.mat": mat(x_tr, y_tr), "test_32x32.mat": mat(x_te, y_te)}
    return files, (x_tr, y_tr, x_te, y_te)


class Server:
    """Serves {root}/{name}/{file} on 127.0.0.1; paths under /cut/ drop the connection midway."""
    def __init__(self, root):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.startswith("/cut/"):
                    body = open(os.path.join(root, self.path[5:]), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                super().do_GET()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Every download dataset, faked, served locally, with its checksums."""
    rng = np.random.default_rng(0)
    root, truth = tmp_path / "www", {}
    for name in datasets.DOWNLOADS:
        files, truth[name] = fake_dataset(name, rng)
        (root / name).mkdir(parents=True)
        for f, raw in files.items():
            (root / name / f).write_bytes(raw)
        md5s = {f: hashlib.md5(raw).hexdigest() for f, raw in files.items()}
        monkeypatch.setitem(datasets.DOWNLOADS, name, (datasets.DOWNLOADS[name][0], md5s))
    server = Server(root)
    monkeypatch.setenv("GPICL_MIRROR", server.url)
    yield server, root, truth
    server.close()


def test_every_dataset_data_py_fetches_has_a_download():
    assert set(datasets.DOWNLOADS) == set(data.FETCHED)


@pytest.mark.parametrize("name", list(datasets.DOWNLOADS))
def test_download_verifies_converts_and_caches(name, served, tmp_path):
    server, root, (truth) = served
    cache = tmp_path / "cache"
    path = datasets.fetch_dataset(name, str(cache))
    d = np.load(path)
    x_tr, y_tr, x_te, y_te = truth[name]
    assert np.array_equal(d["x_train"], x_tr) and np.array_equal(d["y_train"], y_tr)
    assert np.array_equal(d["x_test"], x_te) and np.array_equal(d["y_test"], y_te)
    assert not [p for p in cache.rglob("*") if p.name.endswith((".part", ".tmp.npz"))]
    server.close()                                                       # now offline: the cache serves
    splits = data.load_dataset(name, 14, cache_dir=str(cache))
    assert splits["train"][0].shape == (50, 196) and splits["test"][0].shape == (20, 196)
    assert abs(splits["train"][0].mean().item()) < 1e-5                  # z-normalised per dataset
    assert data.available(name, str(cache))


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "cut"])
def test_bad_downloads_leave_nothing_behind(damage, served, tmp_path):
    server, root, _ = served
    f = root / "kmnist" / "t10k-labels-idx1-ubyte.gz"
    raw = f.read_bytes()
    if damage == "corrupted":
        f.write_bytes(raw[:-5] + bytes(5))
    elif damage == "truncated":
        f.write_bytes(raw[:len(raw) // 2])
    url = f"{server.url}/cut/kmnist/" if damage == "cut" else None
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="python experiments/datasets.py fetch kmnist"):
        datasets.fetch_dataset("kmnist", str(cache), base_url=url)
    kept = {p.name for p in cache.rglob("*") if p.is_file()}
    assert "t10k-labels-idx1-ubyte.gz" not in kept and not any(k.endswith(".part") for k in kept)
    assert not (cache / "kmnist.npz").exists() and not data.available("kmnist", str(cache))


def test_the_command_a_missing_dataset_names_fetches_it(served, tmp_path, monkeypatch, capsys):
    # offline, data.py says in one line which command fetches the dataset; that command, run
    # where there is a network (here: the local server), makes it loadable
    monkeypatch.setenv("GPICL_DATA", str(tmp_path / "cache"))
    with pytest.raises(OSError) as missing:
        data.load_dataset("svhn", 7)
    command = str(missing.value).split("`")[1]
    assert "\n" not in str(missing.value) and command == "python experiments/datasets.py fetch svhn"
    datasets.main(command.split()[2:])
    assert capsys.readouterr().out.startswith("svhn -> ")
    assert data.load_dataset("svhn", 7)["test"][0].shape == (20, 49)


@pytest.mark.parametrize("argv, message", [
    (["fetch", "mnist"], "invalid choice: 'mnist'"),                       # shipped, not fetched
    (["get", "svhn"], "invalid choice: 'get'"),
    (["fetch"], "the following arguments are required: names")])
def test_fetch_command_line_errors_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        datasets.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_failed_fetch_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPICL_MIRROR", "http://127.0.0.1:9")             # nothing listens there
    with pytest.raises(SystemExit) as e:
        datasets.main(["fetch", "kmnist", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("datasets.py: error: kmnist: could not fetch kmnist")


def test_mat_reader_agrees_with_scipy(tmp_path):
    sio = pytest.importorskip("scipy.io")                               # optional: only where installed
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)
    y = np.arange(1, 8, dtype=np.float64)[:, None]
    sio.savemat(tmp_path / "a.mat", {"X": x, "y": y}, do_compression=True)
    got = datasets.read_mat(str(tmp_path / "a.mat"))
    assert np.array_equal(got["X"], x) and np.array_equal(got["y"], y)
    (tmp_path / "b.mat").write_bytes(mat_v5({"X": x, "y": y}))
    theirs = sio.loadmat(tmp_path / "b.mat")
    assert np.array_equal(theirs["X"], x) and np.array_equal(theirs["y"], y)


@pytest.mark.slow
def test_missing_dataset_is_one_line_offline(tmp_path):
    # train.py refuses in one line an other dataset that is not fetched, naming this folder's
    # command that fetches it
    env = dict(os.environ, GPICL_DATA=str(tmp_path / "empty"), GPICL_MIRROR="http://127.0.0.1:9")
    tiny = ["--image-size", "7", "--seq-len", "10", "--batch-size", "8", "--width", "16",
            "--n-layer", "1", "--n-head", "2", "--eval-tasks", "2", "--eval-seqs", "4",
            "--threads", "1", "--steps", "1"]
    p = subprocess.run([PY, os.path.join(ROOT, "train.py"), *tiny, "--eval-datasets", "fashion_mnist",
                        "--out-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "python experiments/datasets.py fetch fashion_mnist" in p.stderr
