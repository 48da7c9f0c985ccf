"""bench/sft.py -- SFT training tokens/s of `retu.py sft` against a plain PyTorch loop, in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sft.py                    # CPU, fp32, a small Qwen2 shape
    .venv/bin/python bench/sft.py --shape qwen2.5-0.5b --steps 12       # with CUDA: bf16, MFU of both loops

Both loops train the same random-weight checkpoint on the same synthetic SFT data (varied lengths), the same
sequences per optimiser step, the same AdamW settings:
  * retu:  the real driver (`retu.main(["sft", ...])`, in process): FSDP2 on GPU (bf16 mixed precision; one fp32
           process on the CPU trains the plain module, train.shard_model), padding-free packing into
           micro-batches of --tokens-per-microbatch, chunked log-probs (no (T, V) logits), global token-mean
           loss, bf16 mixed precision on GPU; its per-step `tokens_per_s` is read back from metrics.jsonl.
  * plain: the textbook loop: the step's sequences right-padded into fixed-size micro-batches, full (B, T, V)
           logits, F.cross_entropy with ignore_index, torch.autocast(bf16) on GPU; same model class.
Tokens counted = real (unpadded) prompt + response tokens. The first --warmup steps of each loop are dropped.
MFU (GPU only) = model FLOPs (paper App. C, 3x forward at each sequence's length) / time / the card's bf16 peak.
This is not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from fixtures import WORDS_FOR_BENCH, build_checkpoint, write_jsonl  # noqa: E402

import data as D  # noqa: E402
import model as M  # noqa: E402
import retu  # noqa: E402
import train as T  # noqa: E402

SHAPES = {  # Qwen2 geometry, random weights
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                  num_kv_heads=2, head_dim=32, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
}

def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in T.PEAK_BF16.items() if k in name), None)


def make_data(path: Path, n: int, lo: int, hi: int, seed: int = 0) -> Path:
    """n examples whose responses have between lo and hi words (a word is about one or two tokens)."""
    rng = np.random.default_rng(seed)
    recs = [{"prompt": f"copy the words {i}", "response": " ".join(rng.choice(WORDS_FOR_BENCH, rng.integers(lo, hi)))}
            for i in range(n)]
    return write_jsonl(path, recs)


def run_retu(ck: Path, train: Path, out: Path, a) -> list[dict]:
    argv = ["sft", "--model", str(ck), "--train", str(train), "--run-dir", str(out), "--device", a.device,
            "--sequences-per-step", str(a.sequences_per_step), "--max-steps", str(a.steps), "--lr", "1e-5",
            "--warmup-ratio", "0", "--max-seq-len", str(a.tokens_per_microbatch),
            "--tokens-per-microbatch", str(a.tokens_per_microbatch), "--save-every", str(10 ** 9),
            "--val-every", str(10 ** 9), "--log-every", str(10 ** 9)]
    if a.activation_checkpointing:
        argv.append("--activation-checkpointing")
    assert retu.main(argv) == 0
    with open(out / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "train"]


def run_plain(ck: Path, ds: D.TokenizedSFT, a, dev: torch.device) -> list[dict]:
    """The textbook loop: pad, full logits, cross_entropy; micro-batches of at most tokens_per_microbatch padded
    tokens (rows of the longest sequence in the step)."""
    net = M.from_pretrained(ck, device=dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    out = []
    for step in range(a.steps):
        t0 = time.time()
        idx = retu.sft_batch(step, len(ds), a.sequences_per_step, seed=0)
        width = max(ds.length(i) for i in idx)
        rows = max(1, a.tokens_per_microbatch // width)
        n_trained = sum(ds.length(i) - int(ds.n_prompt[i]) for i in idx)
        for s in range(0, len(idx), rows):
            chunk = idx[s:s + rows]
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, i in enumerate(chunk):
                tokens, n_prompt = ds.example(i)
                t = torch.from_numpy(tokens.astype(np.int64))
                ids[r, :len(t)] = t
                labels[r, n_prompt:len(t)] = t[n_prompt:]
            ids, labels = ids.to(dev), labels.to(dev)
            with amp:
                logits = net(ids)                                          # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_trained
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tokens = sum(ds.length(i) for i in idx)
        out.append({"step": step + 1, "tokens_per_s": tokens / dt, "step_time": dt, "tokens": tokens,
                    "flops": M.flops_for_lengths(net.config, [ds.length(i) for i in idx])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sequences-per-step", type=int, default=16)
    ap.add_argument("--tokens-per-microbatch", type=int, default=2048)
    ap.add_argument("--words", type=int, nargs=2, default=(40, 400), help="response length range, in words")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop; the best one counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = build_checkpoint(tmp / "base", **SHAPES[a.shape])
        train = make_data(tmp / "train.jsonl", a.sequences_per_step * (a.steps + 1), *a.words)
        tok = M.load_tokenizer(ck)
        ds = D.load_sft(str(train), tok, max_seq_len=a.tokens_per_microbatch)
        lengths = [ds.length(i) for i in range(len(ds))]
        # alternate the loops and keep each one's best repeat: other processes on a shared machine come and go
        runs = {"retu": [], "plain": []}
        for rep in range(a.repeats):
            runs["plain"].append(run_plain(ck, ds, a, dev))
            runs["retu"].append(run_retu(ck, train, tmp / f"run{rep}", a))
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
           f"{torch.get_num_threads()} threads)", "shape": a.shape, "steps_timed": a.steps - a.warmup,
           "sequences_per_step": a.sequences_per_step, "mean_len": float(np.mean(lengths)),
           "tokens_per_microbatch": a.tokens_per_microbatch}
    peak = peak_flops() if dev.type == "cuda" else None
    # both loops see the same batches, so the plain loop's FLOPs (App. C, actual lengths) serve for both
    flops = sum(r["flops"] for r in runs["plain"][0][a.warmup:])
    for name, reps in runs.items():
        speeds = []
        for recs in reps:
            timed = recs[a.warmup:]
            speeds.append((sum(r["tokens"] for r in timed) / sum(r["step_time"] for r in timed),
                           sum(r["step_time"] for r in timed)))
        res[f"{name}_tokens_per_s_each_repeat"] = [round(v, 1) for v, _ in speeds]
        res[f"{name}_tokens_per_s"] = max(v for v, _ in speeds)
        if peak:
            res[f"{name}_mfu"] = flops / min(t for _, t in speeds) / peak
    res["speedup"] = res["retu_tokens_per_s"] / res["plain_tokens_per_s"]
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
