"""Export our checkpoint as a transformers GPT-2 directory, for tools that speak transformers.

Our parameter names already match GPT2LMHeadModel's, so the export is `hf_state_dict()` (the
Conv1D transposes, the vocab padding of stage 05 trimmed back to 50257) in a GPT2Config of
the same sizes, saved with save_pretrained. The tokenizer files come from tiktoken's GPT-2
files (the same cache the stages use, so this works offline); without them the model is
still written and a one-line notice says how to add them.

    python -m common.export --ckpt out/ckpt_019073.pt --out gpt2-ours   # or --ckpt out/
    python -c "from transformers import pipeline; \\
        print(pipeline('text-generation', model='gpt2-ours')('Hello, I am')[0])"
    lm_eval --model hf --model_args pretrained=gpt2-ours --tasks hellaswag

Going back: common.hf.from_pretrained("gpt2-ours") gives our model with identical logits.
"""

from dataclasses import dataclass
from pathlib import Path

from common import UserError
from common.checkpoint import model_from_checkpoint
from common.cli import parse_args
from common.hf import hf_state_dict
from common.model import GPT2_VOCAB

# tiktoken's "gpt2" encoding is built from OpenAI's two original files; they are exactly
# transformers' vocab.json and merges.txt, and tiktoken caches them under TIKTOKEN_CACHE_DIR
GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}


@dataclass
class Config:
    ckpt: str = ""  # our checkpoint file, or a run directory (its newest ckpt_NNNNNN.pt)
    out: str = ""  # directory to write the transformers model into
    force: bool = False  # write into a non-empty --out, replacing files of the same names
    tokenizer: bool = True  # also write GPT-2's tokenizer files (from tiktoken's cache)


def hf_config(config):
    """Our GPTConfig -> transformers' GPT2Config of the same sizes."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=min(config.vocab_size, GPT2_VOCAB),  # padded rows are no tokens: trimmed
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",  # the tanh approximation, as our MLP
        tie_word_embeddings=config.tie_weights,  # an untied lm_head is saved on its own
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # we train without dropout
    )


def to_hf(model):
    """Our GPT -> an equivalent transformers GPT2LMHeadModel (on the CPU, in eval mode)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_config(model.config))
    hf.load_state_dict(hf_state_dict(model))  # strict: every tensor has its place
    return hf.eval()


def save_tokenizer(out, block_size):
    """Write GPT-2's tokenizer into `out`; returns None, or why it could not."""
    try:
        from tiktoken.load import read_file_cached  # tiktoken's own download-once cache
        from transformers import GPT2TokenizerFast

        for name, source in TOKENIZER_FILES.items():
            (out / name).write_bytes(read_file_cached(GPT2_FILES + source))
        tok = GPT2TokenizerFast.from_pretrained(out, model_max_length=block_size)
        if len(tok) != GPT2_VOCAB:  # a tokenizer built from nothing loads with an empty vocab
            raise ValueError(f"tokenizer has {len(tok)} tokens, expected {GPT2_VOCAB}")
        tok.save_pretrained(out)  # adds tokenizer.json and tokenizer_config.json
    except Exception as e:  # offline without the cache, or an unexpected file
        for name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def export(model, out, force=False, tokenizer=True):
    """Write `model` (our GPT) to directory `out` as a transformers GPT-2; returns its path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty: choose another directory or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    to_hf(model).save_pretrained(out)
    if tokenizer and (why := save_tokenizer(out, model.config.block_size)):
        print(
            f'note: no tokenizer files written ({why}); add them with: python -c "from '
            f"transformers import GPT2TokenizerFast as T; T.from_pretrained('gpt2')"
            f".save_pretrained('{out}')\""
        )
    return out


def main(cfg):
    if not cfg.ckpt or not cfg.out:
        raise UserError("give --ckpt (a checkpoint file or run directory) and --out DIR")
    model, ckpt = model_from_checkpoint(cfg.ckpt)
    out = export(model, cfg.out, force=cfg.force, tokenizer=cfg.tokenizer)
    files = sorted(p.name for p in out.iterdir())
    c = model.config
    print(
        f"exported step {ckpt['step']} ({model.num_params():,} parameters, {c.n_layer} layers, "
        f"{c.n_embd} wide, block {c.block_size}) to {out}: {', '.join(files)}"
    )
    return dict(out=str(out), files=files, step=ckpt["step"])


if __name__ == "__main__":
    main(parse_args(Config))
