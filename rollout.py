"""rollout.py -- batched, KV-cached sampling in-process: the generation engine of every RL step.

    from rollout import generate
    outs = generate(model, [[1, 2, 3], [4, 5]], n=8, max_new_tokens=512, temperature=0.7, seed=0)
    outs[0].prompt_index, outs[0].token_ids, outs[0].logprobs, outs[0].finish_reason   # "stop" | "length"

The sampler uses the very model object that is trained (only through `model(...)` with the cache hook and
`model.logits`), so there is no weight sync, no format translation and no sampler/trainer log-prob mismatch
beyond kernel rounding. It runs on an FSDP2-wrapped model as is (the forward gathers the parameters; the cache
takes the forward's compute dtype, so mixed precision works). The authors' code samples with an external vLLM
instead (rollout temperature 0.7, top_p 1, top_k -1 in RETU's DAPO runs); the sampling semantics match.
The design follows nano-vllm and gpt-fast, minus paging:

* **KV cache**: one tensor (layers, 2, slots, kv_heads, S, head_dim), allocated once per call. S is the
  longest prompt + max_new_tokens - 1 (capped by the context); the number of slots is min(max_batch, samples,
  kv_cache_bytes // bytes per slot). Contiguous slots waste memory on short responses compared with a paged
  pool, but keep decode attention a plain strided read.
* **Prefix sharing**: every prompt is prefilled exactly once. Its K/V are written straight into the slots of
  all of its samples admitted at that moment; if some of its `n` samples must wait for a free slot, one copy
  of the prompt's K/V (and its last-position logits) is kept and copied into their slots when they start.
* **Varlen prefill**: the prompts being admitted are packed into one (1, N) row, so every linear layer sees
  exactly N tokens (no padding); attention runs causally per prompt.
* **Continuous batching**: a decode step runs over slots [0, hi). A finished sequence frees its slot, which is
  refilled from the waiting queue before the next step (new prompts are prefilled on the way in). When only a
  tail of long responses is left and live slots have become sparse, they are compacted into the low slots, so
  the cost of a step follows the live batch, not the batch we started with.
* **Decode attention**: `kernels.decode_attention` (Triton split-K flash-decoding with GQA) on CUDA; on CPU a
  torch path that reuses one additive length mask for all layers of a step.
* **CPU decode step** (`FastDecoder`, on unless `FAST_CPU_DECODE = False`; not under FSDP): at a small batch a
  CPU step is bound by per-op overhead and small GEMMs, so the step runs from copies of the weights with q/k/v
  and gate/up fused and every matrix pre-transposed, in fewer ops; for 2-16 slots in fp32 the matrices are
  packed by MKL for the slot count instead (`PACKED_GEMM`), each decode forward computes every slot (free ones
  ride along, their rows dropped before sampling), and the whole step runs in one call of native code
  (kernels_cpu.c: MKL's packed sgemm plus C loops for the rest) where it builds, the torch ops otherwise. The
  copies are kept per model and rebuilt whenever a parameter changed in place (version counters), so RL never
  samples stale weights.
* **CUDA graphs** (`cuda_graph=True`, off by default until measured on a GPU): every step runs all slots at
  the full cache length, so its shapes never change and it is captured once per call and replayed.
* **Sampling on device**: temperature, then top-k, then top-p (the order of vLLM and HF), then inverse-CDF
  sampling with one seeded uniform per sequence (on CPU without top-k/top-p: one native pass per row); the only
  host sync per step is reading the new tokens when stop tokens are set (lengths are tracked on host).

Log-probs: each returned log-prob is log q(token), where q is the distribution the token was drawn from:
softmax(logits / T) restricted to the top-k / top-p set and renormalised. With top_k = 0 and top_p = 1 (the
RL default) this equals the trainer's `model(..., targets, temperature=T)` log-prob; with truncation it
differs by the log of the kept mass (the "log(S) bias" of vllm#42259), which is what the caller asked for.
Temperature 0 is greedy; its log-probs are those of the untempered model (T = 1), since the point mass
that greedy decoding "samples" from would carry no information.

Seeded runs are reproducible for the same inputs and settings (same seed, same prompts, same max_batch). The
random stream is shared by the batch, so a different batch composition gives different (equally valid) samples.
"""
from __future__ import annotations

import ctypes
import heapq
import itertools
import math
import numbers
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels
import kernels_cpu


@dataclass
class Completion:
    prompt_index: int           # index into the `prompts` list
    sample_index: int           # 0 .. n-1 among the samples of that prompt
    token_ids: list[int]        # generated tokens, including the stop token when one was hit
    logprobs: list[float]       # log q(token) under the distribution it was sampled from (see module docstring)
    finish_reason: str          # "stop" (a stop token was generated) or "length" (max_new_tokens or context full)


@dataclass
class SamplingConfig:
    """Everything `generate` accepts besides the model and the prompts; validated on construction."""
    max_new_tokens: int
    n: int = 1                              # samples per prompt (GRPO's group size)
    temperature: float = 1.0                # 0 = greedy
    top_p: float = 1.0                      # nucleus: keep the most likely tokens up to this mass, in (0, 1]
    top_k: int = 0                          # keep the k most likely tokens; 0 = all
    stop_token_ids: tuple[int, ...] = ()    # generating one of these ends the sequence (it is kept)
    seed: int | None = None                 # None: a fresh random seed
    max_batch: int = 256                    # decode slots, i.e. sequences generated concurrently
    kv_cache_bytes: int | None = None       # KV cache budget; None: half the free GPU memory, or 4 GiB on CPU
    max_prefill_tokens: int = 16384         # prompt tokens per packed prefill forward (a longer prompt runs alone)
    # Static decode: every step runs all slots at the full cache length (fixed shapes); on CUDA that step is
    # captured once per call as a CUDA graph and replayed, removing the per-kernel launch overhead that bounds
    # small models. Elsewhere the same static step runs eagerly (that is how the CPU tests cover it). Off by
    # default until measured on a GPU; ignored under FSDP (its hooks would be captured too).
    cuda_graph: bool = False
    stats: dict | None = field(default=None, repr=False)   # if a dict is given, counters are written into it

    def __post_init__(self):
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        integral = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
        checks = [
            (integral(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens must be an int >= 1"),
            (integral(self.n) and self.n >= 1, "n (samples per prompt) must be an int >= 1"),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (integral(self.top_k) and self.top_k >= 0, "top_k must be an int >= 0 (0 = no top-k)"),
            (integral(self.max_batch) and self.max_batch >= 1, "max_batch must be an int >= 1"),
            (self.max_prefill_tokens >= 1, "max_prefill_tokens must be >= 1"),
            (self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "kv_cache_bytes must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                name = msg.split()[0]
                raise ValueError(f"rollout.generate: {msg}, got {name}={getattr(self, name)!r}")
        self.max_new_tokens, self.n, self.top_k, self.max_batch = \
            int(self.max_new_tokens), int(self.n), int(self.top_k), int(self.max_batch)  # numpy ints -> int
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> (tokens (B,) long, logprobs (B,) fp32) without leaving the device."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    if (top_k <= 0 or top_k >= logits.shape[-1]) and top_p >= 1 and logits.device.type == "cpu" \
            and logits.is_contiguous() and kernels_cpu.available():
        # the same method in one native pass per row (kernels_cpu.c's sample_rows): a third of a tiny-shape step
        # here is otherwise the ~10 small ops below; same uniforms, the same tokens but at fp32 rounding ties
        u = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
        return kernels_cpu.sample_rows(logits, temperature, u)
    z = logits / temperature                                        # (B, V)
    order = None
    if top_k > 0 or top_p < 1:
        z, order = z.sort(dim=-1, descending=True)                  # filter in sorted order, map back at the end
        if 0 < top_k < z.shape[-1]:
            z[:, top_k:] = float("-inf")
        if top_p < 1:
            p = torch.softmax(z, -1)
            # drop a token once the more likely ones already hold top_p of the mass (the first always stays)
            z = z.masked_fill(p.cumsum(-1) - p >= top_p, float("-inf"))
    logp = torch.log_softmax(z, -1)                                 # the renormalised distribution we sample
    # Inverse-CDF sampling: one uniform per row (B x V exponentials for Gumbel-max cost ~8x more on CPU).
    # The CDF is accumulated in fp64 so the rounding of a 150k-term sum cannot shift mass between tokens;
    # a token of probability 0 never has cdf > u at its own index, so filtered tokens cannot be drawn.
    cdf = logp.exp().double().cumsum_(-1)                           # (B, V)
    u = torch.rand((logp.shape[0], 1), generator=generator, device=logp.device, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).clamp_(max=logp.shape[-1] - 1)[:, 0]
    lp = logp.gather(-1, idx[:, None])[:, 0]
    tok = idx if order is None else order.gather(-1, idx[:, None])[:, 0]
    return tok, lp


# ----------------------------------------------------------------------------------------------------------------
# KV cache: the object the model calls back into (model.py's `cache.attend(layer_idx, q, k, v)` protocol)


class KVCache:
    """Preallocated K/V slots plus the metadata of the forward in flight ("prefill" or "decode")."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int):
        # (layers, k|v, slots, kv_heads, S, D): one slot row is contiguous per head, as decode attention reads it
        self.shape = (num_layers, 2, slots, kv_heads, max_len, head_dim)
        self.kv: torch.Tensor | None = None  # allocated at the first attend(), in the dtype of the k it gets
        self.mode = ""
        self._slot_ids: torch.Tensor | None = None

    def _allocate(self, k: torch.Tensor):
        # The dtype comes from the forward, not the parameters: under FSDP2 mixed precision they differ.
        # Zeroed, not empty: the torch decode path reads past a row's length (masked to weight 0, but 0 * NaN
        # from uninitialised memory would still be NaN). Stale entries of earlier sequences are finite.
        self.kv = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
        self.k = [self.kv[i, 0] for i in range(self.shape[0])]  # per-layer (slots, kv_heads, S, D) views
        self.v = [self.kv[i, 1] for i in range(self.shape[0])]
        self.triton = kernels.triton_enabled(self.kv)

    def set_prefill(self, bounds: list[tuple[int, int]], dst_slot: torch.Tensor, dst_pos: torch.Tensor,
                    src: torch.Tensor, saves: dict[int, tuple[int, int]]):
        """Packed prompts occupy [s, e) of the row; token src[i] goes to slot dst_slot[i], position dst_pos[i].
        For each saves[p] = (s, e) the forward also fills saved[p], a (layers, 2, kv_heads, e - s, D) copy of
        prompt p's K/V for its samples that start later."""
        self.mode, self.bounds, self.dst_slot, self.dst_pos, self.src, self.saves = \
            "prefill", bounds, dst_slot, dst_pos, src, saves
        self.saved: dict[int, torch.Tensor] = {}
        # runs of consecutive prompts of equal length (start, prompts, length): one batched attention call each
        self.runs: list[tuple[int, int, int]] = []
        for s, e in bounds:
            if self.runs and self.runs[-1][2] == e - s:
                self.runs[-1] = (self.runs[-1][0], self.runs[-1][1] + 1, e - s)
            else:
                self.runs.append((s, 1, e - s))

    def set_decode(self, pos: torch.Tensor, max_len: int):
        """Row b is slot b; its new token goes to position pos[b] and it attends to [0, pos[b]]. The lengths and
        the mask are computed when a decode path first asks for them (the native CPU step needs neither)."""
        self.mode, self.pos, self.max_len = "decode", pos, max_len
        if self._slot_ids is None or self._slot_ids.device != pos.device:
            self._slot_ids = torch.arange(self.shape[2], device=pos.device)
        self.rows = self._slot_ids[:pos.shape[0]]
        self._seq_lens = self._bias = None

    @property
    def seq_lens(self) -> torch.Tensor:
        if self._seq_lens is None:
            self._seq_lens = self.pos + 1
        return self._seq_lens

    @property
    def bias(self) -> torch.Tensor | None:
        """The torch decode path's additive length mask (B, 1, 1, max_len), one for all layers of a step."""
        if self._bias is None and not self.triton:
            valid = torch.arange(self.max_len, device=self.pos.device) < self.seq_lens[:, None]
            self._bias = torch.zeros(valid.shape, device=self.pos.device).masked_fill_(~valid, float("-inf"))
            self._bias = self._bias[:, None, None]
        return self._bias

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, n_heads, D), k/v (B, T, n_kv_heads, D) -> (B, T, n_heads, D)."""
        if self.kv is None:
            self._allocate(k)
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if self.mode == "decode":  # T == 1, B == rows
            kc[self.rows, :, self.pos] = k[:, 0]
            vc[self.rows, :, self.pos] = v[:, 0]
            if self.triton:
                o = kernels.decode_attention(q[:, 0], kc, vc, self.seq_lens, slot_ids=self.rows,
                                             max_len=self.max_len)
            else:  # the checks of decode_attention() cost more than the attention itself at these sizes
                o = kernels.decode_attention_torch(q[:, 0], kc, vc, self.seq_lens, max_len=self.max_len,
                                                   attn_bias=self.bias)
            return o.unsqueeze(1)
        # prefill: B == 1, packed prompts
        kc[self.dst_slot, :, self.dst_pos] = k[0, self.src]  # (M, kv_heads, D) into every admitted sample's slot
        vc[self.dst_slot, :, self.dst_pos] = v[0, self.src]
        for p, (s, e) in self.saves.items():
            if layer_idx == 0:
                self.saved[p] = k.new_empty((self.shape[0], 2, self.shape[3], e - s, self.shape[5]))
            self.saved[p][layer_idx, 0] = k[0, s:e].transpose(0, 1)
            self.saved[p][layer_idx, 1] = v[0, s:e].transpose(0, 1)
        outs = []
        for s, r, n in self.runs:  # r prompts of n tokens each: (1, r n, heads, D) -> (r, heads, n, D)
            qs, ks, vs = (t[0, s:s + r * n].unflatten(0, (r, n)).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            outs.append(o.transpose(1, 2).flatten(0, 1))                     # (r n, n_heads, D)
        return torch.cat(outs).unsqueeze(0)  # (1, N, n_heads, D)


# ----------------------------------------------------------------------------------------------------------------
# CPU decode step: the model's decode forward with regrouped weights and few ops

# Decode through `FastDecoder` on CPU for models that are not FSDP-wrapped (tests switch it off to cover the
# model-forward path, which CUDA and FSDP use).
FAST_CPU_DECODE: bool = True
# FastDecoder's fp32 GEMMs through MKL's packed sgemm (torch.ops.mkl._mkl_linear, the op inductor uses for frozen
# fp32 linears on CPU) when the decode batch is PACK_ROWS[0]..PACK_ROWS[1] rows: each weight is packed once for
# that row count, so no call re-packs it. Measured on the 2-core dev CPU, the 24 layers' GEMMs of the 0.5B shape
# (weights out of cache): 66 ms at 4 rows against 81 ms for `x @ W_t` (89 vs 116 ms at 16 rows); at one row
# `x @ W_t` is a GEMV and faster. Off where torch was built without MKL (then `x @ W_t` everywhere).
PACKED_GEMM: bool = torch._C.has_mkl and hasattr(torch.ops.mkl, "_mkl_linear")
PACK_ROWS = (2, 16)


class FastDecoder:
    """One decode step (one new token per row) of a `model.Transformer`, computed from copies of its weights
    regrouped for a CPU with a small batch, where a step is bound by per-op overhead and small GEMMs:

    * q/k/v and gate/up are concatenated (one GEMM each instead of three and two), and every matrix is stored
      transposed, (in, out) row-major: MKL's sgemm computes `x @ W_t` 1.1-3.2x faster than `F.linear(x, W)` (a
      product with a transposed view) at 4-16 rows on the 2-core dev CPU, for the bench's tiny and 0.5B shapes;
    * with `rows` in PACK_ROWS and fp32 weights, the matrices are instead packed by MKL for exactly `rows` rows
      (see PACKED_GEMM), and every step must then compute that many rows (the engine runs all its slots);
    * packed, the step runs in native code where kernels_cpu.c builds (`native`): one call computes the whole
      step, GEMMs through MKL's packed sgemm and the rest (norms, RoPE, cache writes, attention, SiLU) as C
      loops, so no op pays PyTorch's per-call overhead; the torch ops below are its specification and fallback;
    * the residual adds ride in the GEMMs (`addmm(x, o, W_o)`; packed: an in-place add after), RoPE is
      `x * cos + roll(x, D/2) * sin'` with sin' = (-sin, sin) read from a table, K and V are written into the
      cache with one `index_copy_`.

    Through the torch ops a tiny-shape step makes 740 aten calls (nested ones and views included) instead of
    1,049 through model.forward; natively, one. Numerics: the operations of `model.py` in the model dtype, except
    that RMSNorm is `F.rms_norm` (it multiplies by the weight before rounding to a low-precision dtype, HF after)
    and the GEMMs and the native code's sums round differently; log-probs agree with a full forward to 1e-5 in
    fp32 (tested). The copies cost one more model's worth of memory transposed; packed, 1.7x the model at the 0.5B
    shape and 8x at the bench's tiny one (MKL pads small matrices; `nbytes`). They take 0.6-1.6 s to build for a
    0.5B fp32 model; `for_model` keeps them between calls while the weights, the row count and the native choice
    are unchanged and rebuilds them after any in-place update (see there).
    """

    def __init__(self, model, rows: int = 0):
        c = model.config
        self.nh, self.nkv, self.hd, self.eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        self.hidden, self.inter = c.hidden_size, c.intermediate_size
        self.inv_freq = model.inv_freq
        self.cos = self.sin = None
        self.rows = self.packed_rows(model, rows)
        self.native = self.uses_native(model, self.rows)
        if self.native:
            prep = lambda w: kernels_cpu.pack_weight(w, self.rows)  # noqa: E731
        else:
            prep = self._pack if self.rows else lambda w: w.detach().t().contiguous()  # (out, in) -> (in, out)
        self.layers = []
        for blk in model.layers:
            a, m = blk.self_attn, blk.mlp
            qkv = (a.q_proj, a.k_proj, a.v_proj)
            qk_norm = None
            if hasattr(a, "q_norm"):  # Qwen3: per-head RMSNorm weights of the q heads, then of the k heads
                qk_norm = torch.cat([a.q_norm.weight.expand(self.nh, -1), a.k_norm.weight.expand(self.nkv, -1)])
            self.layers.append(dict(
                ln1=blk.input_layernorm.weight.detach(), w_qkv=prep(torch.cat([p.weight for p in qkv])),
                b_qkv=None if a.q_proj.bias is None else torch.cat([p.bias for p in qkv]).detach(),
                qk_norm=None if qk_norm is None else qk_norm.detach(),                                # (nh+nkv, D)
                w_o=prep(a.o_proj.weight), b_o=None if a.o_proj.bias is None else a.o_proj.bias.detach(),
                ln2=blk.post_attention_layernorm.weight.detach(),
                w_gu=prep(torch.cat([m.gate_proj.weight, m.up_proj.weight])), w_down=prep(m.down_proj.weight)))
        self.embed, self.norm = model.embed_tokens.weight.detach(), model.norm.weight.detach()
        self.head = prep(model.head_weight)
        self.vocab = model.head_weight.shape[0]
        mats = [lay[k] for lay in self.layers for k in ("w_qkv", "w_o", "w_gu", "w_down")] + [self.head]
        self.nbytes = sum((m[0] if isinstance(m, tuple) else m).nbytes for m in mats)  # the regrouped matrices
        if self.native:  # the pointers kernels_cpu.c reads, to contiguous tensors kept alive in self.layers
            self.embed, self.norm = self.embed.contiguous(), self.norm.contiguous()
            self._c_layers = (kernels_cpu.Layer * len(self.layers))()
            for c_layer, lay in zip(self._c_layers, self.layers):
                lay.update({k: v.contiguous() for k, v in lay.items() if v is not None})
                c_layer.p[:] = [kernels_cpu.ptr(lay[k]) for k in kernels_cpu.LAYER_WEIGHTS]
            # prefill reads the model's own matrices (no copies: contiguous parameters are used as they are)
            self._plain = [[dict(blk.self_attn.named_children(), **dict(blk.mlp.named_children()))[n]
                            .weight.detach().contiguous() for n in kernels_cpu.PLAIN_WEIGHTS] for blk in model.layers]
            self._c_plain = (kernels_cpu.PlainLayer * len(self._plain))()
            for c_layer, mats in zip(self._c_plain, self._plain):
                c_layer.p[:] = [kernels_cpu.ptr(m) for m in mats]
            self.head_plain = model.head_weight.detach().contiguous()
            self._c_dims = kernels_cpu.Dims(rows=self.rows, hidden=self.hidden, inter=self.inter, n_heads=self.nh,
                                            n_kv_heads=self.nkv, head_dim=self.hd, vocab=self.vocab,
                                            n_layers=len(self.layers), eps=self.eps)

    @staticmethod
    def packed_rows(model, rows: int) -> int:
        """The row count the GEMMs are packed for, 0 for none (the `x @ W_t` layout, any row count)."""
        fp32 = model.embed_tokens.weight.dtype == torch.float32
        return rows if PACKED_GEMM and fp32 and PACK_ROWS[0] <= rows <= PACK_ROWS[1] else 0

    @staticmethod
    def uses_native(model, rows: int) -> bool:
        """Whether a decoder packed for `rows` rows runs its step in native code (kernels_cpu.c) rather than
        MKL-packed torch ops: where that code builds and loads, for all-fp32 parameters, head dims up to 256 and
        an LM head of the embedding's shape (the C code indexes both with the same vocabulary bound)."""
        return (bool(rows) and model.config.head_dim <= 256
                and model.embed_tokens.weight.shape == model.head_weight.shape
                and all(p.dtype == torch.float32 for p in model.parameters()) and kernels_cpu.available())

    def _pack(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W (out, in) -> (MKL's packed W for self.rows rows, a zero-stride (out, in) stand-in). The op reads the
        stand-in's shape only; its values would be read if the row count did not match, which `_mm` rules out."""
        w = w.detach().contiguous()
        return torch.ops.mkl._mkl_reorder_linear_weight(w, self.rows), w.new_zeros(()).expand(w.shape)

    def _mm(self, x: torch.Tensor, w, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + x @ W^T + bias for a matrix prepared by __init__; x (rows, in)."""
        if self.rows:
            if x.shape[0] != self.rows:
                raise RuntimeError(f"FastDecoder: packed for {self.rows} rows, got {x.shape[0]}")
            y = torch.ops.mkl._mkl_linear(x, w[0], w[1], bias, self.rows)
            return y if residual is None else y.add_(residual)
        if residual is not None:
            y = torch.addmm(residual, x, w)                                   # the residual add inside the GEMM
            return y if bias is None else y.add_(bias)
        return x @ w if bias is None else torch.addmm(bias, x, w)

    # model -> (signature of its parameters when built, FastDecoder); dropped with the model
    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_model(cls, model, max_len: int, rows: int = 0) -> FastDecoder:
        """The decoder of `model`'s current weights for decode batches of `rows` rows (packed GEMMs where
        PACK_ROWS allows, any row count otherwise), with RoPE tables for positions [0, max_len).

        Kept between calls while every parameter has the same storage and version counter. Every in-place
        write bumps the version counter (optimizer steps, `copy_` or `load_state_dict` under no_grad), so an
        RL loop gets a rebuild after each update and never samples stale weights. Writes through `p.data` do
        not bump it: after one, call `FastDecoder.clear()`. Models whose parameters are inference tensors
        (created under inference_mode) have no version counter and are rebuilt every call."""
        params = list(model.parameters())
        key = None if any(p.is_inference() for p in params) else tuple((p.data_ptr(), p._version) for p in params)
        hit = cls._cache.get(model)
        want_rows = cls.packed_rows(model, rows)
        if hit is None or key is None or hit[0] != key or hit[1].rows != want_rows \
                or hit[1].native != cls.uses_native(model, want_rows):
            cls._cache.pop(model, None)  # free the old copies before building new ones
            hit = (key, cls(model, rows))
            if key is not None:
                cls._cache[model] = hit
        dec = hit[1]
        if dec.cos is None or dec.cos.shape[0] < max_len:
            dec._rope_tables(max_len)
        return dec

    @classmethod
    def clear(cls):
        """Drop all kept copies (needed only after writing parameters through `p.data`, which no version sees)."""
        cls._cache.clear()

    def _rope_tables(self, max_len: int):
        """cos and sign-folded sin for positions [0, max_len), computed as model.forward does (fp32, then cast)."""
        dtype, dev = self.embed.dtype, self.embed.device
        freqs = torch.arange(max_len, device=dev).float()[:, None] * self.inv_freq.to(dev)           # (S, D/2)
        self.cos = torch.cat((freqs, freqs), -1).cos().to(dtype)                                     # (S, D)
        self.sin = torch.cat((-freqs.sin(), freqs.sin()), -1).to(dtype)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens, pos (B,) for slots [0, B) -> next-token logits (B, V). `cache` is in decode mode for them."""
        if self.native:
            return self._native_step(tokens, pos, cache)
        B, nh, nkv, D, H, I = tokens.shape[0], self.nh, self.nkv, self.hd, self.hidden, self.inter
        S, L = cache.shape[4], cache.max_len
        x = F.embedding(tokens, self.embed)                                   # (B, H)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]             # (B, 1, D)
        # row of (slot b, kv head j, position pos[b]) in a layer's K (or V) cache viewed as (slots * nkv * S, D)
        dst = ((cache.rows[:, None] * nkv + torch.arange(nkv, device=pos.device)) * S + pos[:, None]).view(-1)
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (H,), w["ln1"], self.eps)
            qkv = self._mm(h, w["w_qkv"], w["b_qkv"])
            qk = qkv[:, :(nh + nkv) * D].view(B, nh + nkv, D)                 # q and k heads, roped together
            if w["qk_norm"] is not None:
                qk = F.rms_norm(qk, (D,), None, self.eps) * w["qk_norm"]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)             # (B, nh + nkv, D)
            kv = torch.stack((qk[:, nh:], qkv[:, (nh + nkv) * D:].view(B, nkv, D)))  # (2, B, nkv, D)
            cache.kv[i].view(2, -1, D).index_copy_(1, dst, kv.view(2, B * nkv, D))  # K and V in one write
            kc, vc = cache.k[i], cache.v[i]                                   # (slots, nkv, S, D)
            # the G query heads of a kv head are G query rows of one SDPA head: no repeat of K/V
            o = F.scaled_dot_product_attention(qk[:, :nh].view(B, nkv, nh // nkv, D), kc[:B, :, :L], vc[:B, :, :L],
                                               attn_mask=cache.bias)     # (B, nkv, G, D)
            x = self._mm(o.reshape(B, nh * D), w["w_o"], w["b_o"], residual=x)
            gu = self._mm(F.rms_norm(x, (H,), w["ln2"], self.eps), w["w_gu"])  # (B, 2I)
            x = self._mm(F.silu(gu[:, :I]).mul_(gu[:, I:]), w["w_down"], residual=x)
        return self._mm(F.rms_norm(x, (H,), self.norm, self.eps), self.head)  # (B, V)

    def _native_dims(self, cache: KVCache, rows: int, *index: torch.Tensor) -> kernels_cpu.Dims:
        """The dims of a native call over `rows` rows, after checking everything kernels_cpu.c will trust: the
        index tensors (tokens, positions, ...) are contiguous int64 of `rows` entries, the cache is an allocated
        contiguous fp32 cache of this model, the RoPE tables cover it."""
        kv = cache.kv
        ok = (all(t.shape == (rows,) and t.dtype == torch.long and t.is_contiguous() for t in index)
              and kv is not None and kv.dtype == torch.float32 and kv.is_contiguous()
              and cache.shape[0] == len(self.layers) and cache.shape[3] == self.nkv and cache.shape[5] == self.hd
              and self.cos.shape[0] >= cache.shape[4])
        if not ok:
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in index)
            raise RuntimeError(f"FastDecoder (native): tokens/positions {shapes} or cache {cache.shape} "
                               f"{'not allocated' if kv is None else kv.dtype} do not fit the model")
        d = kernels_cpu.Dims.from_buffer_copy(self._c_dims)   # a copy per call: ctypes releases the GIL
        d.rows, d.max_len, d.slots, d.threads = rows, cache.shape[4], cache.shape[2], torch.get_num_threads()
        return d

    def _native_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The same step as __call__'s torch ops, in one call of kernels_cpu.c's decode_step. That code trusts
        its pointers and sizes, so everything it reads or writes is checked here first."""
        B = tokens.shape[0]
        if B != self.rows:
            raise RuntimeError(f"FastDecoder: packed for {self.rows} rows, got {B}")
        if B > cache.shape[2]:
            raise RuntimeError(f"FastDecoder (native): {B} rows but the cache has {cache.shape[2]} slots")
        d = self._native_dims(cache, B, tokens, pos)
        scratch = torch.empty(kernels_cpu.scratch_floats(d))
        logits = torch.empty((B, self.vocab))
        p = kernels_cpu.ptr
        if kernels_cpu.lib().decode_step(ctypes.byref(d), self._c_layers, p(self.embed), p(self.norm), p(self.head),
                                         p(tokens), p(pos), p(self.cos), p(self.sin), p(cache.kv), p(logits),
                                         p(scratch)):
            raise RuntimeError(f"FastDecoder (native): a token outside [0, {self.vocab}) or a position outside "
                               f"[0, {cache.shape[4]}) in this step")
        return logits

    def prefill(self, tokens: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, last: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """Packed prompts in one native call (kernels_cpu.c's prefill; native decoders only): token i at position
        pos[i] of cache slot slot[i], each prompt's tokens at positions 0..P-1 of one slot. Writes their K/V
        there and returns the next-token logits (len(last), V) of rows `last` (each prompt's last token). The
        model's own matrices, plain sgemm: model.forward's computation with the cache, in fewer calls."""
        if not self.native:
            raise RuntimeError("FastDecoder.prefill runs only in native code (FastDecoder.native)")
        d = self._native_dims(cache, tokens.shape[0], tokens, slot, pos)
        if last.dtype != torch.long or last.dim() != 1 or not last.is_contiguous():
            raise RuntimeError(f"FastDecoder (native): last rows {tuple(last.shape)} {last.dtype}: expected a "
                               "contiguous int64 vector")
        scratch = torch.empty(kernels_cpu.scratch_floats(d))
        logits = torch.empty((last.shape[0], self.vocab))
        p = kernels_cpu.ptr
        if kernels_cpu.lib().prefill(ctypes.byref(d), self._c_layers, self._c_plain, p(self.embed), p(self.norm),
                                     p(self.head_plain), p(tokens), p(slot), p(pos), p(last), last.shape[0],
                                     p(self.cos), p(self.sin), p(cache.kv), p(logits), p(scratch)):
            raise RuntimeError(f"FastDecoder (native prefill): a token outside [0, {self.vocab}), a position outside "
                               f"[0, {cache.shape[4]}), a slot outside [0, {cache.shape[2]}) or a last row outside "
                               f"[0, {tokens.shape[0]})")
        return logits


# ----------------------------------------------------------------------------------------------------------------
# The engine


def generate(model, prompts, *, max_new_tokens: int, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, stop_token_ids=(), seed: int | None = None, max_batch: int = 256,
             kv_cache_bytes: int | None = None, max_prefill_tokens: int = 16384, cuda_graph: bool = False,
             stats: dict | None = None) -> list[Completion]:
    """Sample `n` completions for each prompt (lists of token ids). Returns len(prompts) * n Completions
    ordered by (prompt_index, sample_index). See the module docstring and `SamplingConfig` for the arguments."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                         stop_token_ids=tuple(stop_token_ids), seed=seed, max_batch=max_batch,
                         kv_cache_bytes=kv_cache_bytes, max_prefill_tokens=max_prefill_tokens,
                         cuda_graph=cuda_graph, stats=stats)
    prompts = _check_prompts(prompts, model.config)
    for t in cfg.stop_token_ids:
        if not 0 <= t < model.config.vocab_size:
            raise ValueError(f"rollout.generate: stop token id {t} is outside the vocabulary [0, "
                             f"{model.config.vocab_size})")
    # inference_mode saves ~5% of a CPU decode step over no_grad, but FSDP2 may (re)gather parameters inside the
    # forward and later reuse them for training, which inference tensors forbid: use no_grad under FSDP.
    with torch.no_grad() if _is_fsdp(model) else torch.inference_mode():
        return _Engine(model, prompts, cfg).run()


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _check_prompts(prompts, config) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("rollout.generate: prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
            raise ValueError(f"rollout.generate: prompts[{i}] must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"rollout.generate: prompts[{i}] is empty")
        if len(p) >= config.max_position_embeddings:
            raise ValueError(f"rollout.generate: prompts[{i}] has {len(p)} tokens but the model's context "
                             f"(max_position_embeddings) is {config.max_position_embeddings}; no room to generate")
        p = [int(t) for t in p]
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"rollout.generate: prompts[{i}] has token id {bad[0]} outside the vocabulary "
                             f"[0, {config.vocab_size})")
        out.append(p)
    return out


class _Engine:
    """State of one `generate` call. Host lists mirror the device tensors that the decode step reads."""

    def __init__(self, model, prompts: list[list[int]], cfg: SamplingConfig):
        self.model, self.prompts, self.cfg = model, prompts, cfg
        c = model.config
        w = model.embed_tokens.weight
        self.device = w.device
        self.ctx = c.max_position_embeddings
        max_p = max(len(p) for p in prompts)
        # positions fed to the model: the prompt plus all generated tokens but the last
        self.max_len = min(max_p + cfg.max_new_tokens - 1, self.ctx - 1)
        # sized with the parameter dtype: never smaller than the compute dtype the cache will hold
        slot_bytes = c.num_layers * 2 * c.num_kv_heads * self.max_len * c.head_dim * w.element_size()
        budget = cfg.kv_cache_bytes
        if budget is None:
            budget = torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 4 * 2**30
        self.slots = min(cfg.max_batch, len(prompts) * cfg.n, budget // slot_bytes)
        if self.slots < 1:
            raise ValueError(f"rollout.generate: kv_cache_bytes={budget} cannot hold one sequence of "
                             f"{self.max_len} positions ({slot_bytes} bytes); raise it or lower max_new_tokens")
        self.cache = KVCache(c.num_layers, self.slots, c.num_kv_heads, self.max_len, c.head_dim)
        self.gen = torch.Generator(device=self.device)
        if cfg.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(cfg.seed)
        dev, S, N = self.device, self.slots, cfg.max_new_tokens
        # device state per slot
        self.tokens_in = torch.zeros(S, dtype=torch.long, device=dev)  # last sampled token, fed next step
        self.pos = torch.zeros(S, dtype=torch.long, device=dev)        # its position (= cached positions)
        self.live = torch.zeros(S, dtype=torch.long, device=dev)       # 1 for a live slot, 0 for a free one
        self.count = torch.zeros(S, dtype=torch.long, device=dev)      # tokens generated so far
        self.out_tok = torch.zeros((S, N), dtype=torch.long, device=dev)
        self.out_lp = torch.zeros((S, N), dtype=torch.float32, device=dev)
        # host state per slot
        self.seq: list[tuple[int, int] | None] = [None] * S            # (prompt, sample) in the slot
        self.h_pos = [0] * S
        self.h_count = [0] * S
        self.free = list(range(S))                                     # a heap: refill the lowest slot first
        self.queue = deque((p, j) for p in range(len(prompts)) for j in range(cfg.n))
        self.waiting = [cfg.n] * len(prompts)                          # samples of each prompt not yet started
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> (K/V copy, last logits)
        self.results: dict[tuple[int, int], Completion] = {}
        self.stop = set(cfg.stop_token_ids)
        fsdp = _is_fsdp(model)
        self.static = cfg.cuda_graph and not fsdp
        self.fast = None
        # not when the Triton kernels run on CPU tensors (TRITON_INTERPRET=1, how the kernel tests drive them)
        if FAST_CPU_DECODE and dev.type == "cpu" and not fsdp and not kernels.triton_enabled(w):
            self.fast = FastDecoder.for_model(model, self.max_len, self.slots)
        # GEMMs packed for the slot count: every decode forward computes all slots (the rows past the live ones
        # are free slots riding along, their results dropped), so sampling and compaction stay as without packing
        self.pad_rows = self.fast is not None and self.fast.rows > 0
        self.graph = None
        self.stats = cfg.stats if cfg.stats is not None else {}
        self.stats.update(slots=S, prefill_forwards=0, prefill_tokens=0, decode_steps=0, decode_rows=0,
                          started=0, refills=0, compactions=0)

    def run(self) -> list[Completion]:
        while self.queue or len(self.free) < self.slots:
            if self.queue and self.free:
                self._admit()
                continue  # admission may finish sequences at once (stop token first, max_new_tokens == 1)
            if not self.static:  # a static step computes every slot anyway
                self._compact_if_sparse()
            self._decode_step()
        return [self.results[(p, j)] for p in range(len(self.prompts)) for j in range(self.cfg.n)]

    # -- admission: prefill new prompts, hand out slots, sample the first token -----------------------------------

    def _admit(self):
        take = [self.queue.popleft() for _ in range(min(len(self.free), len(self.queue)))]
        slots = [heapq.heappop(self.free) for _ in take]
        for p, _ in take:
            self.waiting[p] -= 1
        if self.stats["decode_steps"] > 0:
            self.stats["refills"] += len(take)
        self.stats["started"] += len(take)
        slots_of: dict[int, list[int]] = {}
        for (p, _), s in zip(take, slots):
            slots_of.setdefault(p, []).append(s)
        last_logits: dict[int, torch.Tensor] = {}
        new = [p for p in slots_of if p not in self.saved]
        for group in self._prefill_groups(new):
            last_logits.update(self._prefill(group, slots_of))
        for p, ss in slots_of.items():
            if p in self.saved and p not in new:  # started earlier: copy its kept K/V into the new slots
                buf, logits = self.saved[p]
                for s in ss:
                    self.cache.kv[:, :, s, :, :buf.shape[3]] = buf
                last_logits[p] = logits
            if self.waiting[p] == 0:
                self.saved.pop(p, None)
        # first token of every started sample, from its prompt's last-position logits
        tok, lp = sample(torch.stack([last_logits[p] for p, _ in take]), self.cfg.temperature, self.cfg.top_k,
                         self.cfg.top_p, self.gen)
        idx = torch.tensor(slots, device=self.device)
        plen = [len(self.prompts[p]) for p, _ in take]
        self.tokens_in[idx] = tok
        self.pos[idx] = torch.tensor(plen, device=self.device)
        self.live[idx] = 1
        self.count[idx] = 1
        self.out_tok[idx, 0] = tok
        self.out_lp[idx, 0] = lp
        for (p, j), s, n_p in zip(take, slots, plen):
            self.seq[s], self.h_pos[s], self.h_count[s] = (p, j), n_p, 1
        self._finish_check(slots, tok.tolist() if self.stop else None)

    def _prefill_groups(self, new: list[int]) -> list[list[int]]:
        groups, cur, size = [], [], 0
        for p in new:
            if cur and size + len(self.prompts[p]) > self.cfg.max_prefill_tokens:
                groups.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += len(self.prompts[p])
        return groups + [cur] if cur else groups

    def _prefill(self, group: list[int], slots_of: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """One packed forward over the prompts in `group`; returns their last-position logits."""
        as_t = self._long
        lens = [len(self.prompts[p]) for p in group]
        ids = as_t([t for p in group for t in self.prompts[p]])
        positions = as_t([i for n in lens for i in range(n)])
        ends = list(itertools.accumulate(lens))
        last = as_t([e - 1 for e in ends])
        if self.fast is not None and self.fast.native:
            logits = self._native_prefill(group, slots_of, ids, positions, last)
        else:
            logits = self._model_prefill(group, slots_of, ids, positions, last, ends)
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_tokens"] += ends[-1]
        return dict(zip(group, logits))

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _model_prefill(self, group: list[int], slots_of: dict[int, list[int]], ids: torch.Tensor,
                       positions: torch.Tensor, last: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """The prefill through model.forward, the cache writing each prompt's K/V into all of its new slots."""
        bounds, dst_slot, dst_pos, src, saves = [], [], [], [], {}
        for p, e in zip(group, ends):
            P = len(self.prompts[p])
            bounds.append((e - P, e))
            for s in slots_of[p]:
                dst_slot += [s] * P
                dst_pos += range(P)
                src += range(e - P, e)
            if self.waiting[p] > 0:  # samples still queued: keep one copy of the prompt's K/V for them
                saves[p] = (e - P, e)
        as_t = self._long
        self.cache.set_prefill(bounds, as_t(dst_slot), as_t(dst_pos), as_t(src), saves)
        h = self.model(ids[None], position_ids=positions[None], cache=self.cache, hidden_only=True)
        logits = self.model.logits(h[0, last])  # (len(group), V)
        for p in saves:
            self.saved[p] = (self.cache.saved[p], logits[group.index(p)])
        return logits

    def _native_prefill(self, group: list[int], slots_of: dict[int, list[int]], ids: torch.Tensor,
                        positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The prefill in one native call (FastDecoder.prefill): each prompt's K/V into the first of its new
        slots, then copied into the others and, for samples still queued, kept."""
        if self.cache.kv is None:
            self.cache._allocate(self.fast.embed)
        first = [slots_of[p][0] for p in group]
        slot = self._long([s for p, s in zip(group, first) for _ in self.prompts[p]])
        logits = self.fast.prefill(ids, slot, positions, last, self.cache)
        kv = self.cache.kv                                             # (layers, 2, slots, kv_heads, S, D)
        for i, (p, s) in enumerate(zip(group, first)):
            P, rest = len(self.prompts[p]), slots_of[p][1:]
            if rest:
                kv[:, :, rest, :, :P] = kv[:, :, s:s + 1, :, :P]
            if self.waiting[p] > 0:  # samples still queued: keep one copy of the prompt's K/V for them
                self.saved[p] = (kv[:, :, s, :, :P].clone(), logits[i])
        return logits

    # -- decode -------------------------------------------------------------------------------------------------

    def _forward_rows(self, hi: int, max_len: int) -> torch.Tensor:
        """Feed each slot in [0, hi) its last token; returns the next-token logits (hi, V)."""
        self.cache.set_decode(self.pos[:hi], max_len)
        if self.fast is not None:
            return self.fast(self.tokens_in[:hi], self.pos[:hi], self.cache)
        # one token per row: the forward may as well return the logits (inside forward, where FSDP2 has the
        # LM head unsharded)
        return self.model(self.tokens_in[:hi, None], position_ids=self.pos[:hi, None], cache=self.cache)[:, 0]

    def _static_logits(self) -> torch.Tensor:
        """The fixed-shape step (all slots, full cache length), replayed from a CUDA graph when on CUDA."""
        if self.device.type != "cuda":
            return self._forward_rows(self.slots, self.max_len)
        if self.graph is None:
            # Warm up on a side stream (Triton compilation, cuBLAS workspaces), then capture. The warm-up writes
            # the same K/V the real step writes (same tokens at the same positions), so it changes nothing.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward_rows(self.slots, self.max_len)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_out = self._forward_rows(self.slots, self.max_len)
        # inputs are read from tokens_in / pos, which every step updates in place
        self.graph.replay()
        return self.graph_out

    def _decode_step(self):
        live = [s for s in range(self.slots) if self.seq[s] is not None]
        if self.static:
            hi = n_fwd = self.slots
            logits = self._static_logits()
        else:  # rows [0, hi); free slots below hi ride along with harmless writes at position 0
            hi = live[-1] + 1
            n_fwd = self.slots if self.pad_rows else hi
            logits = self._forward_rows(n_fwd, max(self.h_pos[s] for s in live) + 1)[:hi]
        tok, lp = sample(logits, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, self.gen)  # (hi,)
        at = self.count[:hi, None]                       # row b's next output column (0 for a free row)
        self.out_tok[:hi].scatter_(1, at, tok[:, None])
        self.out_lp[:hi].scatter_(1, at, lp[:, None])
        self.tokens_in[:hi] = tok
        self.pos[:hi] += self.live[:hi]
        self.count[:hi] += self.live[:hi]
        for s in live:
            self.h_pos[s] += 1
            self.h_count[s] += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += n_fwd
        # the one per-step host sync, and only when stop tokens are set: read the new tokens
        newest = tok.tolist() if self.stop else None
        self._finish_check(live, None if newest is None else [newest[s] for s in live])

    def _finish_check(self, slots: list[int], newest: list[int] | None):
        """Retire the sequences in `slots` that hit a stop token, max_new_tokens or the context.
        `newest[i]` is the token slot `slots[i]` just generated (None when no stop tokens are set)."""
        done = []
        for i, s in enumerate(slots):
            if newest is not None and newest[i] in self.stop:
                done.append((s, "stop"))
            elif self.h_count[s] >= self.cfg.max_new_tokens or self.h_pos[s] + 1 >= self.ctx:
                done.append((s, "length"))
        if not done:
            return
        idx = torch.tensor([s for s, _ in done], device=self.device)
        out_tok, out_lp = self.out_tok[idx].tolist(), self.out_lp[idx].tolist()
        for (s, reason), t, lp in zip(done, out_tok, out_lp):
            k = self.h_count[s]
            p, j = self.seq[s]
            self.results[(p, j)] = Completion(p, j, t[:k], lp[:k], reason)
            self.seq[s] = None
            heapq.heappush(self.free, s)
        self.live[idx] = 0
        self.pos[idx] = 0   # free rows ride along in decode steps: keep their writes at position 0
        self.count[idx] = 0

    def _compact_if_sparse(self):
        """With nothing left to admit, move live sequences from high slots into free low ones once fewer than
        half the rows of a step are live, so the long tail runs at its real batch size."""
        if self.queue:
            return
        live = [s for s in range(self.slots) if self.seq[s] is not None]
        hi = live[-1] + 1
        if len(live) > hi // 2:
            return
        holes = [s for s in range(len(live)) if self.seq[s] is None]
        movers = [s for s in live if s >= len(live)]
        src = torch.tensor(movers, device=self.device)
        dst = torch.tensor(holes, device=self.device)
        L = max(self.h_pos[s] for s in movers)
        self.cache.kv[:, :, dst, :, :L] = self.cache.kv[:, :, src, :, :L]
        for t in (self.tokens_in, self.pos, self.live, self.count, self.out_tok, self.out_lp):
            t[dst] = t[src]
        self.live[src] = 0
        self.pos[src] = 0
        self.count[src] = 0
        for a, b in zip(movers, holes):
            self.seq[b], self.h_pos[b], self.h_count[b] = self.seq[a], self.h_pos[a], self.h_count[a]
            self.seq[a] = None
        self.free = [s for s in range(self.slots) if self.seq[s] is None]
        heapq.heapify(self.free)
        self.stats["compactions"] += 1
