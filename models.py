"""
The learners (paper sections 2 and 4.2).

"We meta-train a black-box sequence model on the sequences ... it receives the input x_t and the
label of the previous input y_{t-1} and predicts y_t." Every learner here has the same shape:

    model(tokens)                tokens (B, T, N_x + 10)  ->  logits (B, T, 10)
    model.state_size(seq_len)    floats that carry the past into the next prediction
    model.carried_state(tokens)  those very tensors, so a test can count them

and every learner is causal: the output at t depends on tokens 0..t only.

"The state size of a learner is the number of floats that can carry information from one
time step to the next" (section 4.2). For an LSTM that is h and c of every layer; for a
Transformer, the keys and values of every layer and every position: the KV cache. The paper's
finding is that in-context learning ability follows this state size, not the parameter count,
so `--state-size S` builds a learner whose state is exactly S.

This file imports nothing else from the project.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# The interface

class Learner(nn.Module):
    """The interface every learner shares. A learner implements run(tokens) -> (logits, the
    tensors it carries from step to step) and state_size_of(**config) -> their size."""
    defaults = {}

    def forward(self, tokens):                                       # (B, T, n_in) -> (B, T, 10)
        return self.run(tokens)[0]

    def carried_state(self, tokens):
        return self.run(tokens)[1]

    def state_size(self, seq_len):
        return self.state_size_of(**{**self.cfg, "seq_len": seq_len})

    @staticmethod
    def valid_width(**_):
        return True


# -----------------------------------------------------------------------------
# The Transformer: a GPT-style causal decoder over the example tokens

class SelfAttention(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):                                            # x (B, T, d)
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)                        # each (B, T, d)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)
                   for t in (q, k, v))                               # each (B, H, T, d/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d/H)
        y = y.transpose(1, 2).reshape(B, T, d)                       # (B, T, d)
        return self.proj(y), (k, v)                                  # k, v: this layer's KV cache


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, width, n_head):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, n_head)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        a, kv = self.attn(self.ln1(x))
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


def trunc_normal(p, std):
    """Normal within two standard deviations, rescaled so that the std is std (as Haiku)."""
    nn.init.trunc_normal_(p, std=std / 0.87962566, a=-2 * std / 0.87962566, b=2 * std / 0.87962566)


class Transformer(Learner):
    defaults = dict(width=256, n_layer=4, n_head=8)

    def __init__(self, n_in, n_out, seq_len, width=256, n_layer=4, n_head=8):
        super().__init__()
        self.cfg = dict(width=width, n_layer=n_layer)
        if width % n_head:
            raise ValueError(f"width {width} is not a multiple of n_head {n_head}")
        self.embed = nn.Linear(n_in, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))        # learned positions
        self.blocks = nn.ModuleList(Block(width, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out)
        # Initialisation as in the official code (Haiku's fan-in variance scaling), not GPT-2's
        # N(0, 0.02): attention and MLP weights std sqrt(2 / (n_layer fan_in)), input and output
        # layers std 1/sqrt(fan_in), positions std 0.1. On small models the 0.02 start leaves the
        # attention logits ~100x too small, and meta-training sat at chance for >6,000 steps.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2 and name != "pos":
                scale = 1.0 if name.startswith(("embed", "head")) else 2.0 / n_layer
                trunc_normal(p, math.sqrt(scale / p.shape[1]))
        trunc_normal(self.pos, 0.1)

    def run(self, tokens):                                           # tokens (B, T, n_in)
        T = tokens.shape[1]
        if T > len(self.pos):
            raise ValueError(f"sequence of {T} tokens is longer than the {len(self.pos)} "
                             "positions this Transformer was built for")
        x = self.embed(tokens) + self.pos[:T]                        # (B, T, d)
        cache = []
        for block in self.blocks:
            x, kv = block(x)
            cache.extend(kv)
        return self.head(self.ln_f(x)), cache                        # (B, T, 10)

    @staticmethod
    def state_size_of(width, seq_len, n_layer, **_):
        return 2 * n_layer * seq_len * width                         # keys and values, every layer

    @staticmethod
    def valid_width(width, n_head, **_):
        return width % n_head == 0


# -----------------------------------------------------------------------------
# The LSTM: an input MLP, then an LSTM (as in the official code), then a linear read-out

class LSTM(Learner):
    defaults = dict(width=256, n_layer=1)

    def __init__(self, n_in, n_out, seq_len, width=256, n_layer=1, n_head=None):
        super().__init__()
        self.cfg = dict(width=width, n_layer=n_layer)
        self.encoder = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(),
                                     nn.Linear(width, width), nn.ReLU())
        self.lstm = nn.LSTM(width, width, num_layers=n_layer, batch_first=True)
        self.head = nn.Linear(width, n_out)

    def run(self, tokens):                                           # tokens (B, T, n_in)
        h, (h_n, c_n) = self.lstm(self.encoder(tokens))             # h (B, T, w); h_n, c_n (L, B, w)
        return self.head(h), [h_n, c_n]

    @staticmethod
    def state_size_of(width, n_layer, **_):
        return 2 * n_layer * width                                   # h and c of every layer


# -----------------------------------------------------------------------------
# The outer-product LSTM: a matrix-valued cell per head, so a large state from few parameters
#
# Gates are outer products: i, g, f = (tanh(k1) * scale) (x) tanh(k2), each h x h per head;
# C = sigmoid(f + 1) * C_prev + sigmoid(i) * g; the hidden state reads C with a query q.

class OuterLSTMCell(nn.Module):
    def __init__(self, n_in, width, n_head):
        super().__init__()
        self.width, self.n_head = width, n_head
        self.gates = nn.Linear(n_in + n_head * width, 8 * width * n_head)
        self.key_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x, state):                                     # x (B, n_in)
        h_prev, c_prev = state                                       # (B, H*w), (B, H, w, w)
        B, w, H = x.shape[0], self.width, self.n_head
        gated = self.gates(torch.cat([x, h_prev], -1)).view(B, H, 8 * w)
        k1, k2, q, o = gated.split([3 * w, 3 * w, w, w], dim=-1)
        k1 = torch.tanh(k1.view(B, H, 3, w)) * F.softplus(self.key_scale)
        k2 = torch.tanh(k2.view(B, H, 3, w))
        i, g, f = torch.einsum("bhki,bhkj->kbhij", k1, k2)           # each (B, H, w, w)
        c = torch.sigmoid(f + 1) * c_prev + torch.sigmoid(i) * g     # forget bias 1
        read = torch.einsum("bhij,bhi->bhj", c, q)                   # (B, H, w)
        h = (torch.sigmoid(o) * torch.tanh(read)).flatten(1)         # (B, H*w)
        return h, (h, c)


class OuterLSTM(Learner):
    """The LSTM learner with its LSTM replaced by outer-product cells (state H w^2 + H w)."""
    defaults = dict(width=32, n_head=4)

    def __init__(self, n_in, n_out, seq_len, width=32, n_head=4, n_layer=None):
        super().__init__()
        self.cfg = dict(width=width, n_head=n_head)
        self.width, self.n_head = width, n_head
        hidden = width * n_head
        self.encoder = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU())
        self.cell = OuterLSTMCell(hidden, width, n_head)
        self.head = nn.Linear(hidden, n_out)

    def run(self, tokens):                                           # tokens (B, T, n_in)
        B, T, _ = tokens.shape
        e = self.encoder(tokens)                                     # (B, T, H*w)
        state = (e.new_zeros(B, self.n_head * self.width),
                 e.new_zeros(B, self.n_head, self.width, self.width))
        outs = []
        for t in range(T):
            out, state = self.cell(e[:, t], state)
            outs.append(out)
        return self.head(torch.stack(outs, 1)), list(state)         # (B, T, 10)

    @staticmethod
    def state_size_of(width, n_head, **_):
        return n_head * width * width + n_head * width               # C and h


# -----------------------------------------------------------------------------
# The fast-weight memory: an LSTM that writes key-value pairs into a matrix by the delta rule
#
# width m: a memory of m x m^2 fast weights beside an LSTM of 4m units (the official code's
# 16 and 64). Keys are outer products k1 (x) k2; a write replaces the value stored under its key.

class FastWeightMemory(Learner):
    defaults = dict(width=16)

    def __init__(self, n_in, n_out, seq_len, width=16, n_layer=None, n_head=None):
        super().__init__()
        self.cfg = dict(width=width)
        self.width, slow = width, 4 * width
        self.lstm = nn.LSTMCell(n_in, slow)
        self.write_head = nn.Linear(slow, 3 * width + 1)
        self.read_head = nn.Linear(slow, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=True, bias=False)
        self.read_proj = nn.Linear(width, slow)
        self.head = nn.Linear(slow, n_out)

    def run(self, tokens):                                           # tokens (B, T, n_in)
        B, T, _ = tokens.shape
        m = self.width
        h = c = tokens.new_zeros(B, 4 * m)
        memory = tokens.new_zeros(B, m, m * m)                       # (B, m, m^2)
        key = lambda k1, k2: torch.einsum("bi,bj->bij", k1, k2).reshape(B, m * m)
        outs = []
        for t in range(T):
            h, c = self.lstm(tokens[:, t], (h, c))                   # (B, 4m)
            w = self.write_head(h)
            beta = torch.sigmoid(w[:, -1])                           # (B,) write strength
            k1, k2, v = torch.tanh(w[:, :-1]).split(m, dim=-1)
            k = key(k1, k2)                                          # (B, m^2)
            v_old = torch.einsum("bmn,bn->bm", memory, k)
            memory = memory + beta[:, None, None] * torch.einsum("bm,bn->bmn", v - v_old, k)
            r1, r2 = torch.tanh(self.read_head(h)).split(m, dim=-1)
            read = torch.einsum("bmn,bn->bm", memory, key(r1, r2))  # (B, m)
            outs.append(self.head(h + self.read_proj(self.norm(read))))
        return torch.stack(outs, 1), [h, c, memory]                 # (B, T, 10)

    @staticmethod
    def state_size_of(width, **_):
        return 2 * 4 * width + width ** 3                            # LSTM h, c and the memory


# -----------------------------------------------------------------------------
# The MLP: one example at a time, no context, so it cannot learn in context (a control)

class MLP(Learner):
    defaults = dict(width=256)

    def __init__(self, n_in, n_out, seq_len, width=256, n_layer=None, n_head=None):
        super().__init__()
        self.cfg = dict(width=width)
        self.n_x = n_in - n_out
        self.net = nn.Sequential(nn.Linear(self.n_x, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, n_out))

    def run(self, tokens):
        return self.net(tokens[..., :self.n_x]), []                  # the labels are never read

    @staticmethod
    def state_size_of(**_):
        return 0


# -----------------------------------------------------------------------------
# VSML (Kirsch and Schmidhuber 2021): every weight of an N_x -> 10 layer is a tiny LSTM
#
# All N_x * 10 LSTMs share their parameters. Input unit i sends x_i forward, output unit j
# receives its label bit as a backward message; each LSTM (i, j) reads both, ticks twice, and
# sends messages of size 8 on: averaged over i they are the outputs (logits: element 0),
# averaged over j they come back to the inputs at the next step.

class VSML(Learner):
    defaults = dict(width=16)

    def __init__(self, n_in, n_out, seq_len, width=16, n_layer=None, n_head=None, msg=8, ticks=2):
        super().__init__()
        self.cfg = dict(width=width, n_in=n_in, n_out=n_out, msg=msg)
        self.n_x, self.n_out, self.width, self.msg, self.ticks = n_in - n_out, n_out, width, msg, ticks
        self.cell = nn.LSTMCell(2 * (msg + 1), width)
        self.fwd = nn.Linear(width, msg)
        self.bwd = nn.Linear(width, msg)

    def run(self, tokens):                                           # tokens (B, T, N_x + 10)
        B, T, _ = tokens.shape
        n_x, n_out, msg = self.n_x, self.n_out, self.msg
        x, y_prev = tokens[..., :n_x, None], tokens[..., n_x:, None]  # (B, T, N_x, 1), (B, T, 10, 1)
        h = c = tokens.new_zeros(B * n_x * n_out, self.width)
        fwd_msg = tokens.new_zeros(B, n_out, msg)                    # last step's, to the outputs
        bwd_msg = tokens.new_zeros(B, n_x, msg)                      # last step's, to the inputs
        outs = []
        for t in range(T):
            into_i = torch.cat([bwd_msg, x[:, t]], -1)               # (B, N_x, 9)
            into_j = torch.cat([fwd_msg, y_prev[:, t]], -1)          # (B, 10, 9)
            inp = torch.cat([into_i[:, :, None].expand(-1, -1, n_out, -1),
                             into_j[:, None].expand(-1, n_x, -1, -1)], -1)  # (B, N_x, 10, 18)
            inp = inp.reshape(B * n_x * n_out, -1)
            for _ in range(self.ticks):
                h, c = self.cell(inp, (h, c))
            out = h.view(B, n_x, n_out, self.width)
            fwd_msg, bwd_msg = self.fwd(out).mean(1), self.bwd(out).mean(2)
            outs.append(fwd_msg[..., 0])                             # (B, 10) logits
        return torch.stack(outs, 1), [h.view(B, -1), c.view(B, -1), fwd_msg, bwd_msg]

    @staticmethod
    def state_size_of(width, n_in, n_out=10, msg=8, **_):
        n_x = n_in - n_out
        return 2 * width * n_x * n_out + msg * (n_out + n_x)


# -----------------------------------------------------------------------------
# Learning by gradient descent inside each sequence: the sgd and maml baselines
#
# Each sequence gets its own 2-layer MLP (hidden `width`). At position t it first takes one
# Adam step (lr 1e-3) on example t-1, whose label has just arrived, then predicts example t.
# sgd starts every sequence from one fixed random init (so it is deterministic); maml
# meta-learns that init through the unrolled inner loop. The
# weights of all sequences are batched tensors (B, ...), so one autograd call steps them all.

class GradientLearner(Learner):
    defaults = dict(width=128)
    meta_init = False

    def __init__(self, n_in, n_out, seq_len, width=128, n_layer=None, n_head=None, lr=1e-3):
        super().__init__()
        self.cfg = dict(width=width, n_in=n_in, n_out=n_out)
        self.n_x, self.lr = n_in - n_out, lr
        self.shapes = [(self.n_x, width), (width,), (width, n_out), (n_out,)]
        if self.meta_init:
            self.init = nn.ParameterList(nn.Parameter(self.random_init(s)) for s in self.shapes)

    @staticmethod
    def random_init(shape, generator=None):
        """Weights std 1/sqrt(fan_in) (Haiku's default), biases zero."""
        if len(shape) == 1:
            return torch.zeros(shape)
        return torch.randn(shape, generator=generator).clamp(-2, 2) / shape[0] ** 0.5

    def initial_weights(self, B, device):
        if self.meta_init:
            return [p.expand(B, *p.shape) for p in self.init]
        # one fixed random init (drawn on the CPU, so the same on every device), shared by every
        # sequence whatever the batch layout: each sequence still starts from scratch
        g = torch.Generator().manual_seed(0)
        return [self.random_init(s, generator=g).to(device).expand(B, *s) for s in self.shapes]

    @staticmethod
    def mlp(w, x):                                                   # x (B, N_x) -> (B, 10)
        h = torch.relu(torch.einsum("bi,bih->bh", x, w[0]) + w[1])
        return torch.einsum("bh,bho->bo", h, w[2]) + w[3]

    def run(self, tokens):                                           # tokens (B, T, N_x + 10)
        B, T, _ = tokens.shape
        x, y_prev = tokens[..., :self.n_x], tokens[..., self.n_x:]
        second_order = self.meta_init and self.training and torch.is_grad_enabled()
        w = self.initial_weights(B, tokens.device)
        m = [torch.zeros_like(p) for p in w]
        v = [torch.zeros_like(p) for p in w]
        b1, b2, eps = 0.9, 0.999, 1e-8
        outs = []
        with torch.enable_grad():                                    # inner gradients, even in eval
            for t in range(T):
                if t > 0:  # one Adam step on example t-1, labelled by this token
                    if not second_order:
                        w = [p.detach().requires_grad_() for p in w]
                    logp = torch.log_softmax(self.mlp(w, x[:, t - 1]), -1)
                    loss = -(logp * y_prev[:, t]).sum()              # sum: each sequence its own
                    g = torch.autograd.grad(loss, w, create_graph=second_order)
                    m = [b1 * a + (1 - b1) * d for a, d in zip(m, g)]
                    v = [b2 * a + (1 - b2) * d * d for a, d in zip(v, g)]
                    # the root holds a tiny constant so that its second-order gradient is finite
                    w = [p - self.lr * (a / (1 - b1 ** t)) / ((s / (1 - b2 ** t) + 1e-30).sqrt() + eps)
                         for p, a, s in zip(w, m, v)]
                outs.append(self.mlp(w, x[:, t]))
        return torch.stack(outs, 1), [p.reshape(B, -1) for p in (*w, *m, *v)]

    @staticmethod
    def state_size_of(width, n_in, n_out=10, **_):
        n_x = n_in - n_out
        return 3 * (n_x * width + width + width * n_out + n_out)     # weights and Adam's m, v


class SGD(GradientLearner):
    pass


class MAML(GradientLearner):
    meta_init = True


# -----------------------------------------------------------------------------
# One way to build any learner, by name, by width or by state size

MODELS = {"transformer": Transformer, "lstm": LSTM, "outer_lstm": OuterLSTM, "fwm": FastWeightMemory,
          "mlp": MLP, "vsml": VSML, "sgd": SGD, "maml": MAML}


def model_config(kind, n_in, seq_len, width=None, n_layer=None, n_head=None, state_size=None):
    """Fill in a learner's defaults and, given state_size, the width that reaches it exactly.
    Returns the keyword arguments of the learner's constructor after n_in and n_out."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[kind]
    cfg = dict(cls.defaults, seq_len=seq_len)
    cfg.update({k: v for k, v in dict(width=width, n_layer=n_layer, n_head=n_head).items()
                if v is not None and k in cls.defaults})
    if state_size is not None:
        cfg["width"] = width_for_state(cls, state_size, dict(cfg, n_in=n_in))
    if not cls.valid_width(**cfg):
        raise ValueError(f"width {cfg['width']} is not valid for {kind} with {cfg}")
    return cfg


def width_for_state(cls, state_size, cfg, max_width=2 ** 16):
    """The width whose state is exactly state_size, or an error naming the nearest ones."""
    below = above = None
    for w in range(1, max_width + 1):
        if not cls.valid_width(**{**cfg, "width": w}):
            continue
        s = cls.state_size_of(**{**cfg, "width": w})
        if s == state_size:
            return w
        if s < state_size:
            below = s
        elif above is None:
            above = s
            break
    near = " or ".join(str(s) for s in (below, above) if s is not None)
    fixed = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("width", "n_in"))
    raise ValueError(f"no width gives state size {state_size} for this learner ({fixed}); "
                     f"the nearest reachable state sizes are {near}")


def build(kind, n_in, n_out, **cfg):
    return MODELS[kind](n_in, n_out, **cfg)


def num_params(model):
    return sum(p.numel() for p in model.parameters())
