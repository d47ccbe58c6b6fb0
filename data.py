"""
Base datasets and task augmentation (paper section 2, Figure 1a).

The paper's task augmentation, paraphrased: many tasks are made from one existing supervised
dataset by randomly projecting its inputs and permuting its classification labels.

    task id  ->  A in R^{N_x x N_x}, A_ij ~ N(0, 1/N_x),  and  rho, a permutation of the 10 labels
    D_task   =  {(A x_i, rho(y_i))}

The task id alone fixes A and rho, so `num_tasks` = 2^k is an exact knob (training draws ids
from [0, num_tasks); FRESH tasks are ids drawn from 62 random bits), and tasks that were never
trained on are simply ids that training can never draw (we use negative ids).

The chapter: 1. tasks, 2. sequences and the tokens a learner reads, 3. base datasets and their
preprocessing; then the machinery, 4. the counter-based random numbers everything above draws
from. It imports nothing else from the project.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
FRESH = 2 ** 62  # num_tasks for "a new task every sequence": ids drawn from 62 random bits, so
#                  practically never the same task twice (the paper's largest count is 2^25)

# -----------------------------------------------------------------------------
# 1. Tasks: a projection A and a label permutation rho per task id
#
# hash_key, random_bits and random_normal (section 4) turn integers into random numbers: the same
# (task id, stream) gives the same numbers every time, on any device.

STREAM_PROJECTION, STREAM_PERMUTATION, STREAM_SEQUENCE, STREAM_BIAS = 1, 2, 3, 6


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


IDENTITY_TASK = -2 ** 63  # the base dataset as it is: no projection, no relabelling (never drawn)


def apply_tasks(x, y, task_ids, permute=None):
    """Project the inputs and relabel the classes of each sequence by its task.
    x (B, T, N_x), y (B, T), task_ids (B,) -> the same shapes. permute (B,) bool: where False
    the labels keep the identity permutation while the projection stays the task's (the bias)."""
    identity = task_ids == IDENTITY_TASK                                 # (B,)
    A = task_projection(task_ids, x.shape[-1])                           # (B, N_x, N_x)
    A = torch.where(identity[:, None, None], torch.eye(x.shape[-1], device=x.device), A)
    x = torch.bmm(x, A.transpose(1, 2))                              # (B, T, N_x), row t is A x_t
    keep = identity if permute is None else identity | ~permute          # (B,) identity labels
    rho = task_permutation(task_ids)                                     # (B, 10)
    rho = torch.where(keep[:, None], torch.arange(NUM_CLASSES, device=rho.device), rho)
    y = torch.gather(rho, 1, y)                                          # (B, T), rho(y_t)
    return x, y


def keeps_identity_labels(task_ids, bias):
    """The bias (paper 4.3) as the authors draw it: each task id keeps the identity labels with
    probability `bias`, from a draw of its own key, so an id is identity-labelled in every batch
    or in none (mnist_projections.py: `bernoulli(key_mask, permute_labels_prob)`, key_mask split
    from the id's key). (B,) -> (B,) bool. Evaluation never biases: it passes no mask."""
    u = ((random_bits(hash_key(task_ids, STREAM_BIAS), 1)[..., 0] >> 40) & 0xFFFFFF).float()
    return u * 2.0 ** -24 < bias                                         # uniform in [0, 1)


def unseen_task_ids(n, device="cpu"):
    """Ids that training never draws: training ids are >= 0, these are -1, -2, ..., -n."""
    return -1 - torch.arange(n, device=device)


# -----------------------------------------------------------------------------
# 2. Sequences: which task and which examples, a pure function of (seed, step, sequence index),
#    and the tokens the learner reads them as

STREAM_TASK, STREAM_RANDOM_IMAGES = 4, 5


def draw_examples(key, seq_len, n):
    """seq_len indices into a dataset of n examples per key: (B,) -> (B, T), without replacement
    as the authors' shuffled stream (data.py, `ds.repeat().shuffle(...).batch(sequence_length)`).

    The first T distinct values of 2T uniform draws are a uniform draw without replacement; with
    n >= 2T there are T distinct among 2T draws all but always (n = 60,000, T = 100: 0.3 repeats
    expected among the 2T). A dataset smaller than that (the Random dataset's 10 images) is
    drawn with replacement, as it must be."""
    if n < 2 * seq_len:
        return random_below(random_bits(key, seq_len), n)
    draws = random_below(random_bits(key, 2 * seq_len), n)                 # (B, 2T)
    value, order = draws.sort(dim=-1, stable=True)         # equal values: the earliest comes first
    repeat = torch.zeros_like(draws, dtype=torch.bool)
    repeat.scatter_(1, order[:, 1:], value[:, 1:] == value[:, :-1])       # (B, 2T) seen before
    first = repeat.to(torch.uint8).argsort(dim=-1, stable=True)[:, :seq_len]  # distinct, in order
    return draws.gather(1, first)                                         # (B, T)


class RandomImages:
    """The paper's Random dataset, after the authors' (data.py, RandomDataset): for every task,
    10 new images of uniform noise at the target size, one per label. It stands where a dataset's
    inputs x_all (N, N_x) stand; `examples` draws the images of each sequence's own task."""

    def __init__(self, n_x, device="cpu"):
        self.n_x, self.device = n_x, torch.device(device)

    def __len__(self):
        return NUM_CLASSES

    def images(self, task_ids):
        """(B,) -> (B, 10, N_x): uniform(0, 1) pixels, z-normalised with the uniform's own mean
        1/2 and std 1/sqrt(12). The authors z-normalise each batch by its own statistics (close
        to these), and their images are a fixed 14x14 drawn per batch slot; ours are drawn at
        the target size per task id (ours: the same task, the same images)."""
        bits = random_bits(hash_key(task_ids, STREAM_RANDOM_IMAGES).to(self.device),
                           NUM_CLASSES * self.n_x)
        u = ((bits >> 40) & 0xFFFFFF).float().add_(0.5).mul_(2.0 ** -24)  # (B, 10 N_x) in (0, 1)
        return ((u - 0.5) * 12 ** 0.5).view(-1, NUM_CLASSES, self.n_x)


def examples(x_all, idx, task_ids):
    """The inputs of each sequence: x_all (N, N_x), idx (B, T) -> (B, T, N_x)."""
    if isinstance(x_all, RandomImages):
        return torch.gather(x_all.images(task_ids), 1, idx[..., None].expand(-1, -1, x_all.n_x))
    return x_all[idx]


def sample_sequences(x_all, y_all, seed, step, seq_index, seq_len, num_tasks, bias=0.0,
                     seqs_per_task=1):
    """Build one meta-batch on the device of x_all, with no host round trip.

    x_all (N, N_x), y_all (N,): a preprocessed split. seq_index (B,): the global index of each
    sequence in the meta-batch, so the same sequence comes out whatever the batch is split into
    (ranks, gradient-accumulation steps). Task ids are drawn uniformly from [0, num_tasks);
    num_tasks=FRESH gives every task slot a new task.

    Task slots (the authors' `task_sample_size` x `train_batch_size`): sequences
    seqs_per_task * s ... seqs_per_task * (s + 1) - 1 share slot s, and so one task.
    bias F: a task id keeps the identity label permutation with probability F, once and for
    all (keeps_identity_labels), its projection random: the paper's "fixed permutation for a
    fraction of each batch", drawn as the authors draw it (`permute_labels_prob` = 1 - F).
    Returns x (B, T, N_x) float, y (B, T) long, task_ids (B,).
    """
    slot = seq_index // seqs_per_task                                               # (B,)
    task_bits = random_bits(hash_key(seed, step, slot, STREAM_TASK), 1)[:, 0]      # (B,)
    task_ids = random_below(task_bits, num_tasks)                                   # (B,)
    permute = ~keeps_identity_labels(task_ids, bias)                                # (B,)
    idx = draw_examples(hash_key(seed, step, seq_index, STREAM_SEQUENCE), seq_len, len(y_all))
    x, y = examples(x_all, idx, task_ids), y_all[idx]                    # (B, T, N_x), (B, T)
    return (*apply_tasks(x, y, task_ids, permute), task_ids)


def make_tokens(x, y):
    """What the learner reads (paper section 2): token t = [A x_t ; onehot(rho(y_{t-1}))], zeros
    in place of the label at t = 0. x (B, T, N_x), y (B, T) -> tokens (B, T, N_x + 10).
    Position t carries the label of example t-1, never its own: the learner predicts y_t there."""
    y_prev = F.one_hot(y[:, :-1], NUM_CLASSES).to(x.dtype)          # (B, T-1, 10)
    y_prev = F.pad(y_prev, (0, 0, 1, 0))                             # (B, T, 10), zeros at t = 0
    return torch.cat([x, y_prev], dim=-1)                            # (B, T, N_x + 10)


def task_sequences(x_all, y_all, task_ids, seq_len, seq_index, seed=0, identity_labels=None):
    """Sequences of given tasks, for evaluation: task_ids, seq_index (B,) -> x (B, T, N_x),
    y (B, T). Sequence seq_index of the set is the same however the set is batched.
    identity_labels (B,) bool: where True the task keeps the identity labels, as a task id
    that the bias labelled so in training (keeps_identity_labels); None: every task permutes."""
    seq_index = torch.as_tensor(seq_index, device=task_ids.device)  # an index made on the CPU
    idx = draw_examples(hash_key(seed, task_ids, seq_index, STREAM_SEQUENCE), seq_len, len(y_all))
    permute = None if identity_labels is None else ~identity_labels
    return apply_tasks(examples(x_all, idx, task_ids), y_all[idx], task_ids, permute)


# -----------------------------------------------------------------------------
# 3. Base datasets: raw images -> grayscale, resized, flattened, z-normalised
#
# "Each dataset is z-normalized by its mean and standard deviation across all examples and
# pixels." We take both statistics from the training split, after resizing.

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "data")  # mnist.npz and uci_digits.npz travel with the project
# the other datasets of the paper's Table 1: `python experiments/datasets.py fetch NAME` downloads
# one (checksummed) into the cache folder, as NAME.npz with x_train, y_train, x_test, y_test
FETCHED = ("fashion_mnist", "kmnist", "cifar10", "svhn")
DATASETS = ["mnist", "uci_digits", "random", *FETCHED]


def default_cache_dir():  # $GPICL_DATA, or ~/.cache/gpicl
    return os.environ.get("GPICL_DATA", os.path.join(os.path.expanduser("~"), ".cache", "gpicl"))


def available(name, cache_dir=None):
    """Whether a dataset can be loaded here, without a network."""
    return name not in FETCHED or os.path.exists(fetched_path(name, cache_dir))


def fetched_path(name, cache_dir=None):
    return os.path.join(cache_dir or default_cache_dir(), f"{name}.npz")


def to_inputs(images, image_size, stats=None):
    """uint8 or float images (N, H, W) or RGB (N, H, W, 3) -> (N, N_x), z-normalised.
    RGB becomes grayscale (ITU-R 601 luma; ours: the authors tile grayscale to three channels,
    `channel_expand`, so one learner reads MNIST and CIFAR-10 alike), N_x = image_size^2."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 4:
        x = x @ torch.tensor([0.299, 0.587, 0.114])                  # (N, H, W)
    x = x[:, None]                                                   # (N, 1, H, W)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    x = x.flatten(1)                                                 # (N, N_x)
    mean, std = stats if stats is not None else (x.mean().item(), x.std().item())
    return (x - mean) / std, (mean, std)


def load_raw(name, cache_dir=None):
    """{'train': (images, labels), 'test': (images, labels)} for a dataset name."""
    if name == "mnist":
        d = np.load(os.path.join(SHIPPED, "mnist.npz"))
        return {"train": (d["x_train"], d["y_train"]), "test": (d["x_test"], d["y_test"])}
    if name == "uci_digits":  # 8x8 images with values 0..16; one split, used for meta-testing only
        d = np.load(os.path.join(SHIPPED, "uci_digits.npz"))
        both = (d["x"].astype(np.float32) / 16.0, d["y"])
        return {"train": both, "test": both}
    if name not in FETCHED:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not available(name, cache_dir):
        raise OSError(f"{name} is not downloaded; on a machine with a network run "
                      f"`python experiments/datasets.py fetch {name}`")
    d = np.load(fetched_path(name, cache_dir))
    return {"train": (d["x_train"], d["y_train"]), "test": (d["x_test"], d["y_test"])}


def load_dataset(name, image_size, device="cpu", cache_dir=None):
    """{'train': (x, y), 'test': (x, y)} preprocessed, on device: x (N, N_x) float, y (N,) long.
    For "random", x is RandomImages: new images for every task."""
    if name == "random":
        x = RandomImages(image_size ** 2, device)
        y = torch.arange(NUM_CLASSES, device=device)
        return {"train": (x, y), "test": (x, y)}
    raw = load_raw(name, cache_dir)
    x_train, stats = to_inputs(raw["train"][0], image_size)
    out = {"train": (x_train, raw["train"][1])}
    out["test"] = (to_inputs(raw["test"][0], image_size, stats)[0], raw["test"][1])
    return {k: (x.to(device), torch.as_tensor(np.asarray(y), dtype=torch.long, device=device))
            for k, (x, y) in out.items()}


# -----------------------------------------------------------------------------
# 4. Machinery: counter-based random numbers
#
# Every random number above comes from a hash of integers: word c of key k is mix(k + c * golden),
# splitmix64 (Steele, Lea and Flood 2014), in plain torch int64 ops. Why not torch.Generator: a
# hash makes a task the same on any device, any batch layout and any process (the integers
# exactly; the normals up to the last bit of the device's log and cos), a whole batch of tasks is
# a few batched kernels with no per-task seeding, and the batch of step s is a pure function of
# (seed, s), so a resumed or distributed run sees exactly the batches it would have seen in one
# piece. A test pins the words to a plain-Python splitmix64.
#
# The mixer is a bijection of 64-bit words; int64 multiplication wraps modulo 2^64 on CPU and GPU
# alike (the pinned words would differ if it did not), and '>>' is arithmetic on int64, so each
# shift is masked to be logical.

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


def box_muller(bits):
    """Two standard normals (r cos theta, r sin theta) from two 24-bit fields of each 64-bit
    word (bits 40-63 and 8-31): (..., k) int64 -> (..., 2k), the k cosine normals, then the k
    sine normals."""
    u1 = (((bits >> 40) & 0xFFFFFF).float() + 0.5) * 2.0 ** -24     # in (0, 1), never 0
    u2 = (((bits >> 8) & 0xFFFFFF).float() + 0.5) * 2.0 ** -24
    r, theta = torch.sqrt(-2.0 * torch.log(u1)), 2.0 * torch.pi * u2
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)


def random_normal(key, n):
    """n standard normals per key: (...,) int64 -> (..., n), from words 0 .. ceil(n/2) - 1."""
    return box_muller(random_bits(key, (n + 1) // 2))[..., :n]


def random_below(bits, high):
    """Integers in [0, high) from 64-bit words (62 bits used; the modulo bias is < 2^-30)."""
    return (bits & (2 ** 62 - 1)) % high
