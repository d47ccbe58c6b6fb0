"""
The other datasets of the paper's Table 1, downloaded once: FashionMNIST, KMNIST, CIFAR10, SVHN.

    python experiments/datasets.py fetch fashion_mnist kmnist cifar10 svhn   # where there is a network
    python experiments/datasets.py fetch svhn --data-dir /somewhere          # default: $GPICL_DATA

MNIST and UCI digits travel with the project (data/); these do not. Each is fetched from its
canonical source (or $GPICL_MIRROR, which serves {mirror}/{name}/{file}), checksummed and
converted to one {cache}/{name}.npz holding x_train, y_train, x_test, y_test as uint8 arrays,
the file data.load_dataset reads. Each file is streamed to 'name.part', its MD5 (the checksum
its publishers list) is checked, and only then is it renamed into place; the .npz is written the
same way. An interrupted download never leaves a file behind that looks complete.
"""
import gzip
import hashlib
import http.client
import os
import pickle
import shutil
import struct
import sys
import tarfile
import urllib.request
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the four modules live one folder up
import data
import train

DOWNLOADS = {  # name: (base URL, {file: md5}), for every name in data.FETCHED
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "kmnist": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/", {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134"}),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
    "svhn": ("http://ufldl.stanford.edu/housenumbers/", {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}),
}

# -----------------------------------------------------------------------------
# Download, verified


def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url, path, checksum):
    """Download url to path unless a verified copy is already there."""
    if os.path.exists(path) and md5(path) == checksum:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except http.client.HTTPException as e:  # a connection cut mid-transfer
            raise IOError(f"{url}: download interrupted ({type(e).__name__})") from None
        if md5(part) != checksum:
            raise IOError(f"{url} does not match its checksum (corrupted or truncated download); "
                          "nothing was kept, run again to retry")
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return path

# -----------------------------------------------------------------------------
# The publishers' file formats -> uint8 arrays


def read_idx(path):
    """The MNIST family's IDX format (gzipped): big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_cifar10(path):
    """CIFAR-10's python tarball: pickled batches of (N, 3072) uint8 rows, channels first."""
    parts = {"train": [], "test": []}
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = os.path.basename(member.name)
            split = ("train" if name.startswith("data_batch") else
                     "test" if name == "test_batch" else None)
            if split:
                d = pickle.load(tar.extractfile(member), encoding="bytes")
                x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                parts[split].append((x, np.asarray(d[b"labels"], np.uint8)))
    return {k: tuple(np.concatenate(a) for a in zip(*v)) for k, v in parts.items()}


MAT_TYPES = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16, 5: np.int32, 6: np.uint32,
             7: np.float32, 9: np.float64, 12: np.int64, 13: np.uint64}


def read_mat(path):
    """The numeric arrays of a MATLAB v5 .mat file (SVHN's format), as {name: array}.
    Enough of the format for SVHN, so that scipy is not needed."""
    raw = open(path, "rb").read()
    if raw[126:128] != b"IM":
        raise ValueError(f"{path} is not a little-endian MATLAB v5 file")

    def element(buf, pos, pad=True):  # -> (type, data, next position)
        word = struct.unpack_from("<I", buf, pos)[0]
        if word >> 16:  # small element: type and size share one word, data in the next 4 bytes
            return word & 0xFFFF, buf[pos + 4:pos + 4 + (word >> 16)], pos + 8
        n = struct.unpack_from("<I", buf, pos + 4)[0]
        return word, buf[pos + 8:pos + 8 + n], pos + 8 + n + (-n % 8 if pad else 0)

    arrays, pos = {}, 128
    while pos < len(raw):
        kind, body, pos = element(raw, pos, pad=False)  # top-level elements are not padded
        if kind == 15:  # miCOMPRESSED: a zlib stream holding one element
            kind, body, _ = element(zlib.decompress(body), 0)
        if kind != 14:  # only miMATRIX elements hold arrays
            continue
        _, _, p = element(body, 0)                                  # array flags
        _, dims, p = element(body, p)
        _, name, p = element(body, p)
        kind, values, _ = element(body, p)
        dims = np.frombuffer(dims, np.int32)
        arrays[name.decode()] = np.frombuffer(values, MAT_TYPES[kind]).reshape(dims, order="F")
    return arrays


def read_svhn(path):
    d = read_mat(path)
    x = d["X"].transpose(3, 0, 1, 2)                     # (32, 32, 3, N) -> (N, 32, 32, 3)
    y = d["y"].reshape(-1).astype(np.uint8) % 10                     # the digit 0 is labelled 10
    return x, y


def convert(name, paths):
    """Downloaded files -> {'x_train', 'y_train', 'x_test', 'y_test'} uint8 arrays."""
    if name in ("fashion_mnist", "kmnist"):
        x_tr, y_tr, x_te, y_te = (read_idx(paths[f]) for f in DOWNLOADS[name][1])
        return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    if name == "cifar10":
        d = read_cifar10(paths["cifar-10-python.tar.gz"])
        return dict(x_train=d["train"][0], y_train=d["train"][1],
                    x_test=d["test"][0], y_test=d["test"][1])
    (x_tr, y_tr), (x_te, y_te) = (read_svhn(paths[f]) for f in DOWNLOADS[name][1])
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)

# -----------------------------------------------------------------------------
# A dataset, fetched once into the cache data.load_dataset reads


def fetch_dataset(name, cache_dir=None, base_url=None):
    """Download (if needed), verify and convert a dataset; returns the path of its .npz."""
    cache_dir = cache_dir or data.default_cache_dir()
    out = data.fetched_path(name, cache_dir)  # where data.load_raw reads it
    if os.path.exists(out):
        return out
    url, files = DOWNLOADS[name]
    mirror = os.environ.get("GPICL_MIRROR")  # a mirror serves {mirror}/{name}/{file}
    url = base_url or (f"{mirror.rstrip('/')}/{name}/" if mirror else url)
    try:
        paths = {f: fetch(url + f, os.path.join(cache_dir, name, f), md5sum)
                 for f, md5sum in files.items()}
    except OSError as e:  # URLError, timeouts and checksum failures alike
        raise OSError(f"could not fetch {name} ({e}); on a machine with a network run "
                      f"`python experiments/datasets.py fetch {name}` and copy {cache_dir} here") from None
    arrays = convert(name, paths)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return out


def get_parser():
    p = train.Parser(prog="datasets.py", description="Fetch the datasets that are not shipped.")
    p.add_argument("command", choices=["fetch"])
    p.add_argument("names", nargs="+", choices=list(DOWNLOADS))
    p.add_argument("--data-dir", default=None,
                   help="cache folder (default: $GPICL_DATA or ~/.cache/gpicl)")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    d = data.default_cache_dir() if args.data_dir is None else args.data_dir
    try:  # the cache folder, made before any download starts
        os.makedirs(d, exist_ok=True)
    except (OSError, ValueError) as e:  # a file in its place, no permission, a NUL in the name
        p.error(f"--data-dir {d!r} is not a folder that can be used "
                f"({getattr(e, 'strerror', None) or e})")
    for n in args.names:
        try:
            print(n, "->", fetch_dataset(n, d))
        except (OSError, ValueError) as e:  # the network, the disk, or a file that does not convert
            p.exit(1, f"datasets.py: error: {n}: {(str(e).splitlines() or [type(e).__name__])[0]}\n")


if __name__ == "__main__":
    main()
