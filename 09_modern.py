"""Stage 09: what five years of changes buy: modern GPT tweaks against GPT-2 at equal data.

GPT-2 (2019) is the model of stages 00-08. Today's open models (Llama, Qwen, OLMo, the
modded-nanogpt speedrun) change a handful of its pieces. Each one is written out below, a
few lines behind its own switch, and trained against the GPT-2 baseline on the same tokens:
  rope     rotary position embeddings: no `wpe` table; q and k are rotated by angles that
           grow with their position, so q.k depends on the distance m - n only
  rmsnorm  RMSNorm instead of LayerNorm: divide by the root mean square; no mean, no bias
  qk_norm  RMSNorm on every head's q and k before attention: attention logits stay bounded
  mlp      gelu (GPT-2) | relu2: relu(x)^2 | swiglu: silu(x W_gate) * (x W_up), with a
           hidden size of 8/3 n_embd instead of 4 n_embd so the parameter count stays equal
  bias     --bias false: no bias in any Linear or norm, as in PaLM and Llama
  muon     the optimizer: Muon (momentum, then the update orthogonalized by a Newton-Schulz
           iteration) for the 2-D matrices inside the blocks, AdamW for everything else
Every row of the table trains fresh models (seeds --seed, --seed+1, ...) on the same
batches, so all rows see equal tokens (steps x total batch), with stage 06's recipe (AdamW
0.9/0.95, decay groups, clipping at 1.0, warmup + cosine; bf16 autocast) and is scored by the
loss on held-out text: the last 10% of the tokens, or the val shard with --data-dir.
The table: parameters, tokens, val loss, its difference to the baseline (mean and spread
over the seeds, paired: same seed, same data), training time and tokens/s.

Run on CPU (tiny preset, 2 seeds of every row, 10 steps each, < 1 min; mostly noise there):
    python 09_modern.py
Run on a GPU (gpt2 preset, 3 seeds of every row, tiny shakespeare):  python 09_modern.py
At a scale where the differences are real (shards from `python -m common.fineweb`):
    python 09_modern.py --data-dir data/edu_fineweb10B --batch-size 32 --steps 500  # 16M tokens/run
One configuration from the switches:   python 09_modern.py --rows flags --rope --mlp swiglu
It against the baseline:    python 09_modern.py --rows baseline,flags --rmsnorm --bias false
tokens/s is measured in eager mode (no torch.compile: compiling every run would cost more than
these short runs); the written-out RMSNorm and rotation are several small kernels each, which
a compiler would fuse, so they look slower here than in a compiled model.
"""

import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, bench
from common.cli import parse_args
from common.data import ShardLoader, TextLoader, get_tokenizer, load_text
from common.model import GPTConfig, preset_config
from common.train import lr_at, make_optimizer, pick_device, seed_all, step_line, synchronize


# Each row of the table: the switches it turns on. The baseline is GPT-2 as stages 04-08 train it.
ROWS = {
    "baseline": {},
    "rope": dict(rope=True),
    "rmsnorm": dict(rmsnorm=True),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu"),
    "nobias": dict(bias=False),
    "muon": dict(optimizer="muon"),
    "all": dict(rope=True, rmsnorm=True, qk_norm=True, mlp="swiglu", bias=False, optimizer="muon"),
}


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    input: str = ""  # text file to train on; empty: tiny shakespeare (downloaded once)
    data_dir: str = ""  # token shards from `python -m common.fineweb` instead of --input
    batch_size: int = 8  # sequences per micro-step
    seq_len: int = 1024  # tokens per sequence
    steps: int = 80  # optimizer steps per run: every row sees steps x total_batch tokens
    max_lr: float = 6e-4  # AdamW's peak learning rate, reached at the end of warmup; min is 10%
    warmup_steps: int = 10  # linear warmup from max_lr / warmup_steps
    weight_decay: float = 0.1  # AdamW decay on >= 2-D parameters only
    grad_clip: float = 1.0  # clip the global gradient norm to this
    total_batch: int = 0  # tokens per optimizer step, a multiple of B*T (0: B*T, no accumulation)
    seed: int = 1337  # seed of each row's first run; run i uses seed + i
    seeds: int = 3  # runs per row, one seed each: their spread shows what is noise
    rows: str = ",".join(ROWS)  # rows to train, comma-separated; flags = the switches below
    val_steps: int = 20  # held-out batches per evaluation (at most what the val text holds)
    rope: bool = False  # flags row: rotary position embeddings instead of the learned wpe
    rmsnorm: bool = False  # flags row: RMSNorm instead of LayerNorm
    qk_norm: bool = False  # flags row: RMSNorm on each head's q and k before attention
    mlp: str = "gelu"  # flags row: gelu (GPT-2), relu2 (squared ReLU), swiglu (gated, same size)
    bias: bool = True  # flags row: biases in Linear layers and norms (false: none at all)
    optimizer: str = "adamw"  # flags row: adamw, or muon for the 2-D matrices in the blocks
    muon_lr: float = 0.02  # Muon's peak learning rate (the same warmup + cosine shape)
    out: str = "out"  # the table and every run's numbers go to {out}/ablation.json
    cpu: ClassVar[dict] = dict(
        preset="tiny", batch_size=4, seq_len=64, steps=10, max_lr=2e-3, warmup_steps=2, seeds=2,
        val_steps=4,
    )  # fmt: skip
    rules: ClassVar[dict] = dict(total_batch=">= 0")  # --total-batch 0: B*T, no accumulation


MLPS = ("gelu", "relu2", "swiglu")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class ModernConfig(GPTConfig):
    rope: bool = False  # rotary position embeddings instead of wpe
    rmsnorm: bool = False  # RMSNorm instead of LayerNorm
    qk_norm: bool = False  # normalize q and k per head
    mlp: str = "gelu"  # gelu | relu2 | swiglu
    bias: bool = True  # biases in Linear layers and LayerNorms


# --- the model: GPT-2 with each modern change behind its switch ------------------------------


class RMSNorm(nn.Module):
    """rmsnorm: x / sqrt(mean(x^2) + eps) * weight. LayerNorm also subtracts the mean and adds
    a bias; RMSNorm's paper (Zhang & Sennrich, 2019) found the rescaling alone does the work,
    with one reduction instead of two."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in fp32, even under bf16 autocast
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def make_norm(config):
    if config.rmsnorm:  # rmsnorm
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)  # bias


def rope_tables(block_size, head_dim, base=10000.0):
    """rope: cos and sin of angle pos * base^(-2i/head_dim) for every position and pair i,
    each (block_size, head_dim / 2). Pair 0 turns by 1 radian per position, the last one
    nearly 10,000x slower: fast pairs tell neighbours apart, slow ones carry long distances."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), freqs)  # (T, hs/2)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """rope: turn each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle;
    cos, sin are the tables' rows for these T positions. q turned by m*theta and k by
    n*theta give q.k that depends on m - n alone: attention sees relative positions."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each: pair i is (x1[i], x2[i])
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd, self.qk_norm = config.n_head, config.n_embd, config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True  # init scaled by (2 * n_layer) ** -0.5
        if config.qk_norm:  # qk_norm: one gain per head dimension, shared by the heads
            self.q_norm = RMSNorm(config.n_embd // config.n_head)
            self.k_norm = RMSNorm(config.n_embd // config.n_head)

    def forward(self, x, rope=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # qk_norm: the logits' size is set by two gains, not by the weights
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rope: position enters here, in every layer, and only here
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.mlp not in MLPS:
            raise UserError(f"unknown mlp '{config.mlp}': choose one of {', '.join(MLPS)}")
        self.kind, hidden = config.mlp, 4 * config.n_embd
        if self.kind == "swiglu":  # swiglu: 3 matrices of n x 8n/3 = GELU's 2 of n x 4n
            hidden = int(8 * config.n_embd / 3)
        fc_out = 2 * hidden if self.kind == "swiglu" else hidden  # swiglu: gate and up at once
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2
        elif self.kind == "relu2":  # relu2: ReLU's zeros, then a square: sparse and sharp
            h = F.relu(h).square()
        else:  # swiglu: each unit's value times its own learned, smooth gate
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class ModernGPT(nn.Module):
    """GPT-2 (tied weights, GPT-2 init, HF parameter names) with the switches of ModernConfig;
    all switches off, it is common.model.GPT, tensor for tensor."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rope:  # rope: no position table at all
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        parts["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as since stage 04
        if config.rope:  # tables, not parameters: nothing to learn, not in the state dict
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):  # GPT-2's init, as stage 04; norms keep weight 1, bias 0
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise UserError(
                f"sequence length {T} exceeds block_size {self.config.block_size}: lower --seq-len"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.rope:  # rope: the rows of the tables for positions 0..T-1
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        else:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x, rope)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once


# --- the optimizer: Muon for the hidden matrices ----------------------------------------------


def newton_schulz(G, steps=5, eps=1e-7):
    """muon: ~U V^T for G = U S V^T: every singular value pushed towards 1, with matmuls only
    (no SVD). Each step applies p(s) = a s + b s^3 + c s^5 to every singular value; these
    coefficients lift small ones fast and leave most of them in roughly [0.7, 1.2], not
    exactly 1: close enough for an update direction, and 5 steps are cheap."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()  # bf16 on tensor cores; CPUs: fp32 is faster
    tall = X.size(0) > X.size(1)
    if tall:  # work on the wide side: X @ X.T is then the smaller of the two Gram matrices
        X = X.T
    X = X / (X.norm() + eps)  # Frobenius >= spectral norm: singular values now in [0, 1]
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X  # = U p(S) V^T
    if tall:
        X = X.T
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """muon: SGD with Nesterov momentum whose update is orthogonalized before it is applied.

    A gradient matrix is usually dominated by a few directions (a few large singular values);
    orthogonalizing gives every direction the same step, so the rare ones learn too. Only for
    2-D weights inside the blocks: embeddings, the head and gains/biases stay with AdamW."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)  # momentum: a running sum of gradients
                g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov: look one step ahead
                update = newton_schulz(g)
                update *= max(1.0, p.size(0) / p.size(1)) ** 0.5  # RMS 1/sqrt(fan_in), tall too
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled decay (0 here)
                p.add_(update, alpha=-group["lr"])


def make_optimizers(model, name, cfg, device):
    """adamw: stage 06's AdamW for every parameter. muon: Muon for the 2-D matrices inside the
    blocks and AdamW (the same settings and decay groups) for the embeddings and 1-D tensors."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return [make_optimizer(model, cfg.weight_decay, cfg.max_lr, device)]
    named = dict(model.named_parameters())  # a tied matrix appears once
    hidden = [p for n, p in named.items() if n.startswith("transformer.h.") and p.dim() == 2]
    rest = [p for n, p in named.items() if not (n.startswith("transformer.h.") and p.dim() == 2)]
    adamw = torch.optim.AdamW(
        [dict(params=[p for p in rest if p.dim() >= 2], weight_decay=cfg.weight_decay),
         dict(params=[p for p in rest if p.dim() < 2], weight_decay=0.0)],
        lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8, fused=str(device).startswith("cuda"),
    )  # fmt: skip
    return [adamw, Muon(hidden, lr=cfg.muon_lr)]


# --- one run: a fresh model trained on the shared batches, then its val loss ------------------


def row_switches(cfg, name):
    """The switches of a row; `flags` takes them from the command line."""
    if name == "flags":
        if cfg.mlp not in MLPS:  # fail now, not after the rows before it have trained
            raise UserError(f"unknown mlp '{cfg.mlp}': choose one of {', '.join(MLPS)}")
        if cfg.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown optimizer '{cfg.optimizer}': choose one of {', '.join(OPTIMIZERS)}"
            )
        return dict(rope=cfg.rope, rmsnorm=cfg.rmsnorm, qk_norm=cfg.qk_norm, mlp=cfg.mlp,
                    bias=cfg.bias, optimizer=cfg.optimizer)  # fmt: skip
    if name not in ROWS:
        raise UserError(f"unknown row '{name}': choose from {', '.join(ROWS)}, flags")
    return ROWS[name]


def build_model(preset, switches, device):
    """The baseline is stage 05-08's GPT-2: tied, GPT-2 init, flash attention, vocab 50304."""
    model_switches = {k: v for k, v in switches.items() if k != "optimizer"}
    base = preset_config(preset, tie_weights=True, gpt2_init=True, attn="sdpa", vocab_size=50304)
    return ModernGPT(ModernConfig(**{**asdict(base), **model_switches})).to(device)


def evaluate(model, make_loader, ctx, steps, device):
    """Mean loss over the first `steps` held-out batches: the same ones for every run."""
    model.eval()
    loader, total = make_loader(), 0.0
    with torch.no_grad():
        for _ in range(steps):
            x, y = loader.next_batch()
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            total += loss.item() / steps
    model.train()
    return total


def train_run(cfg, switches, seed, total_batch, data, ctx, device):
    seed_all(seed)  # a different seed: different init; the batches stay the same
    model = build_model(cfg.preset, switches, device)
    optimizers = make_optimizers(model, switches.get("optimizer", "adamw"), cfg, device)
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["peak_lr"] = group["lr"]  # AdamW's and Muon's peaks differ; the shape is shared
    loader, accum_steps = data["train"](), total_batch // (cfg.batch_size * cfg.seq_len)
    losses, dts = [], []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad()
        loss_accum = 0.0
        for micro_step in range(accum_steps):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with ctx:
                logits, loss = model(x, y)
            loss = loss / accum_steps  # the mean over the whole batch, not a sum of means
            loss_accum += loss.detach()
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = lr_at(step, cfg.max_lr, cfg.warmup_steps, cfg.steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr / cfg.max_lr
            opt.step()
        synchronize(device)
        dts.append(time.perf_counter() - t0)
        losses.append(loss_accum.item())
        print(step_line(step, losses[-1], lr=lr, norm=norm.item(), dt=dts[-1],
                        tokens_per_s=total_batch / dts[-1]))  # fmt: skip
    val = evaluate(model, data["val"], ctx, data["val_steps"], device)
    return dict(seed=seed, losses=losses, val_loss=val, params=model.num_params(),
                train_s=sum(dts),
                tokens_per_s=total_batch / statistics.median(dts))  # fmt: skip


def load_data(cfg, enc):
    """Functions that make fresh train/val loaders: every run reads the same batches."""
    B, T = cfg.batch_size, cfg.seq_len
    if cfg.data_dir:  # FineWeb-Edu shards: shard 0 is validation
        print(f"data: token shards in {cfg.data_dir}")
        step_tokens = cfg.total_batch or B * T  # shards change between optimizer steps only
        return dict(train=lambda: ShardLoader(cfg.data_dir, "train", B, T, step_tokens=step_tokens),
                    val=lambda: ShardLoader(cfg.data_dir, "val", B, T), val_steps=cfg.val_steps,
                    train_tokens=None)  # fmt: skip
    tokens = enc.encode_ordinary(load_text(cfg.input))
    split = int(0.9 * len(tokens))  # the last 10% is never trained on
    train, val = tokens[:split], tokens[split:]
    val_steps = min(cfg.val_steps, (len(val) - 1) // (B * T))
    if val_steps < 1:
        raise UserError(f"the held-out last 10% of the text ({len(val):,} tokens) is smaller "
                        f"than one batch of {B}x{T}: lower --batch-size or --seq-len")  # fmt: skip
    print(f"data: {len(train):,} training tokens, {len(val):,} held out "
          f"({val_steps} val batches of {B}x{T})")  # fmt: skip
    return dict(train=lambda: TextLoader(train, B, T), val=lambda: TextLoader(val, B, T),
                val_steps=val_steps, train_tokens=len(train))  # fmt: skip


# --- the table --------------------------------------------------------------------------------


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(name, runs, base_runs):
    """One table row: means over the seeds, and the paired difference to the baseline."""
    val = [r["val_loss"] for r in runs]
    row = dict(name=name, params=runs[0]["params"], val_loss=statistics.mean(val),
               val_spread=spread(val), train_s=statistics.mean(r["train_s"] for r in runs),
               tokens_per_s=statistics.mean(r["tokens_per_s"] for r in runs), delta=None,
               delta_spread=None)  # fmt: skip
    if base_runs is not None:  # same seed, same batches: only the change differs
        deltas = [r["val_loss"] - b["val_loss"] for r, b in zip(runs, base_runs)]
        row["delta"], row["delta_spread"] = statistics.mean(deltas), spread(deltas)
    return row


def format_table(rows, tokens, seeds):
    pm = lambda x: "" if x is None else f" ± {x:.4f}"  # the spread over seeds, when known
    head = (f"{'row':<9} {'params':>11} {'tokens':>10} {'val loss':>17} "
            f"{'vs baseline':>17} {'time':>7} {'tok/s':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        val = f"{r['val_loss']:.4f}{pm(r['val_spread'])}"
        delta = "-"
        if r["delta"] is not None and r["name"] != "baseline":
            delta = f"{r['delta']:+.4f}{pm(r['delta_spread'])}"
        lines.append(f"{r['name']:<9} {r['params']:>11,} {tokens:>10,} {val:>17} {delta:>17} "
                     f"{r['train_s']:>6.1f}s {r['tokens_per_s']:>9,.0f}")  # fmt: skip
    lines.append(f"(means over {seeds} seed(s), ± their standard deviation; val loss on held-out "
                 "text at equal tokens, lower is better; time: training seconds per run, val "
                 "excluded; tok/s: median step, eager mode)")  # fmt: skip
    return "\n".join(lines)


def noise_notice(rows, seeds, device, tokens, preset):
    """Say plainly how much of the table is noise."""
    base = next((r for r in rows if r["name"] == "baseline"), None)
    spreads = [r["delta_spread"] for r in rows if r["delta_spread"] is not None]
    if seeds < 2 or base is None:
        text = ("noise: one seed per row (or no baseline row): the seed spread is unknown, so no "
                "difference in this table can be told from noise; use --seeds 3")  # fmt: skip
    else:
        s = max([base["val_spread"], *spreads])
        text = (f"noise: the largest seed spread here is {s:.4f}; a difference smaller than about "
                f"twice that ({2 * s:.4f}) is noise, not an effect of the change")  # fmt: skip
    if not device.startswith("cuda"):
        text += (f". CPU scale ({tokens:,} tokens per run, preset {preset}): every run stopped at "
                 "the very start of training, so a difference here says which row starts "
                 "faster, not which trains better; run on a GPU (gpt2 preset, 3 seeds) or with "
                 "--data-dir and more --steps for differences that mean something")  # fmt: skip
    return text


def main(cfg):
    device = pick_device(cfg.device)
    enc = get_tokenizer()
    B, T = cfg.batch_size, cfg.seq_len
    names = [n.strip() for n in cfg.rows.split(",") if n.strip()]
    switches = {name: row_switches(cfg, name) for name in names}  # unknown rows fail here
    if cfg.seeds < 1:
        raise UserError(f"--seeds {cfg.seeds}: need at least 1 run per row")
    total_batch = cfg.total_batch or B * T
    if total_batch % (B * T):
        raise UserError(f"--total-batch {total_batch} is not a multiple of B*T = {B * T}")
    data = load_data(cfg, enc)
    tokens = cfg.steps * total_batch  # the same for every row: equal data
    if data["train_tokens"] and tokens > data["train_tokens"]:
        print(f"note: {tokens / data['train_tokens']:.1f} passes over the training text per run: "
              "the val loss also measures how fast each row starts to memorize it")  # fmt: skip
    # bf16 autocast: on the GPU as in stages 05-08; on the CPU it is also faster (see stage 05)
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    if device == "mps":
        ctx = nullcontext()
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32, as in stages 05-08
    print(f"ablation: {len(names)} rows x {cfg.seeds} seed(s), {cfg.steps} steps of "
          f"{total_batch:,} tokens = {tokens:,} tokens per run, preset {cfg.preset}, "
          f"{bench.hardware_name(device)}, torch {torch.__version__}")  # fmt: skip

    runs = {}
    for name in names:
        runs[name] = []
        for i in range(cfg.seeds):
            on = ", ".join(f"{k}={v}" for k, v in switches[name].items()) or "GPT-2"
            print(f"--- row {name} ({on}), seed {cfg.seed + i}")
            runs[name].append(
                train_run(cfg, switches[name], cfg.seed + i, total_batch, data, ctx, device)
            )
            print(f"val loss {runs[name][-1]['val_loss']:.4f}")

    base_runs = runs.get("baseline")
    rows = [summarize(name, runs[name], base_runs) for name in names]
    table = format_table(rows, tokens, cfg.seeds)
    notice = noise_notice(rows, cfg.seeds, device, tokens, cfg.preset)
    print(table)
    print(notice)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(hardware=bench.hardware_name(device), torch=torch.__version__, device=device,
                  config=asdict(cfg), tokens=tokens, rows=rows, notice=notice,
                  runs={n: [dict(r) for r in rs] for n, rs in runs.items()})  # fmt: skip
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    best = min(rows, key=lambda r: r["val_loss"])
    print(f"summary: {len(names)} rows x {cfg.seeds} seed(s) at {tokens:,} tokens each: "
          f"best val loss {best['val_loss']:.4f} ({best['name']}); "
          f"wrote {out / 'ablation.json'}")  # fmt: skip
    return dict(rows=rows, runs=runs, table=table, notice=notice, tokens=tokens)


if __name__ == "__main__":
    main(parse_args(Config))
