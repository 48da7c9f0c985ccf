"""Test fixtures for the driver: a tiny byte-level BPE tokenizer with Qwen's ChatML special tokens, a tiny random
Qwen2 checkpoint that uses it, and small data files.

Everything is built inside the test's tmp directory in well under a second; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import model as M

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
CORPUS = ["user", "assistant", "system", "Please reason step by step, and put your final answer within \\boxed{}.",
          "What is 12 plus 7?", "The answer is \\boxed{19}.", "copy the word", "apple banana cherry"] + \
         [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]


# words for synthetic responses of any length (bench/sft.py)
WORDS_FOR_BENCH = ["apple", "banana", "cherry", "copy", "the", "word", "answer", "is", "step", "by", "reason",
                   "plus", "what", "put", "final", "within", "and", "your"]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 320) -> Path:
    """tokenizer.json (byte-level BPE: any text round-trips) + a Qwen-style tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "bos_token": None,
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "added_tokens_decoder": added,
           "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "chat_template": CHATML}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def build_checkpoint(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Qwen2 checkpoint (hidden 32, 2 layers) with the fixture tokenizer, as an HF directory."""
    out = Path(out_dir)
    tok_dir = build_tokenizer(out.parent / (out.name + "_tokenizer"))
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())
    n_vocab = len(vocab["model"]["vocab"]) + len(SPECIAL_TOKENS)
    eos = n_vocab - 1  # <|im_end|> is added last
    kw = dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, max_position_embeddings=512, bos_token_id=None, eos_token_ids=(eos,),
              tie_word_embeddings=True)
    kw.update(overrides)
    config = M.ModelConfig.tiny("Qwen2ForCausalLM", **kw)
    torch.manual_seed(seed)
    net = M.Transformer(config)
    with torch.no_grad():   # a slightly larger init than default so random outputs are not all uniform
        for p in net.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    M.save_pretrained(net, out, tokenizer_dir=tok_dir)
    return out


def write_jsonl(path: str | Path, records: list) -> Path:
    """Records (dicts, or raw strings written verbatim as lines) to a .jsonl file."""
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
