"""Inference kernels: decode attention over a KV cache (GQA, split-K), fused RMSNorm(+residual), RoPE.

Each public function has two implementations that compute the same thing:

* a Triton kernel, used for CUDA tensors (and for CPU tensors when ``TRITON_INTERPRET=1`` was set before
  ``import triton``, which is how the tests check the kernels on a machine without a GPU), and
* a plain PyTorch fallback, used everywhere else: on CPU, when autograd needs a graph (the kernels have no
  backward), when Triton is not importable, or when forced with ``RETU_NO_TRITON=1`` in the environment or
  ``kernels.USE_TRITON = False`` at run time.

The fallbacks are the specification; the kernels are tested against them (``tests/test_kernels.py``). Numerics
follow HF transformers' Qwen2/Llama modules so that a model routed through these functions matches HF:
RMSNorm normalises in fp32, casts back to the input dtype and *then* multiplies by the weight; the residual add
happens in the input dtype; RoPE uses the "rotate half" (non-interleaved) layout.

Decode attention is flash-decoding (split-K): the cached keys of each sequence are cut into ``num_splits``
chunks, one program per (sequence, kv head, chunk) computes a partial softmax-weighted sum for *all* query heads
of its GQA group (so each key/value block is read from memory once per group, not once per query head), and a
second small kernel merges the partial results with their log-sum-exp weights. Splitting the sequence axis keeps
the GPU busy when the batch is small but the context is long.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:  # Triton is optional: a CPU-only install without it still runs every fallback.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

# Switch the Triton kernels off globally (e.g. to compare against the fallbacks on a GPU).
USE_TRITON: bool = os.environ.get("RETU_NO_TRITON", "0") != "1"


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can and should run on these tensors."""
    if triton is None or not USE_TRITON:
        return False
    # No backward kernels: fall back whenever autograd would need to record the op.
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if all(t.is_cuda for t in tensors):
        return True
    # The interpreter runs kernels on CPU tensors; it only works if set before triton was imported.
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and all(t.device.type == "cpu" for t in tensors)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm, optionally fused with the residual add that precedes it in a pre-norm transformer block.


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim. x: (..., N), weight: (N,).

    Without ``residual``: returns ``norm(x) * weight``.
    With ``residual`` (same shape as x): ``h = x + residual`` and returns ``(norm(h) * weight, h)``, so a block can
    write ``y, h = rms_norm(attn_out, w, eps, residual=h)`` and carry ``h`` on as the new residual stream.
    """
    if x.shape[-1] != weight.shape[-1] or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"residual {None if residual is None else tuple(residual.shape)} do not match")
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if triton_enabled(*tensors):
        return _rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def rms_norm_torch(x, weight, eps, residual=None):
    """Reference RMSNorm (HF Qwen2RMSNorm numerics)."""
    h = x if residual is None else x + residual
    hf = h.to(torch.promote_types(h.dtype, torch.float32))  # fp32 statistics (fp64 stays fp64)
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return y if residual is None else (y, h)


def _rms_norm_triton(x, weight, eps, residual):
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    if residual is None:
        r2, h = x2, x2  # dummies: never read or written when HAS_RESIDUAL is False
    else:
        r2 = residual.reshape(-1, n).contiguous()
        h = torch.empty_like(x2)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight.contiguous(), y, h, n, eps,
                                         HAS_RESIDUAL=residual is not None, BLOCK=_next_pow2(n))
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, H, N, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one program per row of N features
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X + row * N + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            # Round the sum to the input dtype first, like the unfused `x + residual` does.
            x = (x.to(tl.float32) + tl.load(R + row * N + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(H + row * N + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w
        tl.store(Y + row * N + offs, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding, "rotate half" layout (HF Llama/Qwen): the pairs are (d, d + D/2).


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (B, T, n_heads, D) by angles given as cos, sin: (B, T, D/2) or (T, D/2) (fp32 or x's dtype).

    Returns a new tensor ``cat(x1*cos - x2*sin, x2*cos + x1*sin)`` with x1, x2 the two halves of the last dim.
    """
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.dim() not in (2, 3) \
            or tuple(cos.shape) not in ((x.shape[1], x.shape[3] // 2), (x.shape[0], x.shape[1], x.shape[3] // 2)):
        raise ValueError(f"apply_rope: x {tuple(x.shape)} must be (B, T, H, D) and cos/sin (B, T, D/2) or (T, D/2); "
                         f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if triton_enabled(x, cos, sin):
        return _rope_triton(x, cos, sin)
    return apply_rope_torch(x, cos, sin)


def apply_rope_torch(x, cos, sin):
    """Reference RoPE. Computes in x's dtype like HF (cos/sin are cast to it first)."""
    half = x.shape[-1] // 2
    c = cos.to(x.dtype).unsqueeze(-2)  # (B, T, 1, D/2): broadcast over heads
    s = sin.to(x.dtype).unsqueeze(-2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _rope_triton(x, cos, sin):
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.expand(B, T, D // 2) if cos.dim() == 2 else cos  # stride 0 over B: no copy
    sin = sin.expand(B, T, D // 2) if sin.dim() == 2 else sin
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    block_h = min(_next_pow2(H), 16)
    if B * T > 0:
        _rope_kernel[(B * T, triton.cdiv(H, block_h))](
            x, cos, sin, out, T, H, D // 2,
            x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1), cos.stride(2),
            sin.stride(0), sin.stride(1), sin.stride(2),
            BLOCK_H=block_h, BLOCK_D=_next_pow2(D // 2))
    return out


if triton is not None:

    @triton.jit
    def _rope_kernel(X, Cos, Sin, Out, T, H, HALF,
                     sxb, sxt, sxh, scb, sct, scd, ssb, sst, ssd,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        bt = tl.program_id(0)  # one (batch, token) per program row, heads tiled by BLOCK_H
        b = bt // T
        t = bt % T
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_D)
        dmask = offs < HALF
        mask = (heads[:, None] < H) & dmask[None, :]
        c = tl.load(Cos + b * scb + t * sct + offs * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s = tl.load(Sin + b * ssb + t * sst + offs * ssd, mask=dmask, other=0.0).to(tl.float32)[None, :]
        base = X + b.to(tl.int64) * sxb + t * sxt + heads[:, None] * sxh + offs[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        out = Out + (bt.to(tl.int64) * H + heads[:, None]) * (2 * HALF) + offs[None, :]
        tl.store(out, (x1 * c - x2 * s).to(Out.dtype.element_ty), mask=mask)
        tl.store(out + HALF, (x2 * c + x1 * s).to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Decode attention: one new query token per sequence against that sequence's cached keys/values.


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    slot_ids: torch.Tensor | None = None,
    max_len: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query token per sequence, grouped-query.

    q:        (B, n_heads, D)                   the new token's queries
    k_cache:  (n_slots, n_kv_heads, S_max, D)   cache slots; v_cache likewise
    seq_lens: (B,) int                           row b attends to positions [0, seq_lens[b]) of its slot (>= 1)
    slot_ids: (B,) int or None                   the slot row b reads; None means slot b (rows 0..B-1)
    max_len:  host-side upper bound on seq_lens (saves a device sync when given)
    attn_bias: optional (B, 1, 1, max_len) fp32 additive mask (0 where position < seq_len, -inf after) that a
              caller attending many layers at the same lengths builds once; only the torch path reads it
    returns   (B, n_heads, D) in q's dtype

    Query head h reads kv head h // (n_heads // n_kv_heads), as in HF's repeat_kv.
    """
    B, H, D = q.shape
    n_slots, KV, S_max, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape or Dk != D or H % KV or seq_lens.shape != (B,) \
            or (slot_ids is not None and slot_ids.shape != (B,)) or (slot_ids is None and B > n_slots):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)}, seq_lens {tuple(seq_lens.shape)}, slot_ids "
                         f"{None if slot_ids is None else tuple(slot_ids.shape)} are inconsistent")
    scale = D ** -0.5 if scale is None else scale
    if max_len is None:
        max_len = int(seq_lens.max()) if B else 0
    if max_len > S_max:
        raise ValueError(f"decode_attention: max_len {max_len} exceeds the cache length {S_max}")
    if triton_enabled(q, k_cache, v_cache, seq_lens):
        return _decode_attention_triton(q, k_cache, v_cache, seq_lens, slot_ids, max_len, scale, num_splits, block_n)
    return decode_attention_torch(q, k_cache, v_cache, seq_lens, slot_ids=slot_ids, max_len=max_len, scale=scale,
                                  attn_bias=attn_bias)


def decode_attention_torch(q, k_cache, v_cache, seq_lens, *, slot_ids=None, max_len=None, scale=None, attn_bias=None):
    """Reference decode attention with torch ops. Reads only the first max_len cache positions."""
    B, H, D = q.shape
    KV = k_cache.shape[1]
    L = int(seq_lens.max()) if max_len is None else max_len
    scale = D ** -0.5 if scale is None else scale
    if slot_ids is None:  # slots 0..B-1: a view, no gather
        k, v = k_cache[:B, :, :L], v_cache[:B, :, :L]  # (B, KV, L, D)
    else:
        k, v = k_cache[slot_ids, :, :L], v_cache[slot_ids, :, :L]
    # The G query heads sharing a kv head become G "query positions" of that head: plain SDPA, no repeat_kv copy.
    qg = q.reshape(B, KV, H // KV, D)  # (B, KV, G, D)
    if attn_bias is None:
        attn_bias = torch.arange(L, device=q.device) < seq_lens.view(B, 1, 1, 1)  # (B, 1, 1, L) bool: attend
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=attn_bias, scale=scale).reshape(B, H, D)


def _decode_attention_triton(q, k_cache, v_cache, seq_lens, slot_ids, max_len, scale, num_splits, block_n):
    B, H, D = q.shape
    KV = k_cache.shape[1]
    G = H // KV
    if slot_ids is None:
        slot_ids = torch.arange(B, device=q.device, dtype=torch.int32)
    q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the cache's last dim must be contiguous")
    n_blocks = max(1, triton.cdiv(max_len, block_n))
    if num_splits is None:
        # Enough programs to fill a large GPU (~132 SMs x 2), never more splits than key blocks.
        num_splits = max(1, min(n_blocks, triton.cdiv(264, max(1, B * KV)), 32))
    num_splits = max(1, min(num_splits, n_blocks))
    chunk = triton.cdiv(n_blocks, num_splits) * block_n  # keys per split, a multiple of block_n
    part_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if B == 0:
        return out
    _decode_split_kernel[(B, KV, num_splits)](
        q, k_cache, v_cache, seq_lens, slot_ids, part_o, part_lse, scale, chunk,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H, num_splits, G=G, D=D, BLOCK_G=max(16, _next_pow2(G)), BLOCK_N=block_n, BLOCK_D=max(16, _next_pow2(D)),
        IEEE=q.dtype == torch.float32)
    _decode_merge_kernel[(B, H)](part_o, part_lse, out, num_splits, q.stride(0), q.stride(1),
                                 D=D, BLOCK_S=max(2, _next_pow2(num_splits)), BLOCK_D=_next_pow2(D))
    return out


if triton is not None:

    @triton.jit
    def _decode_split_kernel(Q, K, V, SeqLens, SlotIds, PartO, PartLse, scale, chunk,
                             sqb, sqh, sks, skh, skn, svs, svh, svn, H, NSPLIT,
                             G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(SeqLens + b)
        slot = tl.load(SlotIds + b).to(tl.int64)
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)

        offs_g = tl.arange(0, BLOCK_G)  # the G query heads of this kv head (padded to a tl.dot-able 16)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kvh * G + offs_g
        g_mask = offs_g < G
        d_mask = offs_d < D
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)

        m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
        l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - m)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of exp(score - m) * v
        k_base = K + slot * sks + kvh * skh
        v_base = V + slot * svs + kvh * svh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:  # fp32 inputs: do not let the tensor cores round them to tf32
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_mask[None, :], s * scale, float("-inf"))  # (BLOCK_G, BLOCK_N)
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has >= 1 valid key
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        # An empty split (its chunk starts past seq_len) contributes weight exp(-inf) = 0 in the merge.
        has = l > 0
        o = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        row = (b * H + heads) * NSPLIT + split
        tl.store(PartO + row[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(PartLse + row, lse, mask=g_mask)

    @triton.jit
    def _decode_merge_kernel(PartO, PartLse, Out, NSPLIT, sob, soh,
                             D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        H = tl.num_programs(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < NSPLIT
        row = (b * H + h) * NSPLIT + offs_s
        lse = tl.load(PartLse + row, mask=s_mask, other=float("-inf"))
        o = tl.load(PartO + row[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & (offs_d[None, :] < D),
                    other=0.0)
        w = tl.exp(lse - tl.max(lse, axis=0))  # split 0 is never empty (seq_len >= 1), so max is finite
        out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
        tl.store(Out + b * sob + h * soh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)
