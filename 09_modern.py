"""Stage 09: what five years of changes buy: modern GPT tweaks against GPT-2 at equal data.

Today's open models (Llama, Qwen, OLMo, the modded-nanogpt speedrun) change a handful of
GPT-2's pieces; each is written out below under its own heading: RMSNorm, no bias, RoPE,
QK-norm, ReLU^2 / SwiGLU, Muon. Each row of the table trains fresh models (seeds --seed,
--seed+1, ...) on the same batches with stage 06's recipe, scored by the loss on held-out text;
the harness (rows x seeds, paired differences, the noise line, ablation.json) is common/ablation.py.
python 09_modern.py   (CPU: tiny preset, fp32, 2 seeds per row, 10 steps, mostly noise;
                       GPU: gpt2 preset, 3 seeds per row, tiny shakespeare)
Where differences are real (16M tokens per run, shards from `python -m common.fineweb`):
    python 09_modern.py --data-dir data/edu_fineweb10B --batch-size 32 --steps 500
Rows join with +:  python 09_modern.py --rows baseline,rope+swiglu  (tok/s: eager mode, no compile)
"""

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, ablation
from common.cli import parse_args
from common.model import GPTConfig, gpt2_init, preset_config
from common.device import amp_dtype, pick_device
from common.train import make_optimizer

ROWS = dict(
    baseline={},
    rope=dict(rope=True),
    rmsnorm=dict(rmsnorm=True),
    qk_norm=dict(qk_norm=True),
    relu2=dict(mlp="relu2"),
    swiglu=dict(mlp="swiglu"),
    nobias=dict(bias=False),
    muon=dict(optimizer="muon"),
    muon_fused=dict(optimizer="muon_fused"),  # see make_optimizers
    all=dict(rope=True, rmsnorm=True, qk_norm=True, mlp="swiglu", bias=False, optimizer="muon"),
)


@dataclass
class Config(ablation.Config):  # + the harness's flags: data, batch, schedule, seeds, dtype, out
    rows: str = ",".join(ROWS)  # rows to train, comma-separated (a+b: both changes in one row)
    muon_lr: float = 0.02  # Muon's peak learning rate (the same warmup + cosine shape)
    cpu: ClassVar[dict] = dict(
        preset="tiny",
        batch_size=4,
        seq_len=64,
        steps=10,
        max_lr=2e-3,
        warmup_steps=2,
        seeds=2,
        val_steps=4,
        dtype="float32",
    )


@dataclass
class ModernConfig(GPTConfig):  # GPT-2's sizes, and the switches the rows turn on
    rope: bool = False
    rmsnorm: bool = False
    qk_norm: bool = False
    mlp: str = "gelu"  # gelu (GPT-2) | relu2 | swiglu
    bias: bool = True


# --- RMSNorm: rescale only
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. LayerNorm also subtracts the mean and adds a bias;
    Zhang & Sennrich (2019) found the rescaling alone does the work, with one reduction less."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in fp32, even under bf16 autocast
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


# --- no bias: no additive term in any Linear or norm (PaLM, Llama); each nn.Linear below too
def make_norm(config):
    if config.rmsnorm:
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


# --- RoPE: position as a rotation of q and k, in every layer
def rope_tables(block_size, head_dim, base=10000.0):
    """cos, sin of pos * base^(-2i/head_dim) for each position and pair i, (block_size, hs/2) each:
    pair 0 turns 1 radian per position, the last ~10,000x slower (neighbours vs long distances)."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), freqs)  # (T, hs/2)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Turn each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle. q turned
    by m*theta and k by n*theta give a q.k that depends on m - n alone: relative positions."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each: pair i is (x1[i], x2[i])
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


# --- QK-norm, and where RoPE enters attention
class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.qk_norm = config.n_head, config.n_embd, config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_attn.MUON_PARTS = 3  # q, k and v: three matrices stored as one (see Muon)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True  # init scaled by (2 * n_layer) ** -0.5
        if config.qk_norm:  # one gain per head dimension, shared by the heads
            self.q_norm = RMSNorm(config.n_embd // config.n_head)
            self.k_norm = RMSNorm(config.n_embd // config.n_head)

    def forward(self, x, rope=None):
        B, T, C = x.size()
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q, k, v = map(heads, self.c_attn(x).split(self.n_embd, dim=2))  # (B, nh, T, hs) each
        if self.qk_norm:  # qk_norm: the logits' size is set by two gains, not by the weights
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rope: position enters here, in every layer, and only here
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


# --- ReLU^2 and SwiGLU: other MLP nonlinearities
class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind, n = config.mlp, config.n_embd
        hidden = int(8 * n / 3) if self.kind == "swiglu" else 4 * n  # swiglu: 3 n x 8n/3 = 2 n x 4n
        self.c_fc = nn.Linear(n, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.c_fc.MUON_PARTS = 2 if self.kind == "swiglu" else 1  # swiglu: gate and up at once
        self.c_proj = nn.Linear(hidden, n, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":  # each unit's value times its own learned, smooth gate
            gate, up = h.chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        if self.kind == "relu2":  # ReLU's zeros, then a square: sparse and sharp
            return self.c_proj(F.relu(h).square())
        return self.c_proj(F.gelu(h, approximate="tanh"))  # GPT-2


# --- the model: GPT-2 with the switches above
class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = make_norm(config), CausalSelfAttention(config)
        self.ln_2, self.mlp = make_norm(config), MLP(config)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class ModernGPT(nn.Module):
    """GPT-2 (tied weights, GPT-2 init, HF parameter names) with the switches of ModernConfig;
    all switches off, it is common.model.GPT, tensor for tensor."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        wpe = {} if config.rope else dict(wpe=nn.Embedding(config.block_size, config.n_embd))
        wte = nn.Embedding(config.vocab_size, config.n_embd)
        h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer = nn.ModuleDict(dict(wte=wte, **wpe, h=h, ln_f=make_norm(config)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as since stage 04
        if config.rope:  # (2, block_size, hs/2): tables, not parameters, not in the state dict
            tables = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope", torch.stack(tables), persistent=False)
        self.apply(lambda module: gpt2_init(module, config.n_layer))  # norms: weight 1, bias 0

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise UserError(
                f"sequence length {T} exceeds block_size {self.config.block_size}: lower --seq-len"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        if not self.config.rope:  # rope: positions enter in attention instead
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x, self.rope[:, :T] if self.config.rope else None)  # cos, sin of 0..T-1
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# --- Muon: orthogonalized momentum for the matrices inside the blocks
def newton_schulz(G, steps=5, eps=1e-7):
    """~U V^T for G = U S V^T, with matmuls only (no SVD): each step applies p(s) = a s + b s^3
    + c s^5 to every singular value, which lifts small ones fast and leaves most in roughly
    [0.7, 1.2], not exactly 1: close enough for an update direction, and 5 steps are cheap."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()  # bf16 on tensor cores; CPUs: fp32 is faster
    tall = X.size(0) > X.size(1)  # work on the wide side: X @ X.T is the smaller Gram matrix
    X = X.T if tall else X
    X = X / (X.norm() + eps)  # Frobenius >= spectral norm: singular values now in [0, 1]
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X  # = U p(S) V^T
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum, its update orthogonalized. A gradient matrix is dominated by
    a few directions (large singular values); orthogonalized, every direction gets the same
    step, so the rare ones learn too. `parts`: the matrices a weight stacks, each done alone."""

    def __init__(self, params, lr=0.02, momentum=0.95, parts=1):
        super().__init__(params, dict(lr=lr, momentum=momentum, parts=parts))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)  # momentum: a running sum of gradients
                g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov: look one step ahead
                scale = lambda m: max(1.0, m.size(0) / m.size(1)) ** 0.5  # RMS 1/sqrt(fan_in)
                update = torch.cat([newton_schulz(m) * scale(m) for m in g.chunk(group["parts"])])
                p.add_(update, alpha=-group["lr"])


def make_optimizers(model, name, cfg, device):
    """adamw: stage 06's AdamW for all. muon: Muon for the blocks' Linear weights, q, k, v (and
    SwiGLU's gate, up) each alone: separate maps, each its own full step (muon_fused, the control:
    one matrix, so a part with small gradients gets a small step); stage 06's AdamW for the rest."""
    if name == "adamw":
        return [make_optimizer(model, cfg.weight_decay, cfg.max_lr, device)]
    linears = [m for m in model.transformer.h.modules() if isinstance(m, nn.Linear)]
    parts = lambda m: getattr(m, "MUON_PARTS", 1) if name == "muon" else 1  # muon_fused: 1
    muon = Muon([dict(params=[m.weight], parts=parts(m)) for m in linears], lr=cfg.muon_lr)
    hidden = {id(m.weight) for m in linears}
    rest = nn.ParameterList(p for p in model.parameters() if id(p) not in hidden)
    return [make_optimizer(rest, cfg.weight_decay, cfg.max_lr, device), muon]


def build(cfg, switches, device):
    """One run's fresh model and its optimizers (the harness seeds it first). The baseline is
    stage 05-08's GPT-2: tied, GPT-2 init, flash attention, vocab 50304."""
    base = preset_config(
        cfg.preset,
        tie_weights=True,
        gpt2_init=True,  # stage 04
        attn="sdpa",  # stage 05: flash attention
        vocab_size=50304,  # stage 05: a shape kernels tile evenly
    )
    model_switches = {k: v for k, v in switches.items() if k != "optimizer"}
    model = ModernGPT(ModernConfig(**asdict(base), **model_switches)).to(device)
    return model, make_optimizers(model, switches.get("optimizer", "adamw"), cfg, device)


def main(cfg):
    device = pick_device(cfg.device)
    rows = ablation.parse_rows(cfg.rows, ROWS)  # unknown rows fail here, before any training
    # bf16 autocast on a GPU, as in stages 05-08. The CPU defaults are float32 (no autocast):
    # bf16 is slower on CPUs without AMX (docs/stages.md, 05's table); --dtype bfloat16 forces it
    dtype = amp_dtype(cfg.dtype, device)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32, as in stages 05-08
    return ablation.run_ablation(cfg, rows, lambda sw: build(cfg, sw, device), device, dtype)


if __name__ == "__main__":
    main(parse_args(Config))
