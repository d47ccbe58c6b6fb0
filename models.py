"""
The learners (paper sections 2 and 4.2).

In the paper's words, paraphrased: a black-box sequence model is meta-trained on the sequences;
at step t it receives the input x_t and the label of the previous input, y_{t-1}, and predicts
y_t. Every learner here has the same shape:

    model(tokens)                tokens (B, T, N_x + 10)  ->  logits (B, T, 10)
    model.state_size(seq_len)    floats that carry the past into the next prediction
    model.carried_state(tokens)  those very tensors, so a test can count them

and every learner is causal: the output at t depends on tokens 0..t only.

The state size of a learner (section 4.2, paraphrased) is the number of floats that can carry
information from one time step to the next. For an LSTM that is h and c of every layer; for a
Transformer, the keys and values of every layer, head and position: the KV cache. The paper's
finding is that in-context learning ability follows this state size, not the parameter count,
so `--state-size S` builds a learner whose state is exactly S.

Each learner follows the authors' code (google/learned_optimization, research/data_driven:
models.py, model_components.py, transformer.py), written in Haiku; where Haiku's defaults
matter (initialisation, the LSTM's forget gate) we reproduce them and say so.

This file imports nothing else from the project.
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# The interface

class Learner(nn.Module):
    """The interface every learner shares. A learner implements run(tokens) -> (logits, the
    tensors it carries from step to step) and state_size_of(**sizes) -> their size.
    `defaults` names the sizes the learner takes; `sized_by` is the one --state-size solves for."""
    defaults = {}
    sized_by = "width"

    def forward(self, tokens):                                       # (B, T, n_in) -> (B, T, 10)
        return self.run(tokens)[0]

    def carried_state(self, tokens):
        return self.run(tokens)[1]

    def state_size(self, seq_len):
        return self.state_size_of(**{**self.sizes, "seq_len": seq_len})


# -----------------------------------------------------------------------------
# Initialisation as Haiku's, which the authors' learners start from
#
# hk.Linear draws its weights from a normal truncated at two standard deviations, with std
# 1/sqrt(fan_in), and zeros its bias. hk.LSTM is one such Linear on [x_t, h_{t-1}] giving the
# four gates, so its fan-in is n_in + hidden, and it adds 1 to the forget gate's pre-activation.

def trunc_normal(p, std, generator=None):
    """Haiku's TruncatedNormal(std), hk.Linear's default: N(0, std^2) cut at two std (so the
    values' std is 0.88 std)."""
    return nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std, generator=generator)


def variance_scaling(p, scale):
    """Haiku's VarianceScaling(scale, "fan_in", "truncated_normal"): truncated normal rescaled
    so that the values' std is sqrt(scale / fan_in) (0.8796 is the std of N(0, 1) cut at 2)."""
    return trunc_normal(p, math.sqrt(scale / p.shape[1]) / 0.87962566)


def haiku_lstm_init(lstm):
    """An nn.LSTM or nn.LSTMCell as hk.LSTM. Torch splits the one Linear on [x, h] into
    weight_ih and weight_hh (fan-in n_in + hidden, as Haiku's) and adds two biases, bias_ih and
    bias_hh, where Haiku has one per gate. Two learnable copies of one bias move twice as fast
    under Adam (each takes a step of ~lr), so bias_hh is held at zero and frozen: bias_ih is the
    gate's only bias. Its forget chunk starts at 1 (torch's gate order is i, f, g, o); Haiku
    adds its forget bias 1 as a constant: the same at init, and learnable here (ours)."""
    h = lstm.hidden_size
    for name, p in lstm.named_parameters():
        if name.startswith("weight_hh"):                             # one per layer: (4h, h)
            w_ih = getattr(lstm, name.replace("hh", "ih"))           # and its (4h, n_in)
            std = (w_ih.shape[1] + h) ** -0.5
            trunc_normal(w_ih, std)
            trunc_normal(p, std)
        elif name.startswith("bias"):
            nn.init.zeros_(p)
            if name.startswith("bias_ih"):
                nn.init.ones_(p[h:2 * h])                            # the forget gate
            else:
                p.requires_grad_(False)                              # bias_hh: one bias per gate


def haiku_init(module):
    """Every nn.Linear and LSTM inside module as Haiku initialises them."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal(m.weight, m.in_features ** -0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LSTM, nn.LSTMCell)):
            haiku_lstm_init(m)


# -----------------------------------------------------------------------------
# The Transformer: a GPT-style causal decoder over the example tokens (the authors'
# transformer.py, with models.py's input layer and learned positions)
#
#     h_0    = W_e token_t + p_t                                        (B, T, d)
#     h     <- h + Attn(LN(h)),   h <- h + MLP(LN(h))                   for each of n_layer layers
#     logits = W_out LN(h)                                              (B, T, 10)
#
# Each of the n_head heads projects d -> key_size: q, k, v; softmax(q k^T / sqrt(key_size)) v
# over positions <= t; the heads concatenated (n_head * key_size) are projected back to d.
# The key size does not depend on the width d (authors: 8 heads of 32, d = 512), so the state,
# the KV cache 2 * n_layer * T * n_head * key_size, does not depend on d either, and any d
# builds, down to the paper's model-size sweep from 2. (At d = 1 LayerNorm maps every vector
# to its bias, so that learner cannot see its input.)

class SelfAttention(nn.Module):
    def __init__(self, width, n_head, key_size, window=None):
        super().__init__()
        self.n_head, self.key_size, self.window = n_head, key_size, window
        self.qkv = nn.Linear(width, 3 * n_head * key_size)
        self.proj = nn.Linear(n_head * key_size, width)

    def forward(self, x):                                            # x (B, T, d)
        B, T, _ = x.shape
        H, K = self.n_head, self.key_size
        q, k, v = self.qkv(x).split(H * K, dim=2)                    # each (B, T, H*K)
        q, k, v = (t.view(B, T, H, K).transpose(1, 2) for t in (q, k, v))  # each (B, H, T, K)
        W = self.window or T
        if W >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, K)
        else:  # a sliding window: position t attends to t-W+1..t, so the cache keeps W keys
            t = torch.arange(T, device=x.device)
            near = (t[:, None] >= t) & (t[:, None] - t < W)              # (T, T) query, key
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=near)
        y = y.transpose(1, 2).reshape(B, T, H * K)                   # (B, T, H*K)
        return self.proj(y), (k[:, :, -W:], v[:, :, -W:])            # this layer's KV cache


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, width, n_head, key_size, window=None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, n_head, key_size, window)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        a, kv = self.attn(self.ln1(x))
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class Transformer(Learner):
    defaults = dict(width=512, n_layer=4, n_head=8, key_size=32,     # authors' models.py
                    window=None)                 # ours: attention over the last W tokens only
    sized_by = "key_size"                                            # the state is the KV cache

    def __init__(self, n_in, n_out, seq_len, width=512, n_layer=4, n_head=8, key_size=32,
                 window=None):
        super().__init__()
        self.sizes = dict(width=width, n_layer=n_layer, n_head=n_head, key_size=key_size,
                          window=window)
        self.embed = nn.Linear(n_in, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))        # learned positions
        self.blocks = nn.ModuleList(Block(width, n_head, key_size, window)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out)
        # Initialisation as the authors', not GPT-2's N(0, 0.02): attention and MLP weights by
        # Haiku's VarianceScaling(2 / n_layer) (transformer.py), the input and output layers
        # hk.Linear's TruncatedNormal(1 / sqrt(fan_in)), positions TruncatedNormal(0.1)
        # (models.py). On small models the 0.02 start leaves the attention logits ~100x too
        # small, and meta-training sat at chance for >6,000 steps.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.startswith(("embed", "head")):
                trunc_normal(p, p.shape[1] ** -0.5)
            elif p.dim() == 2 and name != "pos":
                variance_scaling(p, 2.0 / n_layer)
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
    def state_size_of(seq_len, n_layer, n_head, key_size, window=None, **_):
        kept = min(window or seq_len, seq_len)                       # positions in the cache
        return 2 * n_layer * kept * n_head * key_size                # keys and values, every layer


# -----------------------------------------------------------------------------
# The LSTM (the authors' models.py LSTM): an input MLP, an LSTM, a linear read-out
#
#     e_t = ReLU(W_2 ReLU(W_1 token_t))                                 (B, w)
#     i, f, g, o = W [e_t, h_{t-1}] + b                                 (each B, w)
#     c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),   h_t = sigmoid(o) tanh(c_t)
#     logits_t = W_out h_t
#
# The forget gate's bias starts at 1 (hk.LSTM's sigmoid(f + 1)): at init the cell keeps
# sigmoid(1) = 73% of c per step rather than half, so what was seen early reaches further;
# see haiku_lstm_init.

class LSTM(Learner):
    defaults = dict(width=256, n_layer=1)

    def __init__(self, n_in, n_out, seq_len, width=256, n_layer=1):
        super().__init__()
        self.sizes = dict(width=width, n_layer=n_layer)
        self.encoder = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(),
                                     nn.Linear(width, width), nn.ReLU())
        self.lstm = nn.LSTM(width, width, num_layers=n_layer, batch_first=True)
        self.head = nn.Linear(width, n_out)
        haiku_init(self)

    def run(self, tokens):                                           # tokens (B, T, n_in)
        h, (h_n, c_n) = self.lstm(self.encoder(tokens))        # h (B, T, w); h_n, c_n (L, B, w)
        return self.head(h), [h_n, c_n]

    @staticmethod
    def state_size_of(width, n_layer, **_):
        return 2 * n_layer * width                                   # h and c of every layer


# -----------------------------------------------------------------------------
# The outer-product LSTM (the authors' model_components.py OuterLSTM, used in their models.py
# LSTM in place of hk.LSTM): the cell is a matrix per head, so a large state from few weights
#
#     k1, k2, q, o = W [e_t, h_{t-1}] + b        per head: k1, k2 (3, w), q, o (w)
#     i, g, f = softplus(s) tanh(k1) (x) tanh(k2)                       three w x w outer products
#     C_t = sigmoid(f + 1) * C_{t-1} + sigmoid(i) * g                   (B, H, w, w)
#     h_t = sigmoid(o) * tanh(C_t^T q)                                  (B, H*w)
#
# s is one learned scale (softplus(0) at init). The state is C and h: H w^2 + H w floats.

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
    """The LSTM learner with its LSTM replaced by outer-product cells. As the authors': the
    encoder is `width` wide (their hidden_size serves both) and one head by default."""
    defaults = dict(width=32, n_head=1)

    def __init__(self, n_in, n_out, seq_len, width=32, n_head=1):
        super().__init__()
        self.sizes = dict(width=width, n_head=n_head)
        self.width, self.n_head = width, n_head
        self.encoder = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(),
                                     nn.Linear(width, width), nn.ReLU())
        self.cell = OuterLSTMCell(width, width, n_head)
        self.head = nn.Linear(n_head * width, n_out)
        haiku_init(self)

    def run(self, tokens):                                           # tokens (B, T, n_in)
        B, T, _ = tokens.shape
        e = self.encoder(tokens)                                     # (B, T, w)
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
# The fast-weight memory (Schlag, Munkhdalai and Schmidhuber 2021, "Learning associative
# inference using fast weight memory"; the authors' models.py FWMemory): an LSTM that writes
# key-value pairs into a matrix M by the delta rule and reads it with a second key
#
#     h_t = LSTM(token_t, h_{t-1})                                      (B, 4m)
#     k1, k2, v = tanh(W_w h_t),  beta = sigmoid(w_beta h_t),  k = k1 (x) k2   (m), (m^2)
#     M <- M + beta (v - M k) k^T                                       M (B, m, m^2)
#     r1, r2 = tanh(W_r h_t),  read = M (r1 (x) r2)                     (B, m)
#     logits_t = W_out (h_t + W_p LN(read))
#
# The delta rule moves the value stored under k (M k) towards v, by a fraction beta |k|^2 (the
# keys are not normalised, as in the authors' code), instead of adding v on top of it. width m:
# a memory of m x m^2 fast weights beside an LSTM of 4m units (the authors' memory_size 16 and
# slow_size 64).

class FastWeightMemory(Learner):
    defaults = dict(width=16)

    def __init__(self, n_in, n_out, seq_len, width=16):
        super().__init__()
        self.sizes = dict(width=width)
        self.width, slow = width, 4 * width
        self.lstm = nn.LSTMCell(n_in, slow)
        self.write_head = nn.Linear(slow, 3 * width + 1)
        self.read_head = nn.Linear(slow, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=True, bias=False)
        self.read_proj = nn.Linear(width, slow)
        self.head = nn.Linear(slow, n_out)
        haiku_init(self)

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
            v_old = torch.einsum("bmn,bn->bm", memory, k)            # what k holds now
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

    def __init__(self, n_in, n_out, seq_len, width=256):
        super().__init__()
        self.sizes = dict(width=width)
        self.n_x = n_in - n_out
        self.net = nn.Sequential(nn.Linear(self.n_x, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, n_out))
        haiku_init(self)

    def run(self, tokens):
        return self.net(tokens[..., :self.n_x]), []                  # the labels are never read

    @staticmethod
    def state_size_of(**_):
        return 0


# -----------------------------------------------------------------------------
# VSML (Kirsch and Schmidhuber 2021, "Meta learning backpropagation and improving it"; the
# authors' models.py VSML and VSMLLayer): every weight w_ij of an N_x -> 10 layer is a tiny
# LSTM, all N_x * 10 of them sharing one set of parameters
#
#     into LSTM (i, j) at step t, 18 floats:
#         [b_i, x_i, f_j, y_j]      b_i (8): last step's backward message to input unit i
#                                   x_i (1): input i of this example
#                                   f_j (8): last step's forward message of output unit j
#                                   y_j (1): bit j of the previous example's label
#     (h_ij, c_ij) <- LSTM(into_ij, (h_ij, c_ij)), ticked twice on the same input
#     f_j = mean_i W_f h_ij  (8),   b_i = mean_j W_b h_ij  (8)
#     logit_j = f_j[0]
#
# A layer computes y_j = sum_i w_ij x_i; here the LSTMs (i, j) play the weights, the mean over
# i plays the sum, and the forward message plays y_j: a scalar x_i came in, so element 0 of the
# message going out is the output unit's activation, the logit (the other 7 elements are free
# channels the layer sends itself at the next step). Labels come in as backward messages, as
# error signals would. Two ticks give each example two LSTM steps of computation.

class VSML(Learner):
    defaults = dict(width=16)
    msg, ticks = 8, 2                                        # the authors' msg_size, micro_ticks

    def __init__(self, n_in, n_out, seq_len, width=16):
        super().__init__()
        self.sizes = dict(width=width, n_in=n_in, n_out=n_out)
        self.n_x, self.n_out, self.width = n_in - n_out, n_out, width
        self.cell = nn.LSTMCell(2 * (self.msg + 1), width)
        self.fwd = nn.Linear(width, self.msg)
        self.bwd = nn.Linear(width, self.msg)
        haiku_init(self)

    def run(self, tokens):                                           # tokens (B, T, N_x + 10)
        B, T, _ = tokens.shape
        n_x, n_out, msg = self.n_x, self.n_out, self.msg
        x, y_prev = tokens[..., :n_x, None], tokens[..., n_x:, None]  # (B,T,N_x,1), (B,T,10,1)
        h = c = tokens.new_zeros(B * n_x * n_out, self.width)
        fwd_msg = tokens.new_zeros(B, n_out, msg)                    # f_j, last step's
        bwd_msg = tokens.new_zeros(B, n_x, msg)                      # b_i, last step's
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

    @classmethod
    def state_size_of(cls, width, n_in, n_out=10, **_):
        n_x = n_in - n_out
        return 2 * width * n_x * n_out + cls.msg * (n_out + n_x)     # h, c; f and b


# -----------------------------------------------------------------------------
# The authors' optimizer, Adam as optax's: meta-training's (Adam), and the one every sgd and maml
# learner runs inside each sequence (adam_step)

class Adam(torch.optim.Optimizer):
    """Adam as optax's, the authors' optimizer (optimizers/optax_opts.py, eps_root 1e-8):

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        update = lr * m_hat / (sqrt(v_hat + eps_root) + eps),   m_hat, v_hat bias-corrected

    torch.optim.Adam has no eps_root. With it, a parameter whose gradients are all tiny (as on
    a loss plateau) takes steps ~ lr g / sqrt(eps_root) instead of ~ lr: it damps them (one of
    the plateau's levers, paper 4.3). train.py meta-trains every learner with it."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, eps_root=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, eps_root=eps_root))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                m, v, t = state["m"], state["v"], state["t"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** t)).add_(group["eps_root"]).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


# -----------------------------------------------------------------------------
# Learning by gradient descent inside each sequence: the sgd and maml baselines (the authors'
# models.py SGD, with use_maml for maml)
#
# Each sequence gets its own 2-layer MLP (hidden `width`). At position t it first takes one
# Adam step (lr 1e-3) on example t-1, whose label has just arrived, then predicts example t.
# sgd starts every sequence from its own random init; maml meta-learns one init through the
# unrolled inner loop. The weights of all sequences are batched tensors (B, ...), so one
# autograd call steps them all.

def adam_step(w, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam's t-th step (t >= 1) on the lists of tensors w with gradients g and moments m, v:
    w - lr m_hat / (sqrt(v_hat) + eps). Returns the new w, m, v. The root holds a tiny
    constant so that its gradient, which maml's second-order meta-gradient takes, is finite
    where v is 0.

    The same Adam as the class above (with eps_root 1e-30 here), written out of place: the class,
    a torch.optim.Optimizer, updates leaf parameters in place under no_grad, once per
    meta-batch; this step updates a batch of per-sequence weights (B, ...) that are not
    parameters, at every position, and maml differentiates through it (its outer gradient flows
    through every inner update), which an in-place no_grad step would cut."""
    m = [b1 * a + (1 - b1) * d for a, d in zip(m, g)]
    v = [b2 * a + (1 - b2) * d * d for a, d in zip(v, g)]
    w = [p - lr * (a / (1 - b1 ** t)) / ((s / (1 - b2 ** t) + 1e-30).sqrt() + eps)
         for p, a, s in zip(w, m, v)]
    return w, m, v


def sequence_seed(first_token):
    """A seed for one sequence's init from the bytes of its first token (N_x + 10 floats).
    The authors give each sequence its own key (hk.vmap with split_rng), which depends on where
    the sequence sits in the batch; ours depends on the sequence alone, so results do not depend
    on the batch layout or the device (the init is drawn on the CPU). The first token, not the
    whole sequence: the output at t may depend on tokens 0..t only, and token 0 is among them.
    (Python's hash() is salted per process; blake2b is not.)"""
    data = first_token.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class GradientLearner(Learner):
    defaults = dict(width=128)
    meta_init = False
    lr = 1e-3                                                        # the authors' learning_rate

    def __init__(self, n_in, n_out, seq_len, width=128):
        super().__init__()
        self.sizes = dict(width=width, n_in=n_in, n_out=n_out)
        self.n_x = n_in - n_out
        self.shapes = [(self.n_x, width), (width,), (width, n_out), (n_out,)]
        if self.meta_init:
            self.init = nn.ParameterList(nn.Parameter(self.random_init(s)) for s in self.shapes)

    @staticmethod
    def random_init(shape, generator=None):
        """As hk.Linear: weights truncated normal, std 1/sqrt(fan_in); biases zero."""
        if len(shape) == 1:
            return torch.zeros(shape)
        return trunc_normal(torch.empty(shape), shape[0] ** -0.5, generator)

    def initial_weights(self, tokens):                               # -> [(B, ...)] per shape
        B = tokens.shape[0]
        if self.meta_init:
            return [p.expand(B, *p.shape) for p in self.init]
        inits = []
        for seed in map(sequence_seed, tokens[:, 0]):
            g = torch.Generator().manual_seed(seed)
            inits.append([self.random_init(s, g) for s in self.shapes])
        return [torch.stack(ps).to(tokens.device) for ps in zip(*inits)]

    @staticmethod
    def mlp(w, x):                                                   # x (B, N_x) -> (B, 10)
        h = torch.relu(torch.einsum("bi,bih->bh", x, w[0]) + w[1])  # (B, width)
        # a product and a sum, not einsum: on the CPU, batched matmul's (B, 1, width) x
        # (B, width, 10) rows change in the last bits with B, and a sequence's result must not
        return (h[:, :, None] * w[2]).sum(1) + w[3]

    def run(self, tokens):                                           # tokens (B, T, N_x + 10)
        B, T, _ = tokens.shape
        x, y_prev = tokens[..., :self.n_x], tokens[..., self.n_x:]
        second_order = self.meta_init and self.training and torch.is_grad_enabled()
        w = self.initial_weights(tokens)
        m = [torch.zeros_like(p) for p in w]
        v = [torch.zeros_like(p) for p in w]
        outs = []
        with torch.enable_grad():                                    # inner gradients, even in eval
            for t in range(T):
                if t > 0:  # one Adam step on example t-1, labelled by this token
                    if not second_order:
                        w = [p.detach().requires_grad_() for p in w]
                    logp = torch.log_softmax(self.mlp(w, x[:, t - 1]), -1)
                    loss = -(logp * y_prev[:, t]).sum()              # sum: each sequence its own
                    g = torch.autograd.grad(loss, w, create_graph=second_order)
                    w, m, v = adam_step(w, g, m, v, t=t, lr=self.lr)
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
# One way to build any learner, by name, by size or by state size

MODELS = {"transformer": Transformer, "lstm": LSTM, "outer_lstm": OuterLSTM,
          "fwm": FastWeightMemory, "mlp": MLP, "vsml": VSML, "sgd": SGD, "maml": MAML}


def learner_sizes(kind, n_in, seq_len, width=None, n_layer=None, n_head=None, state_size=None,
                  key_size=None, window=None):
    """Fill in a learner's defaults and, given state_size, the size that reaches it exactly
    (the key size for the Transformer, the width for the others). Returns the sizes: the keyword
    arguments of the learner's constructor after n_in and n_out. A size the learner would ignore
    is a one-line ValueError, not a silent default."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[kind]
    given = {k: v for k, v in dict(width=width, n_layer=n_layer, n_head=n_head,
                                   key_size=key_size, window=window).items() if v is not None}
    for k in given:
        if k not in cls.defaults:
            raise ValueError(f"{k} does not apply to this learner (it takes "
                             f"{', '.join(cls.defaults)})")
    if state_size is not None and cls.sized_by in given:
        raise ValueError(f"give {cls.sized_by} or state_size, not both: "
                         f"state_size picks the {cls.sized_by}")
    sizes = dict(cls.defaults, **given, seq_len=seq_len)
    if state_size is not None:
        sizes[cls.sized_by] = solve_for_state(cls, state_size, dict(sizes, n_in=n_in))
    return sizes


def solve_for_state(cls, state_size, sizes, largest=2 ** 16):
    """The value of cls.sized_by whose state is exactly state_size, or an error naming the
    nearest reachable ones. Every state size grows with it, so count up until past."""
    name, below, above = cls.sized_by, None, None
    for n in range(1, largest + 1):
        s = cls.state_size_of(**{**sizes, name: n})
        if s == state_size:
            return n
        if s < state_size:
            below = s
        else:
            above = s
            break
    near = " or ".join(str(s) for s in (below, above) if s is not None)
    fixed = ", ".join(f"{k}={v}" for k, v in sizes.items() if k not in (name, "n_in"))
    raise ValueError(f"no {name} gives state size {state_size} for this learner ({fixed}); "
                     f"the nearest reachable state sizes are {near}")


def build(kind, n_in, n_out, **sizes):
    """The learner `kind` for tokens of n_in floats and n_out labels, with the sizes of
    learner_sizes (a checkpoint keeps all of these as its "model_args")."""
    return MODELS[kind](n_in, n_out, **sizes)


def num_params(model):
    """The meta-parameters: what meta-training learns (an LSTM's frozen zero bias_hh is not)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
