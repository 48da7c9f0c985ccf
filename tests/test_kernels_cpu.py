"""kernels_cpu.c (the native CPU decode step and sampler) against their specification: rollout.FastDecoder's
PyTorch ops, rollout.sample's torch path, naive float64 computations; plus its fallback when it cannot build."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels_cpu
import rollout
from model import ModelConfig, Transformer

needs_native = pytest.mark.skipif(not kernels_cpu.available(),
                                  reason=f"native CPU kernels unavailable: {kernels_cpu.unavailable_reason()}")
ROOT = Path(__file__).resolve().parents[1]


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("head_dim", [12, 32, 64, 128])       # 32/64/128: unrolled copies; 12: the generic one
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (7, 1)])   # GQA groups 1, 2, 7
def test_decode_step_matches_torch_ops(heads, head_dim, threads):
    """One decode step through the native code and through FastDecoder's torch ops (x @ W_t layout): logits and
    the K/V written, with a cached history to attend to, positions 0 (one key) up to the last cache row, and the
    attention heads split over 1 or 2 OpenMP threads."""
    nh, nkv = heads
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny("Qwen2ForCausalLM", num_heads=nh, num_kv_heads=nkv,
                                         head_dim=head_dim)).eval()
    c = model.config
    rows, S = 5, 24
    native, plain = rollout.FastDecoder(model, rows=rows), rollout.FastDecoder(model, rows=1)
    assert native.native and not plain.native
    cache = rollout.KVCache(c.num_layers, rows + 1, nkv, S, head_dim)
    cache._allocate(torch.zeros(()))
    cache.kv.normal_()
    history = cache.kv.clone()
    tokens, pos = torch.tensor([3, 90, 0, 41, 7]), torch.tensor([0, 9, 23, 1, 16])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = []
            for dec in (native, plain):
                cache.kv.copy_(history)
                dec._rope_tables(S)
                cache.set_decode(pos, S)
                out.append((dec(tokens, pos, cache), cache.kv.clone()))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out[0][0], out[1][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-6, rtol=1e-6)
    changed = (out[0][1] != history).any(-1)                   # (layers, 2, slots, nkv, S): rows written
    assert changed.sum() == c.num_layers * 2 * rows * nkv      # exactly one position per row, kv head, layer
    assert not changed[:, :, rows].any()                       # the slot past the step's rows is untouched


@needs_native
def test_native_step_refuses_inputs_that_do_not_fit():
    """The C code trusts its pointers: anything that does not fit the decoder is refused in Python with the
    shapes and dtypes in the message, before the call."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    c = model.config
    dec = rollout.FastDecoder(model, rows=2)
    dec._rope_tables(8)
    tokens, pos = torch.tensor([1, 2]), torch.tensor([0, 3])
    cache = rollout.KVCache(c.num_layers, 2, c.num_kv_heads, 8, c.head_dim)
    with pytest.raises(RuntimeError, match=r"cache \(2, 2, 2, 2, 8, 8\) not allocated do not fit the model"):
        dec(tokens, pos, cache)                                 # no K/V allocated yet
    cache._allocate(torch.zeros(()))
    assert dec(tokens, pos, cache).shape == (2, c.vocab_size)   # the same call once it fits
    other = rollout.KVCache(c.num_layers, 2, c.num_kv_heads, 8, c.head_dim * 2)
    other._allocate(torch.zeros(()))
    wide = rollout.KVCache(c.num_layers, 2, c.num_kv_heads, 16, c.head_dim)   # longer than the RoPE table
    wide._allocate(torch.zeros(()))
    f64 = rollout.KVCache(c.num_layers, 2, c.num_kv_heads, 8, c.head_dim)
    f64._allocate(torch.zeros((), dtype=torch.float64))
    for t, p, kv in [(tokens, pos.int(), cache), (torch.tensor([1, 0, 2, 0])[::2], pos, cache),
                     (tokens, pos, other), (tokens, pos, wide), (tokens, pos, f64)]:
        with pytest.raises(RuntimeError, match="do not fit the model"):
            dec(t, p, kv)


def model_prefill(model, prompts, slots, S):
    """The specification of a native prefill: model.forward over the packed prompts with the sampler's cache
    (prompt i into slot slots[i]); returns (last-position logits, the cache)."""
    c = model.config
    cache = rollout.KVCache(c.num_layers, max(slots) + 1, c.num_kv_heads, S, c.head_dim)
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()
    bounds = [(e - len(p), e) for p, e in zip(prompts, ends)]
    slot = torch.tensor([s for p, s in zip(prompts, slots) for _ in p])
    pos = torch.tensor([i for p in prompts for i in range(len(p))])
    cache.set_prefill(bounds, slot, pos, torch.arange(ends[-1]), {})
    ids = torch.tensor([t for p in prompts for t in p])
    h = model(ids[None], position_ids=pos[None], cache=cache, hidden_only=True)
    return model.logits(h[0, [e - 1 for e in ends]]), cache, (ids, slot, pos, torch.tensor(ends) - 1)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("arch, heads, head_dim", [("Qwen2ForCausalLM", (4, 2), 32), ("Qwen2ForCausalLM", (7, 1), 12),
                                                   ("Qwen3ForCausalLM", (2, 2), 64), ("LlamaForCausalLM", (4, 2), 16)])
def test_prefill_matches_model_forward(arch, heads, head_dim, threads):
    """Packed prompts of 1 to 70 tokens (80 rows: the norms and SiLU split over the threads) in one native call,
    against model.forward with the same cache: the last-position logits, and the cache, which must hold exactly
    the prompts' K/V in their slots (biases: Qwen2; q/k norms: Qwen3; untied head: Llama)."""
    nh, nkv = heads
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(arch, num_heads=nh, num_kv_heads=nkv, head_dim=head_dim)).eval()
    V, S = model.config.vocab_size, 72
    prompts = [torch.randint(V, (n,)).tolist() for n in (5, 1, 70, 4)]
    slots = [3, 0, 4, 1]                                       # slot 2 stays empty
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            want, ref, (ids, slot, pos, last) = model_prefill(model, prompts, slots, S)
            dec = rollout.FastDecoder(model, rows=4)
            dec._rope_tables(S)
            cache = rollout.KVCache(*ref.shape[:1], ref.shape[2], nkv, S, head_dim)
            cache._allocate(torch.zeros(()))
            cache.kv.fill_(7.0)                                # what the prefill does not write stays 7
            got = dec.prefill(ids, slot, pos, last, cache)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    written = torch.zeros(ref.shape[2], S, dtype=torch.bool)
    for p, s in zip(prompts, slots):
        written[s, :len(p)] = True
    torch.testing.assert_close(cache.kv[:, :, written.nonzero()[:, 0], :, written.nonzero()[:, 1]],
                               ref.kv[:, :, written.nonzero()[:, 0], :, written.nonzero()[:, 1]], atol=1e-5, rtol=1e-5)
    assert (cache.kv.transpose(3, 4)[:, :, ~written] == 7.0).all()


@needs_native
def test_prefill_refuses_what_does_not_fit():
    """Out-of-range tokens, positions, slots or last rows are refused before anything is written; so are index
    tensors of the wrong dtype or length, and a decoder that is not native."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    c = model.config
    dec = rollout.FastDecoder(model, rows=2)
    dec._rope_tables(8)
    cache = rollout.KVCache(c.num_layers, 2, c.num_kv_heads, 8, c.head_dim)
    cache._allocate(torch.zeros(()))
    ok = dict(tokens=torch.tensor([1, 2, 3]), slot=torch.tensor([1, 1, 1]), pos=torch.tensor([0, 1, 2]),
              last=torch.tensor([2]))
    assert dec.prefill(*ok.values(), cache).shape == (1, c.vocab_size)
    cache.kv.zero_()
    for key, bad in [("tokens", torch.tensor([1, c.vocab_size, 3])), ("pos", torch.tensor([0, 1, 8])),
                     ("slot", torch.tensor([1, 2, 1])), ("slot", torch.tensor([1, -1, 1])),
                     ("last", torch.tensor([3]))]:
        with pytest.raises(RuntimeError, match=r"native prefill\): a token outside \[0, \d+\), a position outside "
                                               r"\[0, 8\), a slot outside \[0, 2\) or a last row outside \[0, 3\)"):
            dec.prefill(*{**ok, key: bad}.values(), cache)
    assert (cache.kv == 0).all()
    with pytest.raises(RuntimeError, match=r"tokens/positions \(3,\) torch.int64, \(3,\) torch.int32, \(3,\) "
                                           r"torch.int64 or cache .* do not fit the model"):
        dec.prefill(ok["tokens"], ok["slot"].int(), ok["pos"], ok["last"], cache)
    with pytest.raises(RuntimeError, match=r"\(3,\) torch.int64, \(2,\) torch.int64, \(3,\) torch.int64 or cache"):
        dec.prefill(ok["tokens"], ok["slot"][:2], ok["pos"], ok["last"], cache)
    with pytest.raises(RuntimeError, match="last rows \\(1, 1\\) torch.int64: expected a contiguous int64 vector"):
        dec.prefill(ok["tokens"], ok["slot"], ok["pos"], ok["last"][None], cache)
    with pytest.raises(RuntimeError, match=r"runs only in native code"):
        rollout.FastDecoder(model, rows=1).prefill(*ok.values(), cache)


@needs_native
def test_sample_rows_matches_torch_sampler(monkeypatch):
    """Same uniforms, same tokens as rollout.sample's torch ops (both invert the fp64 CDF; they round the
    cumulative sum differently, which moves a boundary by ~1e-16 of the mass), log-probs to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    for V, T in [(11, 0.7), (4096, 1.0), (50_000, 1.3)]:
        logits = torch.randn(64, V, generator=gen) * 3
        monkeypatch.setattr(kernels_cpu, "USE_NATIVE", False)
        want_tok, want_lp = rollout.sample(logits, T, 0, 1.0, torch.Generator().manual_seed(V))
        monkeypatch.setattr(kernels_cpu, "USE_NATIVE", True)
        got_tok, got_lp = rollout.sample(logits, T, 0, 1.0, torch.Generator().manual_seed(V))
        assert torch.equal(got_tok, want_tok)
        torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=0)
        ref = torch.log_softmax(logits.double() / T, -1).gather(-1, got_tok[:, None])[:, 0]
        torch.testing.assert_close(got_lp.double(), ref, atol=1e-5, rtol=0)


@needs_native
def test_sample_rows_never_draws_a_token_of_probability_zero():
    """Masked (-inf) logits have probability 0: no uniform draws them, not u = 0, not u next to 1, and not
    across the 64-token block boundaries of the two-level scan."""
    V = 300
    logits = torch.full((1, V), float("-inf"))
    keep = [0, 63, 64, 127, 130, 299]                         # block edges on both sides
    logits[0, keep] = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -2.0])
    us = torch.tensor([0.0, 1e-12, 0.25, 0.5, 0.75, 0.999999, 1 - 2**-53], dtype=torch.float64)
    toks = [int(kernels_cpu.sample_rows(logits, 1.0, u[None])[0]) for u in us]
    assert set(toks) <= set(keep) and toks == sorted(toks)   # the inverse CDF is monotone in u
    p = torch.softmax(logits[0].double(), -1)
    cdf = p.cumsum(0)
    # hand-check: u = 0.5 falls where the fp64 CDF first exceeds 0.5
    assert toks[3] == int((cdf > 0.5).nonzero()[0])


@needs_native
def test_sample_rows_matches_the_intended_distribution():
    """40,000 draws from softmax(log p / 0.7) of a 4-token p: frequencies within 5 standard errors of the
    hand-computed distribution, which is more than 10 standard errors from p itself (the test can fail)."""
    p = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    want = p ** (1 / 0.7) / (p ** (1 / 0.7)).sum()
    N = 40_000
    logits = p.log().float().expand(N, 4).contiguous()
    tok, lp = kernels_cpu.sample_rows(logits, 0.7, torch.rand(N, generator=torch.Generator().manual_seed(3),
                                                               dtype=torch.float64))
    freq = torch.bincount(tok, minlength=4).double() / N
    sigma = (want * (1 - want) / N).sqrt()
    assert ((freq - want).abs() <= 5 * sigma).all(), (freq, want)
    assert ((p - want).abs() > 10 * sigma).any()
    torch.testing.assert_close(lp.double(), want.log()[tok], atol=1e-6, rtol=0)


@needs_native
def test_silu_and_exp_accuracy():
    """The vectorised exp inside SiLU and softmax: SiLU(g) * u against float64 to ~2 ulp over the whole
    range, including where exp over- or underflows."""
    g = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-87.5, -88.7, 88.0, 0.0, -1e-30])])
    gu = torch.stack([g, torch.full_like(g, 1.5)]).reshape(1, -1).contiguous()   # one row: gate | up
    out = torch.empty(g.shape[0])
    kernels_cpu.lib().silu_mul(gu.data_ptr(), out.data_ptr(), 1, g.shape[0], 1)
    ref = torch.nn.functional.silu(g.double()) * 1.5
    torch.testing.assert_close(out.double(), ref, atol=1e-30, rtol=5e-7)


@needs_native
@pytest.mark.parametrize("rows, threads", [(3, 1), (3, 2), (100, 2)])   # 100 rows: split over the threads
def test_rms_norm_and_silu_rows_match_torch(rows, threads):
    torch.manual_seed(2)
    x, w = torch.randn(rows, 40) * 5, torch.randn(40)
    h = torch.empty(rows, 40)
    kernels_cpu.lib().rms_norm_rows(x.data_ptr(), w.data_ptr(), h.data_ptr(), rows, 40, ctypes.c_float(1e-6),
                                    threads)
    ref = torch.nn.functional.rms_norm(x.double(), (40,), w.double(), 1e-6)
    torch.testing.assert_close(h.double(), ref, atol=1e-6, rtol=1e-6)
    out = torch.empty(rows, 20)
    kernels_cpu.lib().silu_mul(x.data_ptr(), out.data_ptr(), rows, 20, threads)   # x's rows as gate | up
    ref = torch.nn.functional.silu(x[:, :20].double()) * x[:, 20:].double()
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_without_a_compiler_the_sampler_falls_back(tmp_path):
    """No C compiler (or RETU_NO_NATIVE=1): kernels_cpu says why it is unavailable and generate() runs on the
    PyTorch ops, giving the naive loop's greedy tokens."""
    code = (
        "import kernels_cpu, rollout, torch\n"
        "from model import ModelConfig, Transformer\n"
        "print('reason:', kernels_cpu.unavailable_reason())\n"
        "torch.manual_seed(0); m = Transformer(ModelConfig.tiny()).eval()\n"
        "outs = rollout.generate(m, [[5, 6, 7], [9, 9]], max_new_tokens=6, temperature=0)\n"
        "assert not rollout.FastDecoder._cache[m][1].native\n"
        "ids = [5, 6, 7]\n"
        "with torch.no_grad():\n"
        "    for _ in range(6): ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))\n"
        "assert outs[0].token_ids == ids[3:], (outs[0].token_ids, ids[3:])\n"
        "print('ok')\n")
    r = run_python(code, CC=str(tmp_path / "no-such-cc"), RETU_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "reason: no C compiler" in r.stdout and "ok" in r.stdout
    assert not (tmp_path / "cache").exists()
    r = run_python(code, RETU_NO_NATIVE="1")
    assert r.returncode == 0, r.stderr
    assert "reason: switched off" in r.stdout


@needs_native
def test_build_is_cached_per_source(tmp_path):
    """The library is built once into RETU_CACHE under a name keyed by the source; a second process loads it."""
    code = "import kernels_cpu; assert kernels_cpu.available(), kernels_cpu.unavailable_reason(); print('ok')"
    built = []
    for _ in range(2):
        r = run_python(code, RETU_CACHE=str(tmp_path))
        assert r.returncode == 0 and "ok" in r.stdout, r.stderr
        built.append([(p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()])
    assert len(built[0]) == 1 and built[0][0][0].startswith("kernels_cpu-") and built[0][0][0].endswith(".so")
    assert built[1] == built[0]                                # loaded, not rebuilt; no temporary left behind
