"""Sample text from our checkpoint or any GPT-2: temperature, top-k, top-p and a KV cache.

    python -m common.sample --ckpt out/ --prompt "Hello, I'm a language model,"   # newest ckpt
    python -m common.sample --model gpt2 --num-samples 3 --top-p 0.9 --temperature 0.8
    python -m common.sample --model path/to/hf_dir --prompt-file prompt.txt --temperature 0

The prompt is read once and filled into a KV cache; every new token then costs one position
(common/generate.py). Several samples of one prompt share that single read.

Output: one sample is streamed to the terminal token by token. With several, all rows
advance together and each is printed, under a `----- sample N -----` line, as soon as it is
complete. A sample ends at <|endoftext|> or after --max-new-tokens. Status lines go to stderr,
so `> out.txt` keeps only the text. On CUDA the model runs under bf16 autocast.

Context: the prompt plus --max-new-tokens must fit the model's block_size (1024 for GPT-2).
A longer request is refused with the largest --max-new-tokens that fits; nothing is cropped
silently. `--temperature 0` is greedy; `--top-k 0` and `--top-p 1` switch those filters off.
"""

import codecs
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from common import UserError
from common.checkpoint import model_from_checkpoint
from common.cli import parse_args
from common.data import EOT, get_tokenizer
from common.generate import stream
from common.hf import from_pretrained
from common.device import pick_device, synchronize
from common.train import seed_all


@dataclass
class Config:
    ckpt: str = ""  # our checkpoint file, or a run directory (its newest ckpt_NNNNNN.pt)
    model: str = "gpt2"  # without --ckpt: gpt2 ... gpt2-xl (hub) or a transformers directory
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    prompt: str = "Hello, I'm a language model,"  # text to continue ("" = a new document)
    prompt_file: str = ""  # read the prompt from this file instead of --prompt
    num_samples: int = 1  # continuations of the same prompt
    max_new_tokens: int = 100  # tokens per continuation at most
    temperature: float = 1.0  # divides the logits: <1 sharper, >1 flatter, 0 greedy
    top_k: int = 50  # draw among the k most likely tokens only (0 = all)
    top_p: float = 1.0  # nucleus: the smallest set of tokens holding this much probability
    seed: int = 1337  # same seed, same text
    use_cache: bool = True  # KV cache; false recomputes the whole sequence for every token


def load_model(cfg, device):
    """Our checkpoint (--ckpt) or a GPT-2 in transformers' format (--model) -> (model, name)."""
    if cfg.ckpt:
        model, ckpt = model_from_checkpoint(cfg.ckpt, device)
        return model, f"checkpoint {cfg.ckpt} (step {ckpt['step']})"
    return from_pretrained(cfg.model).to(device), cfg.model


def read_prompt(cfg, enc):
    """The prompt's text and tokens; an empty prompt starts a new document (<|endoftext|>)."""
    text = cfg.prompt
    if cfg.prompt_file:
        if not Path(cfg.prompt_file).is_file():
            raise UserError(f"prompt file not found: {cfg.prompt_file}")
        try:
            text = Path(cfg.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{cfg.prompt_file} is not UTF-8 text (byte {e.start})") from None
    tokens = enc.encode(text, allowed_special={"<|endoftext|>"}) or [EOT]
    return text, tokens


def check_args(cfg, n_prompt, block_size):
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be at least 1")
    if cfg.temperature < 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise UserError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    if n_prompt >= block_size:
        raise UserError(
            f"the prompt is {n_prompt} tokens but the model's block_size is {block_size}: "
            "shorten it"
        )
    if n_prompt + cfg.max_new_tokens > block_size:
        raise UserError(
            f"prompt ({n_prompt} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds the "
            f"model's block_size {block_size}: use --max-new-tokens {block_size - n_prompt} or less"
        )


def main(cfg):
    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    enc = get_tokenizer()
    model, name = load_model(cfg, device)
    model.eval()
    text, tokens = read_prompt(cfg, enc)
    check_args(cfg, len(tokens), model.config.block_size)
    n = cfg.num_samples
    print(
        f"{name}: {model.num_params():,} parameters, block_size {model.config.block_size}, "
        f"on {device}; prompt {len(tokens)} tokens",
        file=sys.stderr,
    )

    idx = torch.tensor([tokens], device=device).repeat(n, 1)  # (n, T): stream() reads it once
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    rows, finished = [[] for _ in range(n)], [False] * n
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character

    def finish(i):  # print sample i whole (several samples), or end the stream (one)
        finished[i] = True
        if n == 1:
            print(utf8.decode(b"", final=True), flush=True)
        else:
            print(f"----- sample {i + 1} -----\n{text}{enc.decode(rows[i])}", flush=True)

    if n == 1:
        print(text, end="", flush=True)
    t0 = time.perf_counter()
    with amp:
        for nxt in stream(
            model,
            idx,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k or None,
            gen,
            cfg.top_p,
            eos=EOT,
            use_cache=cfg.use_cache,
        ):
            for i, t in enumerate(nxt[:, 0].tolist()):
                if finished[i]:
                    continue
                if t == EOT:  # the end of a document: this sample is done
                    finish(i)
                    continue
                rows[i].append(t)
                if n == 1:
                    print(utf8.decode(enc.decode_single_token_bytes(t)), end="", flush=True)
    for i in range(n):  # the rest ran to --max-new-tokens
        if not finished[i]:
            finish(i)
    synchronize(device)
    dt = time.perf_counter() - t0
    new = sum(len(r) for r in rows)
    print(
        f"generated {new} tokens in {dt:.2f}s ({new / dt:,.1f} tok/s, "
        f"KV cache {'on' if cfg.use_cache else 'off'})",
        file=sys.stderr,
    )
    samples = [text + enc.decode(r) for r in rows]
    return dict(samples=samples, tokens=rows, new_tokens=new, tokens_per_s=new / dt)


if __name__ == "__main__":
    main(parse_args(Config))
