"""Stage 01: load OpenAI's GPT-2 weights into our model and prove it is the same network.

Our parameter names match Hugging Face's, so loading is a copy plus a transpose of the four
Conv1D matrices per block. The proof: the same tokens through our model and through
transformers' GPT2LMHeadModel give the same logits (max |difference| ~1e-5 in fp32), and
sampling then writes fluent English. 5 samples of "Hello, I'm a language model," follow.

Run (downloads 500 MB once):   python 01_hf_eval.py
Any size or a local directory: python 01_hf_eval.py --model gpt2-xl | --model path/to/dir
"""

from dataclasses import dataclass

import torch

from common.cli import parse_args
from common.data import get_tokenizer
from common.generate import generate
from common.hf import from_pretrained
from common.device import pick_device
from common.train import seed_all


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    model: str = "gpt2"  # hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local directory
    prompt: str = "Hello, I'm a language model,"  # text to continue
    num_samples: int = 5  # continuations to sample
    new_tokens: int = 30  # tokens per continuation
    top_k: int = 50  # sample among the k most likely tokens only
    seed: int = 42  # same seed, same samples


def main(cfg):
    from transformers import GPT2LMHeadModel

    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    enc = get_tokenizer()
    model = from_pretrained(cfg.model).to(device)  # ours, with OpenAI's weights
    model.eval()
    hf = GPT2LMHeadModel.from_pretrained(cfg.model).to(device)  # the reference
    hf.eval()
    print(f"loaded {cfg.model}: {model.num_params():,} parameters on {device}")

    # the same tokens through both models
    tokens = torch.tensor([enc.encode(cfg.prompt)], device=device)
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max |logit difference| vs transformers: {diff:.2e} over {tokens.numel()} tokens")

    # sample: each row continues the same prompt with its own random draws
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = tokens.repeat(cfg.num_samples, 1)
    out = generate(model, prompt, cfg.new_tokens, top_k=cfg.top_k, generator=gen)
    samples = [enc.decode(row.tolist()) for row in out]
    for text in samples:
        print(">", text)

    print(
        f"summary: our model reproduces transformers' {cfg.model} to {diff:.1e} (max |logit diff|)"
    )
    return dict(max_abs_diff=diff, samples=samples, params=model.num_params())


if __name__ == "__main__":
    main(parse_args(Config))
