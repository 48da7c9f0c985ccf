"""bench/sampler.py -- tokens/s of rollout.generate against baselines measured in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sampler.py                 # CPU, fp32: tiny and 0.5B shapes
    OMP_NUM_THREADS=2 .venv/bin/python bench/sampler.py --only tiny
    .venv/bin/python bench/sampler.py                                    # with CUDA: bf16 GPU table instead

Baselines: a no-cache loop (re-runs the full forward over prompt + generated tokens every step, same sampler;
on CPU only, one run) and HF transformers `generate` when transformers is importable (a bench-only extra, not a
test dependency). On CPU three more rows show where the speed comes from: FastDecoder's torch ops instead of the
native step and sampler of kernels_cpu.c (kernels_cpu.USE_NATIVE off), the decode step through model.forward
(rollout.FAST_CPU_DECODE off, torch sampler), and a weight update before each call, as in RL, so that
FastDecoder's regrouped weights are rebuilt inside the timed call (otherwise they are reused between calls; their
build time is printed).
All engines load the same random-weight checkpoint written by `model.save_pretrained`, and every run samples
(no stop tokens) so all of them generate exactly the same number of tokens.

On CUDA it runs rollout.generate eagerly and with cuda_graph=True (and prints how often their greedy tokens
agree, a check of the graph path), and reports decode memory bandwidth as a fraction of the card's peak: per
decode step the weights are read once and every sequence reads its cached K/V, so bytes = steps * weight bytes
+ sum of KV bytes read.
The whole generate() time (prefill included) is in the denominator, so the fraction is a lower bound.
This is not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels_cpu  # noqa: E402
import rollout  # noqa: E402
from model import ModelConfig, Transformer, from_pretrained, save_pretrained  # noqa: E402
from rollout import generate, sample  # noqa: E402

SHAPES = {  # Qwen2 geometry; random weights
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                 num_kv_heads=2, head_dim=32, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
}
# (shape, batch, prompt tokens, new tokens)
CPU_RUNS = [("tiny", 16, 32, 128), ("qwen2.5-0.5b", 4, 32, 32)]
GPU_RUNS = [("qwen2.5-0.5b", 64, 256, 512), ("qwen2.5-1.5b", 64, 256, 512)]
# peak memory bandwidth in bytes/s, matched against torch.cuda.get_device_name()
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
           ("A100-SXM4-80GB", 2.04e12),
           ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12), ("L40S", 0.864e12), ("A10G", 0.6e12), ("4090", 1.008e12)]
TEMPERATURE = 0.7


def build_checkpoint(shape: str, path: Path, dtype: torch.dtype) -> ModelConfig:
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True,
                      max_position_embeddings=32768, **SHAPES[shape])
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # HF-like init (std 0.02) so logits are not degenerate
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    save_pretrained(model.to(dtype), path)
    return cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def no_cache_loop(model, prompts: torch.Tensor, new: int, gen: torch.Generator):
    """The baseline without a KV cache: every step re-runs the forward over all tokens so far."""
    ids = prompts
    for _ in range(new):
        tok, _ = sample(model.logits(model(ids, hidden_only=True)[:, -1]), TEMPERATURE, 0, 1.0, gen)
        ids = torch.cat([ids, tok[:, None]], dim=1)
    return ids


def hf_model(path: Path, dtype, device):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def hf_generate(hf, prompts: torch.Tensor, new: int):
    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=TEMPERATURE,
                       top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)


def roofline(cfg: ModelConfig, model, batch: int, plen: int, new: int, seconds: float, dtype) -> float:
    """Bytes a perfect decode would move (weights once per step + K/V each sequence reads), per second."""
    elem = torch.finfo(dtype).bits // 8
    w_bytes = sum(p.numel() for p in model.parameters()) * elem
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem
    steps = new - 1  # the first token comes from the prefill
    kv_read = batch * sum(plen + t + 1 for t in range(steps)) * kv_per_token
    return (steps * w_bytes + kv_read) / seconds


def run(shape, batch, plen, new, device, dtype, skip_no_cache, skip_hf, rows):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / shape
        cfg = build_checkpoint(shape, path, dtype)
        model = from_pretrained(path, dtype=dtype, device=device)
        hf = None if skip_hf else hf_model(path, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, plen), generator=g, device=device)
    plist = prompts.tolist()
    label = f"{shape} B={batch} P={plen} new={new} {str(dtype).removeprefix('torch.')}"

    engines = {}  # name -> a function generating batch * new tokens
    # on CPU also the decode step through model.forward (FastDecoder off), and a weight update before every call
    # (as in RL: FastDecoder's regrouped weights are rebuilt each time; otherwise they are reused between calls)
    variants = [("", False, True, False), (" cuda_graph", True, True, False)] if device.type == "cuda" else \
        [("", False, True, False), (" (weights updated before the call)", False, True, True),
         (" (native code off: torch ops)", False, "torch", False), (" (model.forward decode)", False, False, False)]
    # the torch-ops variant decodes a copy of the model: FastDecoder keeps one decoder per model, and switching
    # between native and torch ops on one model would rebuild it inside every timed call
    twin = copy.deepcopy(model) if device.type == "cpu" else None
    for suffix, cuda_graph, fast, update in variants:
        def ours(cuda_graph=cuda_graph, fast=fast, update=update):
            if update:
                model.norm.weight.add_(0.0)  # an in-place write: a new version of the weights
            rollout.FAST_CPU_DECODE, kernels_cpu.USE_NATIVE = bool(fast), fast is True
            outs = generate(twin if fast == "torch" else model, plist, max_new_tokens=new, temperature=TEMPERATURE,
                            seed=0, cuda_graph=cuda_graph)
            rollout.FAST_CPU_DECODE, kernels_cpu.USE_NATIVE = True, True
            assert sum(len(o.token_ids) for o in outs) == batch * new
        engines["rollout.generate" + suffix] = ours
    if hf is not None:
        engines["HF transformers generate"] = lambda: hf_generate(hf, prompts, new)
    with torch.no_grad():
        for fn in engines.values():  # warm-up (Triton/cuBLAS initialisation, allocator)
            fn()
        best = {name: math.inf for name in engines}
        for _ in range(3):  # interleaved, best of 3: fairer than back-to-back runs on a machine with other load
            for name, fn in engines.items():
                best[name] = min(best[name], timed(fn, device))
        if not skip_no_cache:  # one run: it is slow, and not the comparison that matters
            no_cache_loop(model, prompts, 2, g)
            best["no-cache loop"] = timed(lambda: no_cache_loop(model, prompts, new, g), device)
        if device.type == "cpu":  # paid by the first generate() after each weight update
            build = min(timed(lambda: rollout.FastDecoder(model, batch), device) for _ in range(3))
            dec = rollout.FastDecoder(model, batch)
            model_mb = sum(p.nbytes for p in model.parameters()) / 2**20
            layout = f"MKL-packed for {dec.rows} rows" if dec.rows else "transposed"
            layout += f", native step ({kernels_cpu.SOURCE.name})" if dec.native else \
                f", torch ops (native step: {kernels_cpu.unavailable_reason() or 'not for this shape'})"
            print(f"# {label}: FastDecoder weight regrouping {build * 1e3:.1f} ms "
                  f"({build / best['rollout.generate']:.1%} of a generate() call that reuses them); "
                  f"{layout}: {dec.nbytes / 2**20:,.0f} MB "
                  f"(the model's parameters: {model_mb:,.0f} MB)")
    base = batch * new / best["rollout.generate"]
    for name, t in best.items():
        row = {"run": label, "engine": name, "tok/s": batch * new / t, "s": t, "ours / this": base * t / (batch * new)}
        if device.type == "cuda" and name.startswith("rollout"):
            peak = next((bw for gpu, bw in PEAK_BW if gpu in torch.cuda.get_device_name()), None)
            bw = roofline(cfg, model, batch, plen, new, t, dtype)
            row["GB/s"] = bw / 1e9
            row["roofline"] = None if peak is None else bw / peak
        rows.append(row)
    if device.type == "cuda":
        eager, graph = (generate(model, plist, max_new_tokens=32, temperature=0, cuda_graph=c) for c in (False, True))
        same = sum(a == b for x, y in zip(eager, graph) for a, b in zip(x.token_ids, y.token_ids))
        print(f"# {label}: greedy tokens equal between eager and cuda_graph: {same}/{batch * 32} "
              "(bf16 near-ties may differ)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated shape names to run (default: all of the device's table)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    table = GPU_RUNS if cuda else CPU_RUNS
    if args.only:
        table = [r for r in table if r[0] in args.only.split(",")]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"# device: {where}; torch {torch.__version__}; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for shape, batch, plen, new in table:
        # the no-cache loop is quadratic in length: on CPU the runs are short enough, the GPU runs are not
        run(shape, batch, plen, new, device, dtype, skip_no_cache=cuda, skip_hf=args.no_hf, rows=rows)
    print(f"# load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cols = ["run", "engine", "tok/s", "s", "ours / this"] + (["GB/s", "roofline"] if cuda else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
