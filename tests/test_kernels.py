"""kernels.py: the torch fallbacks against float64 loops and hand-computed numbers (in-process), and the Triton
kernels against the fallbacks under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is imported, and other test files import torch/triton normally in
the same pytest process, so the interpreter checks run in a subprocess: this file executed as a script.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

# ----------------------------------------------------------------------------------------------------------------
# Naive float64 references (explicit loops)


def naive_rms_norm(x, w, eps):
    x, w = x.double(), w.double()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        ms = sum(float(v) ** 2 for v in x[i]) / x.shape[1]
        out[i] = x[i] / math.sqrt(ms + eps) * w
    return out


def naive_rope(x, cos, sin):
    """x (B, T, H, D), cos/sin (B, T, D/2): pair (d, d + D/2) rotated by the angle of frequency d."""
    x = x.double()
    B, T, H, D = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for d in range(D // 2):
                    c, s = float(cos[b, t, d]), float(sin[b, t, d])
                    x1, x2 = float(x[b, t, h, d]), float(x[b, t, h, d + D // 2])
                    out[b, t, h, d] = x1 * c - x2 * s
                    out[b, t, h, d + D // 2] = x2 * c + x1 * s
    return out


def naive_decode_attention(q, kc, vc, seq_lens, slot_ids):
    B, H, D = q.shape
    G = H // kc.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            k = kc[slot_ids[b], h // G, :seq_lens[b]].double()  # query head h reads kv head h // G
            v = vc[slot_ids[b], h // G, :seq_lens[b]].double()
            scores = [float(q[b, h].double() @ k[j]) / math.sqrt(D) for j in range(k.shape[0])]
            m = max(scores)
            w = [math.exp(s - m) for s in scores]
            out[b, h] = sum(wj * v[j] for j, wj in enumerate(w)) / sum(w)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fallbacks (what runs on CPU) vs references


def test_rms_norm_hand_values():
    # rms([3, 4]) = sqrt((9 + 16) / 2) = sqrt(12.5) = 3.5355339; y = [3, 4] / 3.5355339 * [1, 2]
    y = kernels.rms_norm(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0]), 0.0)
    torch.testing.assert_close(y, torch.tensor([[0.8485281, 2.2627417]]))
    # residual: h = [1, 1] + [2, 3] = [3, 4], same normalised output, and h is returned as the new residual
    y, h = kernels.rms_norm(torch.tensor([[1.0, 1.0]]), torch.tensor([1.0, 2.0]), 0.0,
                            residual=torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(y, torch.tensor([[0.8485281, 2.2627417]]))
    torch.testing.assert_close(h, torch.tensor([[3.0, 4.0]]))


def test_rms_norm_fallback_matches_loop_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    w = torch.randn(10, generator=g)
    y, h = kernels.rms_norm(x, w, 1e-5, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y.double(), naive_rms_norm((x + r).view(6, 10), w, 1e-5).view(2, 3, 10))
    x64 = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradcheck(lambda a: kernels.rms_norm(a, torch.linspace(0.5, 2, 5, dtype=torch.float64), 1e-6),
                             (x64,))


def test_rope_hand_values():
    # D = 2, angle 90 degrees (cos 0, sin 1): (x1, x2) = (1, 2) -> (1*0 - 2*1, 2*0 + 1*1) = (-2, 1)
    out = kernels.apply_rope(torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(out, torch.tensor([[[[-2.0, 1.0]]]]))


def test_rope_fallback_matches_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 6, generator=g)
    ang = torch.rand(2, 3, 3, generator=g) * 6
    want = naive_rope(x, ang.cos(), ang.sin())
    torch.testing.assert_close(kernels.apply_rope(x, ang.cos(), ang.sin()).double(), want)
    # (T, D/2) angles broadcast over the batch
    shared = kernels.apply_rope(x, ang[0].cos(), ang[0].sin())
    want = naive_rope(x, ang[0].cos().expand(2, 3, 3), ang[0].sin().expand(2, 3, 3))
    torch.testing.assert_close(shared.double(), want)


@pytest.mark.parametrize("group", [1, 2, 7])
def test_decode_attention_fallback_matches_loop(group):
    g = torch.Generator().manual_seed(group)
    kv_heads, D = 2, 8
    q = torch.randn(3, kv_heads * group, D, generator=g, dtype=torch.float64)  # float64 in: only the formula differs
    kc = torch.randn(4, kv_heads, 11, D, generator=g, dtype=torch.float64)
    vc = torch.randn(4, kv_heads, 11, D, generator=g, dtype=torch.float64)
    seq_lens = torch.tensor([1, 7, 11])
    slots = torch.tensor([3, 0, 2])
    ref = naive_decode_attention(q, kc, vc, seq_lens, slots)
    torch.testing.assert_close(kernels.decode_attention(q, kc, vc, seq_lens, slot_ids=slots).double(), ref)
    # rows read slots 0..B-1 when slot_ids is None; an additive bias equal to the length mask changes nothing
    ref0 = naive_decode_attention(q, kc, vc, seq_lens, [0, 1, 2])
    bias = torch.zeros(3, 1, 1, 11, dtype=torch.float64)
    bias.masked_fill_(torch.arange(11) >= seq_lens.view(3, 1, 1, 1), float("-inf"))
    torch.testing.assert_close(kernels.decode_attention(q, kc, vc, seq_lens).double(), ref0)
    torch.testing.assert_close(kernels.decode_attention(q, kc, vc, seq_lens, max_len=11, attn_bias=bias).double(), ref0)
    # a one-token context returns its value vector exactly: softmax over one score is 1
    torch.testing.assert_close(kernels.decode_attention(q, kc, vc, seq_lens)[0, 0], vc[0, 0, 0])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="decode_attention"):
        kernels.decode_attention(torch.zeros(2, 6, 8), torch.zeros(2, 4, 5, 8), torch.zeros(2, 4, 5, 8),
                                 torch.tensor([1, 2]))  # 6 query heads over 4 kv heads
    with pytest.raises(ValueError, match="exceeds the cache length"):
        kernels.decode_attention(torch.zeros(2, 4, 8), torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8),
                                 torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="apply_rope"):
        kernels.apply_rope(torch.zeros(1, 3, 2, 8), torch.zeros(3, 3), torch.zeros(3, 3))  # D/2 = 4, not 3
    with pytest.raises(ValueError, match="apply_rope"):
        kernels.apply_rope(torch.zeros(2, 3, 2, 8), torch.zeros(3, 3, 4), torch.zeros(3, 3, 4))  # batch 3 != 2
    with pytest.raises(ValueError, match="rms_norm"):
        kernels.rms_norm(torch.zeros(2, 4), torch.ones(5), 1e-6)


def test_fallback_is_chosen_on_cpu_and_when_forced(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.triton_enabled(x)  # CPU tensors without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    assert not kernels.triton_enabled(x)  # forced off
    monkeypatch.setattr(kernels, "USE_TRITON", True)
    assert kernels.triton_enabled(x) == (kernels.triton is not None)
    with torch.enable_grad():
        assert not kernels.triton_enabled(torch.zeros(2, requires_grad=True))  # no backward kernels


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels vs fallbacks, in a subprocess with TRITON_INTERPRET=1


def test_triton_kernels_match_fallbacks_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", RETU_NO_TRITON="0")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "interpreter checks passed" in proc.stdout


def _interpreter_checks():
    """Run as a script under TRITON_INTERPRET=1: every check compares the Triton path with the torch fallback."""
    assert kernels.triton_enabled(torch.zeros(1)), "the Triton path must be active for these checks"
    g = torch.Generator().manual_seed(0)
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
    n = 0
    for dtype in (torch.float32, torch.float16):
        # decode attention: GQA groups 1, 2, 7; lengths that are not multiples of the 16-key block; several
        # splits (including splits that start past a short row's length and so contribute nothing); slot gather
        for group in (1, 2, 7):
            for num_splits, block_n in ((1, 16), (3, 16), (None, 32)):
                q = torch.randn(4, 2 * group, 24, generator=g).to(dtype)  # head_dim 24: padded to 32 lanes
                kc = torch.randn(5, 2, 70, 24, generator=g).to(dtype)
                vc = torch.randn(5, 2, 70, 24, generator=g).to(dtype)
                seq_lens = torch.tensor([1, 17, 70, 33], dtype=torch.int32)
                slots = torch.tensor([4, 0, 2, 1], dtype=torch.int32)
                got = kernels.decode_attention(q, kc, vc, seq_lens, slot_ids=slots, num_splits=num_splits,
                                               block_n=block_n)
                want = kernels.decode_attention_torch(q.float(), kc.float(), vc.float(), seq_lens, slot_ids=slots)
                torch.testing.assert_close(got.float(), want, **tol[dtype],
                                           msg=lambda m, a=(dtype, group, num_splits): f"decode {a}: {m}")
                n += 1
        # RMSNorm with and without the residual, feature count not a power of two
        x, r = torch.randn(3, 5, 40, generator=g).to(dtype), torch.randn(3, 5, 40, generator=g).to(dtype)
        w = torch.randn(40, generator=g).to(dtype)
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_torch(x, w, 1e-6), **tol[dtype])
        y, h = kernels.rms_norm(x, w, 1e-6, residual=r)
        y_ref, h_ref = kernels.rms_norm_torch(x, w, 1e-6, r)
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)  # the same single rounding of x + r
        torch.testing.assert_close(y, y_ref, **tol[dtype])
        # RoPE: 20 heads (more than one 16-head tile), per-batch and shared angles, non-contiguous input
        x = torch.randn(2, 3, 20, 16, generator=g).to(dtype)
        ang = torch.rand(2, 3, 8, generator=g) * 6
        for cos, sin in ((ang.cos(), ang.sin()), (ang[0].cos(), ang[0].sin())):
            torch.testing.assert_close(kernels.apply_rope(x, cos, sin), kernels.apply_rope_torch(x, cos, sin),
                                       **tol[dtype])
        xt = torch.randn(2, 20, 3, 16, generator=g).to(dtype).transpose(1, 2)  # (B, T, H, D) view, strided
        torch.testing.assert_close(kernels.apply_rope(xt, ang.cos(), ang.sin()),
                                   kernels.apply_rope_torch(xt, ang.cos(), ang.sin()), **tol[dtype])
        n += 4
    # a tensor that needs a gradient takes the fallback, and the gradient flows
    xg = torch.randn(2, 8, generator=g, requires_grad=True)
    kernels.rms_norm(xg, torch.ones(8), 1e-6).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # the sampler's decode path on the Triton kernel gives the same greedy tokens as on the fallback
    import rollout
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny("Qwen2ForCausalLM", num_heads=6, num_kv_heads=2))
    prompts = [[5, 6, 7], [9] * 20, [3]]
    tri = rollout.generate(model, prompts, max_new_tokens=5, temperature=0, max_batch=2)
    # the static (CUDA-graph-shaped) step: every slot at the full cache length, so most splits are empty
    tri_static = rollout.generate(model, prompts, max_new_tokens=5, temperature=0, max_batch=2, cuda_graph=True)
    kernels.USE_TRITON = False
    ref = rollout.generate(model, prompts, max_new_tokens=5, temperature=0, max_batch=2)
    for got in (tri, tri_static):
        assert [o.token_ids for o in got] == [o.token_ids for o in ref]
        for a, b in zip(got, ref):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    print(f"interpreter checks passed ({n} kernel comparisons + sampler)")


if __name__ == "__main__":
    _interpreter_checks()
