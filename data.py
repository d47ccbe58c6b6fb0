"""
Base datasets and task augmentation (paper section 2, Figure 1a).

"We generate a large number of tasks by taking an existing supervised learning dataset and
randomly projecting the inputs and permuting the classification labels."

    task id  ->  A in R^{N_x x N_x}, A_ij ~ N(0, 1/N_x),  and  rho, a permutation of the 10 labels
    D_task   =  {(A x_i, rho(y_i))}

The task id alone fixes A and rho, so `num_tasks` = 2^k is an exact knob, and tasks that were
never trained on are simply ids that training can never draw (we use negative ids).

Every random number here comes from a counter-based hash of integers: bits = hash(key, counter).
That makes a task the same on any device, any batch layout and any process (the integers
exactly; the normals up to the last bit of the device's log and cos), lets a whole batch
of tasks be made in a few batched kernels on the GPU, and makes the batch of step s a pure
function of (seed, s), so a resumed or distributed run sees exactly the batches it would have
seen in one piece.

This file imports nothing else from the project.
"""
import argparse
import gzip
import hashlib
import http.client
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
import zlib

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "data")  # mnist.npz and uci_digits.npz travel with the project

# -----------------------------------------------------------------------------
# 1. Counter-based random numbers in plain torch integer ops
#
# splitmix64: word c of key k is mix(k + c * golden). The mixer is a bijection of 64-bit words,
# int64 multiplication wraps modulo 2^64 on CPU and GPU alike (a test checks it), and '>>' is
# arithmetic on int64, so each shift is masked to make it logical.

GOLDEN = 0x9E3779B97F4A7C15 - 2 ** 64            # the odd constants, as signed int64
C1, C2 = 0xBF58476D1CE4E5B9 - 2 ** 64, 0x94D049BB133111EB - 2 ** 64


def _mix64(z):
    z = (z ^ ((z >> 30) & (2 ** 34 - 1))) * C1
    z = (z ^ ((z >> 27) & (2 ** 37 - 1))) * C2
    return z ^ ((z >> 31) & (2 ** 33 - 1))


def hash_key(*parts):
    """Mix ints or int64 tensors (broadcast together) into one well-spread 64-bit key."""
    key = torch.tensor(0x243F6A8885A308D3, dtype=torch.int64)
    for p in parts:
        key = _mix64(key ^ torch.as_tensor(p, dtype=torch.int64))
    return key


def random_bits(key, n):
    """n pseudo-random 64-bit words per key: (...,) int64 -> (..., n) int64."""
    counter = torch.arange(n, device=key.device) * GOLDEN      # wraps, as splitmix64 intends
    return _mix64(key[..., None] + counter)


def _mix64_(z, tmp):
    """_mix64 in place, with a scratch tensor: the same numbers, no allocations."""
    for shift, mult in ((30, C1), (27, C2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp).bitwise_and_(2 ** (64 - shift) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(mult)
    return z


def box_muller(bits):
    """Two standard normals from each 64-bit word, one from each of its 24-bit halves:
    (..., k) int64 -> (..., 2k), the k cosine normals then the k sine normals."""
    u1 = (((bits >> 40) & 0xFFFFFF).float() + 0.5) * 2.0 ** -24     # in (0, 1), never 0
    u2 = (((bits >> 8) & 0xFFFFFF).float() + 0.5) * 2.0 ** -24
    r, theta = torch.sqrt(-2.0 * torch.log(u1)), 2.0 * torch.pi * u2
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)


def _fused_normal(key, n):  # random_normal as one expression, for torch.compile to fuse
    return box_muller(random_bits(key, (n + 1) // 2))[..., :n]


_compiled_normal = None  # set by compile_task_generation()


def compile_task_generation():
    """torch.compile the normals into one kernel (train.py and bench.py --compile). A pass per
    op over N_x^2 numbers per task is what makes task generation costly at 28x28, on a GPU
    most of all. The integer words stay bit-identical; the compiled log/cos may round the
    normals differently in the last bit, as two devices do (a test bounds it)."""
    global _compiled_normal
    _compiled_normal = torch.compile(_fused_normal, dynamic=True)


def random_normal(key, n):
    """n standard normals per key: (...,) int64 -> (..., n), box_muller of words 0..n/2 of key.

    This is the hot loop of task generation (N_x^2 normals per task), so in eager mode it is
    box_muller done in place. On the CPU the words are made in cache-sized pieces (2x faster
    here); the arithmetic is the same, so the numbers are bit-identical to box_muller's."""
    if _compiled_normal is not None:
        return _compiled_normal(key, n)
    half = (n + 1) // 2
    out = torch.empty(*key.shape, 2 * half, device=key.device)
    piece = half if key.device.type != "cpu" else max(64, 2 ** 16 // max(1, key.numel()))
    counter = torch.arange(half, device=key.device) * GOLDEN        # wraps, as splitmix64 intends
    for c0 in range(0, half, piece):
        c1 = min(half, c0 + piece)
        bits = key[..., None] + counter[c0:c1]                       # (..., piece)
        tmp = torch.empty_like(bits)
        _mix64_(bits, tmp)
        # box_muller, op by op
        r = torch.bitwise_right_shift(bits, 40, out=tmp).bitwise_and_(0xFFFFFF).float()
        r.add_(0.5).mul_(2.0 ** -24).log_().mul_(-2.0).sqrt_()
        theta = bits.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).float()
        theta.add_(0.5).mul_(2.0 ** -24).mul_(2.0 * torch.pi)
        torch.cos(theta, out=out[..., c0:c1]).mul_(r)
        torch.mul(r, theta.sin_(), out=out[..., half + c0:half + c1])
    return out[..., :n]


def random_below(bits, high):
    """Integers in [0, high) from 64-bit words (62 bits used; the modulo bias is < 2^-30)."""
    return (bits & (2 ** 62 - 1)) % high


# -----------------------------------------------------------------------------
# 2. Tasks: a projection A and a label permutation rho per task id

STREAM_PROJECTION, STREAM_PERMUTATION, STREAM_SEQUENCE = 1, 2, 3


def task_projection(task_ids, n_x):
    """A for each id: (B,) -> (B, N_x, N_x), entries N(0, 1/N_x), so |A x| ~ |x|."""
    z = random_normal(hash_key(task_ids, STREAM_PROJECTION), n_x * n_x)  # (B, N_x^2)
    return z.view(-1, n_x, n_x).div_(n_x ** 0.5)


def task_permutation(task_ids):
    """rho for each id: (B,) -> (B, 10); class c of the base dataset becomes label rho[c].

    The ranks of 10 distinct hash words form a uniform permutation (ties between 64-bit words
    are vanishingly rare, and a stable sort breaks them the same way everywhere)."""
    bits = random_bits(hash_key(task_ids, STREAM_PERMUTATION), NUM_CLASSES)
    return bits.argsort(dim=-1, stable=True)


def apply_tasks(x, y, task_ids):
    """Project the inputs and relabel the classes of each sequence by its task.
    x (B, T, N_x), y (B, T), task_ids (B,) -> the same shapes."""
    A = task_projection(task_ids, x.shape[-1])               # (B, N_x, N_x)
    x = torch.bmm(x, A.transpose(1, 2))                      # (B, T, N_x), row t is A x_t
    y = torch.gather(task_permutation(task_ids), 1, y)       # (B, T), rho(y_t)
    return x, y


def unseen_task_ids(n, device="cpu"):
    """Ids that training never draws: training ids are >= 0, these are -1, -2, ..., -n."""
    return -1 - torch.arange(n, device=device)


# -----------------------------------------------------------------------------
# 3. Sequences: which task and which examples, a pure function of (seed, step, sequence index)

def sample_sequences(x_all, y_all, seed, step, seq_index, seq_len, num_tasks, bias=0.0,
                     batch_size=None):
    """Build one meta-batch on the device of x_all, with no host round trip.

    x_all (N, N_x), y_all (N,): a preprocessed split. seq_index (B,): the global index of each
    sequence in the meta-batch, so the same sequence comes out whatever the batch is split into
    (ranks, gradient-accumulation steps). num_tasks None draws a fresh task for every sequence.
    bias F: the first round(F * batch_size) sequences of every meta-batch use the fixed task 0
    (the paper's "biasing the data distribution").
    Returns x (B, T, N_x) float, y (B, T) long, task_ids (B,).
    """
    bits = random_bits(hash_key(seed, step, seq_index, STREAM_SEQUENCE), seq_len + 1)  # (B, T+1)
    task_ids = random_below(bits[:, 0], num_tasks or 2 ** 62)                        # (B,)
    if bias > 0:
        fixed = seq_index < round(bias * (batch_size or len(seq_index)))
        task_ids = torch.where(fixed, torch.zeros_like(task_ids), task_ids)
    idx = random_below(bits[:, 1:], len(y_all))                                     # (B, T)
    x, y = x_all[idx], y_all[idx]
    return (*apply_tasks(x, y, task_ids), task_ids)


def task_sequences(x_all, y_all, task_ids, seq_len, seq_index, seed=0):
    """Sequences of given tasks, for evaluation: task_ids, seq_index (B,) -> x (B, T, N_x),
    y (B, T). Sequence seq_index of the set is the same however the set is batched."""
    bits = random_bits(hash_key(seed, task_ids, seq_index, STREAM_SEQUENCE), seq_len)
    idx = random_below(bits, len(y_all))                                             # (B, T)
    return apply_tasks(x_all[idx], y_all[idx], task_ids)


# -----------------------------------------------------------------------------
# 4. Base datasets: raw images -> grayscale, resized, flattened, z-normalised
#
# "Each dataset is z-normalized by its mean and standard deviation across all examples and
# pixels." We take both statistics from the training split, after resizing.

def to_inputs(images, image_size, stats=None):
    """uint8 or float images (N, H, W) or (N, H, W, 3) in [0, 1] or 0..255 -> (N, image_size^2)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 4:  # RGB -> grayscale with the ITU-R 601 luma weights
        x = x @ torch.tensor([0.299, 0.587, 0.114])
    x = x[:, None]                                                   # (N, 1, H, W)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    x = x.flatten(1)                                                 # (N, N_x)
    mean, std = stats if stats is not None else (x.mean().item(), x.std().item())
    return (x - mean) / std, (mean, std)


def random_images(seed=0):
    """The paper's Random dataset: 10 uniform-noise images, one per label."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(NUM_CLASSES, 28, 28, generator=g), np.arange(NUM_CLASSES)


def load_raw(name, cache_dir=None):
    """{'train': (images, labels), 'test': (images, labels)} for a dataset name."""
    if name == "mnist":
        d = np.load(os.path.join(SHIPPED, "mnist.npz"))
        return {"train": (d["x_train"], d["y_train"]), "test": (d["x_test"], d["y_test"])}
    if name == "uci_digits":  # 8x8 images with values 0..16; one split, used for meta-testing only
        d = np.load(os.path.join(SHIPPED, "uci_digits.npz"))
        both = (d["x"].astype(np.float32) / 16.0, d["y"])
        return {"train": both, "test": both}
    if name == "random":
        both = random_images()
        return {"train": both, "test": both}
    if name in DOWNLOADS:
        return load_download(name, cache_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


DATASETS = ["mnist", "uci_digits", "random"]


def load_dataset(name, image_size, device="cpu", cache_dir=None):
    """{'train': (x, y), 'test': (x, y)} preprocessed, on device: x (N, N_x) float, y (N,) long."""
    raw = load_raw(name, cache_dir)
    x_train, stats = to_inputs(raw["train"][0], image_size)
    out = {"train": (x_train, raw["train"][1])}
    out["test"] = (to_inputs(raw["test"][0], image_size, stats)[0], raw["test"][1])
    return {k: (x.to(device), torch.as_tensor(np.asarray(y), dtype=torch.long, device=device))
            for k, (x, y) in out.items()}


# -----------------------------------------------------------------------------
# 5. Datasets fetched on first use: checksum-verified, written atomically, cached
#
# Each file is streamed to 'name.part', its MD5 (the checksum its publishers list) is checked,
# and only then is it renamed into place; the converted arrays are cached as one .npz, written
# the same way. An interrupted download never leaves a file behind that looks complete.

DOWNLOADS = {  # name: (base URL, {file: md5})
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
DATASETS += list(DOWNLOADS)


def default_cache_dir():  # $GPICL_DATA, or ~/.cache/gpicl
    return os.environ.get("GPICL_DATA", os.path.join(os.path.expanduser("~"), ".cache", "gpicl"))


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
    x = d["X"].transpose(3, 0, 1, 2)                                # (32, 32, 3, N) -> (N, 32, 32, 3)
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


def fetch_dataset(name, cache_dir=None, base_url=None):
    """Download (if needed), verify and convert a dataset; returns the path of its .npz."""
    cache_dir = cache_dir or default_cache_dir()
    out = os.path.join(cache_dir, f"{name}.npz")
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
                      f"`python data.py fetch {name}` and copy {cache_dir} here") from None
    arrays = convert(name, paths)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return out


def load_download(name, cache_dir=None):
    d = np.load(fetch_dataset(name, cache_dir))
    return {"train": (d["x_train"], d["y_train"]), "test": (d["x_test"], d["y_test"])}


def available(name, cache_dir=None):
    """Whether a dataset can be loaded without a network."""
    return name not in DOWNLOADS or os.path.exists(os.path.join(cache_dir or default_cache_dir(),
                                                                f"{name}.npz"))


# -----------------------------------------------------------------------------
# 6. The command line: python data.py fetch NAME..., on a machine with a network

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump (as train.py's)
        message = message.replace("\n", "\\n")  # a newline in a flag's value: still one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_parser():
    p = Parser(prog="data.py", description="Fetch the datasets that are not shipped.")
    p.add_argument("command", choices=["fetch"])
    p.add_argument("names", nargs="+", choices=list(DOWNLOADS))
    p.add_argument("--data-dir", default=None,
                   help="cache folder (default: $GPICL_DATA or ~/.cache/gpicl)")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    d = default_cache_dir() if args.data_dir is None else args.data_dir
    try:  # the cache folder, made before any download starts
        os.makedirs(d, exist_ok=True)
    except (OSError, ValueError) as e:  # a file in its place, no permission, a NUL in the name
        p.error(f"--data-dir {d!r} is not a folder that can be used "
                f"({getattr(e, 'strerror', None) or e})")
    for n in args.names:
        try:
            print(n, "->", fetch_dataset(n, d))
        except (OSError, ValueError) as e:  # the network, the disk, or a file that does not convert
            p.exit(1, f"data.py: error: {n}: {(str(e).splitlines() or [type(e).__name__])[0]}\n")


if __name__ == "__main__":
    main()
