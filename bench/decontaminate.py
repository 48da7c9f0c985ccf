"""bench/decontaminate.py -- `retu.py data decontaminate` throughput (prompts/s) against a one-prompt-at-a-time
loop, in the same run, and the similarity stage alone at the paper's scale of dimensions.

    OMP_NUM_THREADS=2 .venv/bin/python bench/decontaminate.py          # CPU, fp32, a small random Qwen3 embedder
    .venv/bin/python bench/decontaminate.py --train 20000 --device cuda

Both paths embed the same synthetic prompts (varied lengths) with the same random-weight Qwen3 checkpoint
(stored as Qwen3-Embedding is: no "model." prefix, no LM head) and find the same removed benchmark items:
  * retu:  the command in process: length-sorted, right-padded batches of --tokens-per-batch tokens, benchmark
           embeddings resident, one (B, chunk) matrix product per chunk of training prompts (model.embed);
  * plain: one forward per prompt (no padding, no batching), then the full (B, N) similarity matrix.
prompts/s counts benchmark + training prompts. The similarity stage is also timed alone on random unit vectors
of width --hidden-sim (4096: Qwen3-Embedding-8B) for --bench-sim benchmark items: the cost per training prompt of
the running maximum, which bounds the command at ~900K x ~2K once the embedding itself is fast (a GPU).
This is not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from fixtures import WORDS_FOR_BENCH, build_tokenizer, write_jsonl  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import curate as C  # noqa: E402
import model as M  # noqa: E402
import retu  # noqa: E402


def build_embedder(out: Path, hidden: int, layers: int) -> Path:
    tok_dir = build_tokenizer(out.parent / "tok")
    cfg = M.ModelConfig.tiny("Qwen3ForCausalLM", vocab_size=M.load_tokenizer(tok_dir).vocab_size,
                             hidden_size=hidden, intermediate_size=hidden * 3, num_layers=layers, num_heads=8,
                             num_kv_heads=4, head_dim=hidden // 8, max_position_embeddings=4096)
    torch.manual_seed(0)
    M.save_pretrained(M.Transformer(cfg), out, tokenizer_dir=tok_dir)
    sd = load_file(out / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def make_prompts(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS_FOR_BENCH, rng.integers(10, 120))) + f" {i}?" for i in range(n)]


def plain(model, tok, bench: list[str], train: list[str], cfg) -> np.ndarray:
    """One forward per prompt, then the full similarity matrix: the straightforward way."""
    eos = tok.encode(cfg.eos_token)
    with torch.inference_mode():
        def one(t):
            h = model(torch.tensor([tok.encode(t) + eos], device=cfg.device), hidden_only=True)[0, -1].float()
            return h / h.norm()
        b = torch.stack([one(t) for t in bench])
        e = torch.stack([one(t) for t in train])
        return (b @ e.T).max(dim=1).values.cpu().numpy()


def similarity_stage(n_bench: int, hidden: int, n_train: int, chunk: int, device: str) -> float:
    """Training prompts/s of the running max over chunks, for pre-computed unit embeddings."""
    g = torch.Generator(device=device).manual_seed(0)
    b = torch.nn.functional.normalize(torch.randn(n_bench, hidden, generator=g, device=device), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(chunk, hidden, generator=g, device=device), dim=-1)
    best = torch.full((n_bench,), -2.0, device=device)
    t0 = time.perf_counter()
    for _ in range(n_train // chunk):
        top, _ = (b @ e.T).max(dim=1)
        best = torch.maximum(best, top)
    best.cpu()
    return (n_train // chunk) * chunk / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=3000, help="training prompts")
    ap.add_argument("--bench", type=int, default=200, help="benchmark items")
    ap.add_argument("--hidden", type=int, default=256, help="embedder width")
    ap.add_argument("--layers", type=int, default=4, help="embedder depth")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bench-sim", type=int, default=2000, help="benchmark items for the similarity stage")
    ap.add_argument("--hidden-sim", type=int, default=4096, help="embedding width for the similarity stage")
    ap.add_argument("--train-sim", type=int, default=65536, help="training prompts for the similarity stage")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        emb = build_embedder(tmp / "emb", a.hidden, a.layers)
        bench, train = make_prompts(a.bench, rng), make_prompts(a.train, rng)
        for k in range(0, a.bench, max(1, a.bench // 5)):                      # planted copies
            train[(k * 7919) % a.train] = bench[k]
        write_jsonl(tmp / "bench.jsonl", [{"prompt": t, "answer": "1"} for t in bench])
        write_jsonl(tmp / "train.jsonl", [{"prompt": t} for t in train])
        flags = ["data", "decontaminate", "--benchmarks", str(tmp / "bench.jsonl"), "--train",
                 str(tmp / "train.jsonl"), "--model", str(emb), "--out-dir", str(tmp / "out"), "--threshold",
                 "0.9999", "--device", a.device, "--tokens-per-batch", str(a.tokens_per_batch)]
        t0 = time.perf_counter()
        assert retu.main(flags) == 0
        t_retu = time.perf_counter() - t0
        rep = json.loads((tmp / "out" / "removed.json").read_text())["benchmarks"]["bench"]
        cfg = C.DecontamConfig(benchmarks=[], train=[], out_dir="", model=str(emb), device=a.device)
        model, tok = M.from_pretrained(emb, device=a.device, headless=True).eval(), M.load_tokenizer(emb)
        t0 = time.perf_counter()
        scores = plain(model, tok, bench, train, cfg)
        t_plain = time.perf_counter() - t0
    same = sorted(r["where"] for r in rep["removed"]) == sorted(
        f"{tmp / 'bench.jsonl'}:{i + 1}" for i in np.flatnonzero(scores > 0.9999))
    n = a.bench + a.train
    print(f"decontaminate, {a.bench} benchmark x {a.train} training prompts, Qwen3 embedder hidden {a.hidden} x "
          f"{a.layers} layers, {a.device}, {torch.get_num_threads()} threads (load included):")
    print(f"  retu  {n / t_retu:9.1f} prompts/s  ({t_retu:.2f} s)")
    print(f"  plain {n / t_plain:9.1f} prompts/s  ({t_plain:.2f} s)   retu / plain = {t_plain / t_retu:.2f}x")
    print(f"  same removed items: {same} ({rep['original']} -> {rep['cleaned']})")
    rate = similarity_stage(a.bench_sim, a.hidden_sim, a.train_sim, 8192, a.device)
    print(f"similarity stage alone, {a.bench_sim} benchmark items x width {a.hidden_sim}: {rate:,.0f} training "
          f"prompts/s (900K prompts: {900_000 / rate:.0f} s)")


if __name__ == "__main__":
    main()
