"""model.py -- one decoder-only transformer for the checkpoints retu post-trains.

    import model as M
    net = M.from_pretrained("Qwen2.5-7B", dtype=torch.bfloat16, device="cuda")   # an HF checkpoint dir
    logits = net(ids)                                              # (B, T) -> (B, T, V)
    logp, ent = net(ids, targets=tgt, temperature=1.0, return_entropy=True)   # (B, T) fp32 each, chunked
    tok = M.load_tokenizer("Qwen2.5-7B"); tok.apply_chat_template(msgs, add_generation_prompt=True)
    M.save_pretrained(net, "out/step100", tokenizer_dir="Qwen2.5-7B")   # atomic; transformers/vLLM load it

Supported HF architectures (config.json `architectures[0]`):
  * Qwen2ForCausalLM  (Qwen2, Qwen2.5, Qwen2.5-Math): q/k/v projections always have biases.
  * Qwen3ForCausalLM  (dense Qwen3): per-head RMSNorm on q and k before RoPE, explicit `head_dim`,
                      biases on q/k/v/o only when `attention_bias` is true.
  * LlamaForCausalLM  (Llama 3.x): `rope_scaling` of type "llama3", untied or tied head,
                      biases on q/k/v/o only when `attention_bias` is true.
All three share one block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); RoPE in the "rotate half"
layout of HF; grouped-query attention through torch's scaled_dot_product_attention (SDPA). Anything else
in a config (sliding window, MLP bias, other rope scalings, other activations) is refused by name.

Also here, because the rest of retu needs exactly one copy of each:
  * per-token log-probs and entropies of target tokens, computed in chunks of tokens so that the (T, V)
    fp32 logits are never materialised at once, in forward and in backward (`_ChunkedLogProb`). Logits
    are divided by the temperature before the softmax (as verl does for RL). Targets < 0 (e.g. -100 at the
    last token of each packed document) give logp 0 and no gradient;
  * HF-compatible safetensors load/save (memory-mapped one tensor at a time, sharded, atomic);
  * a small tokenizer wrapper with byte-exact ChatML (Qwen) and Llama-3 chat formatting (see that section
    for the one deliberate deviation: Llama 3.2's date line);
  * FLOPs: `flops_per_token` is the paper's Appendix C estimate (= verl's FlopsCounter per token);
    `sft_flops` plugs in the dataset-mean length as the paper does (reproduces Table 4);
    `flops_for_lengths` sums actual per-sequence lengths verl-style (sum s_i^2 in the attention term),
    which is what the driver logs for its own runs: slightly more than the mean-length estimate.

Parameter names: `Transformer.state_dict()` names map 1:1 onto HF names by prefixing "model." to
everything except "lm_head.weight" (`hf_name`). Precision follows HF: RMSNorm computes in fp32 and casts
back; RoPE cos/sin are computed in fp32 from fp32 inverse frequencies (kept out of the state dict so a
`.to(bfloat16)` cannot round them) and cast to the activation dtype. In bf16 on CPU the logits are
bit-identical to transformers 5.24's SDPA implementation (tests/test_model.py, when it is installed).
Packed documents (`cu_seqlens`) run causal SDPA per document: block-diagonal causal attention without a
(T, T) mask and without cross-document FLOPs (a Python loop over documents; fine for tens of documents).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}


# ----------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None          # None or {"rope_type": "llama3", factor, low/high_freq_factor, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False              # biases on q/k/v (and o for Llama/Qwen3); Qwen2: always True
    qk_norm: bool = False                     # Qwen3: RMSNorm over head_dim on q and k
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # the config.json this came from, so that save_pretrained writes back keys we do not model
    hf_extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; supported: {sorted(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def o_bias(self) -> bool:
        # HF Qwen2 hard-codes o_proj without bias; Llama and Qwen3 use `attention_bias` for o_proj too.
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """Build from an HF config.json dict; `source` names the file in error messages."""
        def need(key):
            if key not in d:
                raise KeyError(f"{source}: missing required key {key!r}")
            return d[key]

        archs = need("architectures")
        arch = archs[0] if isinstance(archs, list) and archs else archs
        if arch not in ARCHITECTURES:
            raise ValueError(f"{source}: unknown architecture {arch!r} in 'architectures'; "
                             f"supported: {sorted(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings"):
            need(key)                                           # report the first missing key, in file order
        for key in ("use_sliding_window", "mlp_bias"):        # features we do not implement: refuse loudly
            if d.get(key):
                raise ValueError(f"{source}: {key}=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        # transformers >= 4.5x may nest rope settings in `rope_parameters`
        rope = d.get("rope_parameters") or {}
        theta = d["rope_theta"] if "rope_theta" in d else rope.get("rope_theta")
        if theta is None:
            raise KeyError(f"{source}: missing required key 'rope_theta'")
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
            else:
                scaling = {"rope_type": "llama3", **{k: scaling[k] for k in (
                    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
        heads = need("num_attention_heads")
        eos = d.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        return cls(
            architecture=arch, vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=need("num_key_value_heads"),
            head_dim=d.get("head_dim") or need("hidden_size") // heads,
            rms_norm_eps=need("rms_norm_eps"), rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "Qwen2ForCausalLM" else bool(d.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            max_position_embeddings=need("max_position_embeddings"),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos, hf_extra=dict(d))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        return cls.from_hf(d, source=str(path))

    def to_hf(self) -> dict:
        """An HF config.json dict (keys we do not model are carried over from the loaded file)."""
        d = dict(self.hf_extra)
        d.pop("rope_parameters", None)
        d.update(
            architectures=[self.architecture], model_type=ARCHITECTURES[self.architecture],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, hidden_act="silu", rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=(self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)),
        )
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.attention_bias
        return d

    @classmethod
    def tiny(cls, architecture: str = "Qwen2ForCausalLM", **overrides) -> ModelConfig:
        """A few-thousand-parameter config of a family, for tests. Llama gets llama3 rope scaling whose
        three frequency regimes (kept / smoothed / divided) are all hit by head_dim 8, theta 1e4."""
        base = dict(architecture=architecture, vocab_size=97, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                    rope_theta=10000.0, max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,))
        if architecture == "Qwen2ForCausalLM":
            base.update(attention_bias=True)
        elif architecture == "Qwen3ForCausalLM":
            base.update(qk_norm=True, head_dim=12)     # head_dim != hidden/heads, as in real Qwen3
        elif architecture == "LlamaForCausalLM":
            base.update(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        base.update(overrides)
        return cls(**base)


# ----------------------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics, cast back before the weight multiply: HF's order, so bf16 results match
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies theta^(-2i/d), with Llama-3 scaling when configured."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = config.rope_scaling
    if s is None:
        return inv
    # llama3: long wavelengths (> orig/low_ff) are slowed by `factor`, short ones (< orig/high_ff) kept,
    # the band between interpolates linearly in orig/wavelength.
    factor, lo, hi, orig = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
        s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x (B, T, nh, D); cos/sin (B, T, 1, D) in x's dtype. HF "rotate half" layout (not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx, self.nh, self.nkv, self.hd = layer_idx, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, doc_bounds, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)        # (B, T, nh, D)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)       # (B, T, nkv, D)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            o = cache.attend(self.layer_idx, q, k, v)          # the sampler's KV cache owns attention
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # (B, heads, T, D) for SDPA
            if doc_bounds is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:                                               # block-diagonal causal, one doc at a time
                o = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                              is_causal=True, enable_gqa=True)
                               for s, e in doc_bounds], dim=2)
            o = o.transpose(1, 2)                               # (B, T, nh, D)
        return self.o_proj(o.reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, doc_bounds, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_bounds, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------
# Chunked log-probs / entropy of targets

LOGPROB_CHUNK_BYTES = 256 * 2**20   # budget for one (chunk, V) fp32 logits buffer


def logprob_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that a (chunk, V) fp32 buffer stays within LOGPROB_CHUNK_BYTES."""
    return max(1, LOGPROB_CHUNK_BYTES // (4 * vocab_size))


class _ChunkedLogProb(torch.autograd.Function):
    """logp[n] = log softmax(h[n] W^T / temp)[t[n]] and entropy[n] of that distribution, for N tokens.

    Forward and backward walk over chunks of tokens and recompute the (chunk, V) logits, so nothing of size
    (N, V) ever exists. Only h, W, targets and the (N,) log-sum-exp are saved. With z = logits / temp,
    p = softmax(z), H = lse - sum p z:  dlogp/dz = onehot(t) - p,  dH/dz = -p (log p + H).
    Targets < 0 are ignored (logp 0, no gradient), e.g. the last token of each packed document.
    Transient memory: a handful of (chunk, V) fp32 buffers (chunk = logprob_chunk_tokens(V)), plus in
    backward one (V, H) fp32 accumulator for the head's gradient (2.2 GB for Qwen2.5-7B's 152064 x 3584).
    """

    @staticmethod
    def forward(ctx, h, w, targets, temperature, want_entropy):
        N, chunk = h.shape[0], logprob_chunk_tokens(w.shape[0])
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        ent = torch.empty(N, dtype=torch.float32, device=h.device) if want_entropy else None
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        valid = targets >= 0
        safe_t = targets.clamp(min=0)
        for s in range(0, N, chunk):
            z = (h[s:s + chunk] @ w.t()).float() / temperature                  # (c, V) fp32
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            logp[s:s + chunk] = z.gather(1, safe_t[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
            if want_entropy:
                ent[s:s + chunk] = lse[s:s + chunk] - (torch.softmax(z, -1) * z).sum(-1)
        logp = torch.where(valid, logp, 0.0)
        ctx.save_for_backward(h, w, targets, lse, ent if want_entropy else lse)
        ctx.temperature, ctx.want_entropy = temperature, want_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, targets, lse, ent = ctx.saved_tensors
        N, chunk, temp = h.shape[0], logprob_chunk_tokens(w.shape[0]), ctx.temperature
        valid = targets >= 0
        safe_t = targets.clamp(min=0)
        g_logp = torch.zeros(N, device=h.device) if g_logp is None else torch.where(valid, g_logp.float(), 0.0)
        use_ent = ctx.want_entropy and g_ent is not None
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        for s in range(0, N, chunk):
            e = s + chunk
            z = (h[s:e] @ w.t()).float() / temp                                # (c, V)
            logp_all = z - lse[s:e, None]
            p = logp_all.exp()
            gz = -p * g_logp[s:e, None]                                         # (onehot - p) * g
            gz.scatter_add_(1, safe_t[s:e, None], g_logp[s:e, None])
            if use_ent:
                gz -= p * (logp_all + ent[s:e, None]) * g_ent[s:e, None].float()
            gz = gz / temp                                                      # d loss / d raw logits
            if grad_h is not None:
                grad_h[s:e] = gz.to(h.dtype) @ w
            if grad_w is not None:
                grad_w += gz.t() @ h[s:e].float()                               # fp32 accumulation over chunks
        return grad_h, (None if grad_w is None else grad_w.to(w.dtype)), None, None, None


def chunked_logprob(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h (N, H), weight (V, H), targets (N,) -> logp (N,) fp32, entropy (N,) fp32 or None."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _ChunkedLogProb.apply(h, weight, targets, float(temperature), return_entropy)


# ----------------------------------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # a plain attribute, not a buffer: stays fp32 under .to(bf16) and out of the state dict
        self.inv_freq = rope_inv_freq(config)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight   # (V, H)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) through the (tied or untied) LM head, in the model dtype."""
        return F.linear(hidden, self.head_weight)

    def forward(self, input_ids, *, position_ids=None, cu_seqlens=None, cache=None, targets=None,
                temperature: float = 1.0, return_entropy: bool = False, hidden_only: bool = False):
        B, T = input_ids.shape
        dev = input_ids.device
        doc_bounds = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs a packed batch of one row, got input_ids of shape {(B, T)}")
            cu = [int(c) for c in cu_seqlens.tolist()]          # one host sync per forward
            if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
            doc_bounds = [(a, b) for a, b in zip(cu, cu[1:]) if b > a]
            if position_ids is None:                             # positions restart at each document
                cu_t = torch.tensor(cu, device=dev)
                starts = torch.repeat_interleave(cu_t[:-1], cu_t[1:] - cu_t[:-1])   # (T,) start of own doc
                position_ids = (torch.arange(T, device=dev) - starts)[None]
        if position_ids is None:
            if cache is not None:
                raise ValueError("position_ids are required when a cache is given")
            position_ids = torch.arange(T, device=dev)[None].expand(B, T)
        if self.inv_freq.device != dev:
            self.inv_freq = self.inv_freq.to(dev)
        x = self.embed_tokens(input_ids)                         # (B, T, H)
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]      # (B, T, 1, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_bounds, cache)
        h = self.norm(x)                                         # (B, T, H)
        if hidden_only:
            return h
        if targets is None:
            return self.logits(h)                                # (B, T, V)
        logp, ent = chunked_logprob(h.reshape(B * T, -1), self.head_weight, targets.reshape(B * T),
                                    temperature, return_entropy)
        return logp.view(B, T), (None if ent is None else ent.view(B, T))


def hf_name(name: str) -> str:
    """Our state_dict name -> the HF checkpoint name."""
    return name if name.startswith("lm_head.") else "model." + name


# ----------------------------------------------------------------------------------------------------
# Checkpoints (HF layout: config.json + model.safetensors, or model-0000i-of-0000n.safetensors + index)

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX_FILE}: not a valid safetensors index ({e!r})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor {INDEX_FILE} found")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: shard listed in {INDEX_FILE} does not exist")
    return files


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", *, headless: bool = False) -> Transformer:
    """Load an HF checkpoint directory. The model is built on the meta device, then given uninitialised
    storage of `dtype` on `device`, and each tensor is copied from the memory-mapped file straight into
    its parameter: peak memory is the model plus one tensor, never a second full copy.
    headless=True loads the decoder without an LM head, for embedding models (`embed`): Qwen3-Embedding ships
    its tensors without the "model." prefix and no lm_head.weight even when untied (the 8B); both are accepted
    and the returned model's logits are meaningless (it is treated as tied)."""
    path = Path(path)
    config = ModelConfig.from_json(path / "config.json")
    if headless:     # no (V, H) head is allocated: an embedding model never uses one
        config = dataclasses.replace(config, tie_word_embeddings=True)
    files = _weight_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=device)
    params = {hf_name(n): p for n, p in model.state_dict(keep_vars=True).items()}
    loaded = set()
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f, torch.no_grad():
                for key in f.keys():
                    name = key if not headless or key.startswith("model.") else "model." + key
                    if key.endswith("rotary_emb.inv_freq") or (headless and key == "lm_head.weight"):
                        continue                                  # a buffer of old exports; an unused head
                    if name not in params:
                        raise ValueError(f"{file}: unexpected tensor {key!r} "
                                         f"(not a parameter of this {config.architecture} config)")
                    if name in loaded:
                        raise ValueError(f"{file}: tensor {key!r} appears in more than one file")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(params[name].shape):
                        raise ValueError(f"{file}: tensor {key!r} has shape {shape}, "
                                         f"expected {tuple(params[name].shape)} from config.json")
                    params[name].copy_(f.get_tensor(key))
                    loaded.add(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model


def save_pretrained(model: Transformer, path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int = 5_000_000_000, state_dict: dict | None = None) -> None:
    """Write an HF checkpoint directory that transformers and vLLM load. Everything is written to a
    temporary sibling directory, fsynced, then renamed over `path`, so a crash never leaves a half
    checkpoint at `path`. `state_dict` (our names) overrides model.state_dict(), e.g. a full state dict
    gathered from FSDP shards on rank 0. Tensors are moved to CPU one shard at a time."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {hf_name(k): v.detach() for k, v in (state_dict or model.state_dict()).items()}
    # greedy shard plan in state-dict order, each shard <= max_shard_bytes (a bigger tensor gets its own)
    shards, size = [[]], 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)           # mkdtemp makes it 0700; a checkpoint is shared like any directory
    try:
        weight_map = {}
        for i, names in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: sd[n].to("cpu").contiguous() for n in names}, tmp / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2))
        cfg = model.config.to_hf()
        dtype_name = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        cfg["torch_dtype"] = dtype_name
        if "dtype" in cfg:                                       # transformers >= 4.56 spelling
            cfg["dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer_dir is not None:
            found = [f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
            if "tokenizer.json" not in found:
                raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json to copy")
            for f in found:
                shutil.copyfile(Path(tokenizer_dir) / f, tmp / f)
        for f in tmp.iterdir():                                  # durable before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():                                        # replace an existing checkpoint
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------
# Tokenizer and chat formatting
#
# The built-in renderers reproduce, byte for byte, the published templates for system/user/assistant turns:
#   chatml:  Qwen2/2.5/2.5-Math (a default system turn taken from the template's own text, e.g. Qwen2.5's
#            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), Qwen3 (no default system;
#            the assistant turn after the last user query gets a <think> block, earlier ones lose theirs).
#   llama3:  Llama 3.1/3.2 (a system block "Cutting Knowledge Date: December 2023\nToday Date: <date>\n\n" +
#            system text is always rendered; contents are strip()ed). Deviation: Llama 3.2's template takes
#            today's date from `strftime_now`; we render the template's own fallback "26 Jul 2024" (override
#            with date_string=...) so that training data does not depend on the day it was tokenized.
#            Llama 3.0 templates (no date block) are rendered as published.
# Without a chat_template the family comes from the vocabulary's special tokens and the plain form is used
# (ChatML without a default system turn; Llama-3.0 style).
# Tools / tool calls are not supported (a clear error). `chat_renderer="jinja"` renders the checkpoint's own
# template with jinja2 the way HF does (for families the built-in renderers do not know).

LLAMA_DEFAULT_DATE = "26 Jul 2024"
_CHATML_DEFAULT_SYSTEM = re.compile(r"""(['"])<\|im_start\|>system\\n((?:(?!\1)[^\\]|\\.)+?)<\|im_end\|>\\n\1""")


class Tokenizer:
    """tokenizers.Tokenizer + tokenizer_config.json. eos_token_ids = (tokenizer_config eos, then
    generation_config.json eos ids, then the chat format's end-of-turn token <|im_end|> / <|eot_id|>),
    deduplicated; pad_token_id falls back to eos_token_ids[0] when the config names no pad token."""

    def __init__(self, path: str | os.PathLike, chat_renderer: str = "builtin"):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        if chat_renderer not in ("builtin", "jinja"):
            raise ValueError(f"chat_renderer must be 'builtin' or 'jinja', got {chat_renderer!r}")
        self.chat_renderer = chat_renderer
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path / 'tokenizer.json'}: not found")
        try:
            self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"{path / 'tokenizer.json'}: cannot be read by tokenizers ({e})") from None
        self.config = _read_json(path / "tokenizer_config.json") or {}
        template = self.config.get("chat_template")
        if isinstance(template, list):                    # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():     # newer HF exports keep it in its own file
            template = (path / "chat_template.jinja").read_text()
        self.chat_template: str | None = template

        def token(key):
            v = self.config.get(key)
            return v.get("content") if isinstance(v, dict) else v
        self.bos_token, self.eos_token, self.pad_token = token("bos_token"), token("eos_token"), token("pad_token")
        eos = [self._id(self.eos_token, "eos_token")] if self.eos_token else []
        gen = (_read_json(path / "generation_config.json") or {}).get("eos_token_id")
        eos += gen if isinstance(gen, list) else ([gen] if gen is not None else [])
        self.chat_family = self._detect_family()
        end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.chat_family)
        if end_of_turn and self._tok.token_to_id(end_of_turn) is not None:
            eos.append(self._tok.token_to_id(end_of_turn))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        if not self.eos_token_ids:
            raise ValueError(f"{path}: no eos token (tokenizer_config.json eos_token, generation_config.json)")
        self.pad_token_id: int = self._id(self.pad_token, "pad_token") if self.pad_token else self.eos_token_ids[0]
        self.bos_token_id: int | None = self._id(self.bos_token, "bos_token") if self.bos_token else None
        self.path = path

    def _id(self, token: str, key: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer_config.json: {key} {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special tokens written in `text` (e.g. from the chat template) are recognised. Nothing is added
        by default: rendered chat strings already carry their BOS, as with HF apply_chat_template."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _detect_family(self) -> str | None:
        t = self.chat_template
        markers = t if t is not None else "".join(
            m for m in ("<|im_start|>", "<|start_header_id|>") if self._tok.token_to_id(m) is not None)
        if "<|im_start|>" in markers:
            return "chatml"
        if "<|start_header_id|>" in markers:
            return "llama3"
        return None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, *,
                            date_string: str = LLAMA_DEFAULT_DATE, enable_thinking: bool | None = None) -> str:
        """Render a conversation to text (not ids), byte-exact with the family's published template."""
        if not messages:
            raise ValueError("apply_chat_template: messages is empty")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: need role system/user/assistant and a string content "
                                 f"(tools are not supported), got {m!r}")
        if self.chat_renderer == "jinja":
            return self.render_jinja(messages, add_generation_prompt, date_string=date_string,
                                     enable_thinking=enable_thinking)
        if self.chat_family == "chatml":
            return self._render_chatml(messages, add_generation_prompt, enable_thinking)
        if self.chat_family == "llama3":
            return self._render_llama3(messages, add_generation_prompt, date_string)
        raise ValueError(f"{self.path}: unknown chat format (neither ChatML <|im_start|> nor Llama-3 "
                         f"<|start_header_id|> in the chat template or vocabulary); "
                         f"use chat_renderer='jinja' to render the checkpoint's own template")

    def _render_chatml(self, messages, add_generation_prompt, enable_thinking):
        t = self.chat_template or ""
        m = _CHATML_DEFAULT_SYSTEM.search(t)
        default_system = ast.literal_eval(m.group(1) + m.group(2) + m.group(1)) if m else None
        qwen3 = "</think>" in t and "reasoning_content" in t
        out = []
        if messages[0]["role"] == "system":
            out.append(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n")
        elif default_system is not None:
            out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        # Qwen3: index of the last real user query; assistant turns after it keep their reasoning
        last_query = max((i for i, x in enumerate(messages) if x["role"] == "user" and not (
            x["content"].startswith("<tool_response>") and x["content"].endswith("</tool_response>"))),
            default=len(messages) - 1)
        for i, x in enumerate(messages):
            role, content = x["role"], x["content"]
            if i == 0 and role == "system":
                continue
            if role != "assistant" or not qwen3:
                out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
                continue
            reasoning = x.get("reasoning_content")
            if reasoning is None:
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            if i > last_query and (i == len(messages) - 1 or reasoning):
                out.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                           f"{content.lstrip(chr(10))}<|im_end|>\n")
            else:
                out.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
            if qwen3 and enable_thinking is False:
                out.append("<think>\n\n</think>\n\n")
        return "".join(out)

    def _render_llama3(self, messages, add_generation_prompt, date_string):
        out = [self.bos_token or ""]
        if self.chat_template is not None and "Cutting Knowledge Date" in self.chat_template:   # 3.1 / 3.2
            system = ""
            if messages[0]["role"] == "system":
                system, messages = messages[0]["content"].strip(), messages[1:]
            out.append(f"<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                       f"Today Date: {date_string}\n\n{system}<|eot_id|>")
        for x in messages:
            out.append(f"<|start_header_id|>{x['role']}<|end_header_id|>\n\n{x['content'].strip()}<|eot_id|>")
        if add_generation_prompt:
            out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(out)

    def render_jinja(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The checkpoint's own chat_template through jinja2, set up as HF does (trim_blocks, lstrip_blocks,
        sandboxed, tojson, raise_exception). No `strftime_now`, so Llama 3.2 falls back to its fixed date."""
        try:
            import jinja2
            import jinja2.sandbox
        except ImportError:
            raise ImportError("chat_renderer='jinja' needs the optional dependency jinja2") from None
        if self.chat_template is None:
            raise ValueError(f"{self.path}: tokenizer_config.json has no chat_template to render")

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **k: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **kwargs)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_tokenizer(path: str | os.PathLike, chat_renderer: str = "builtin") -> Tokenizer:
    """Tokenizer of an HF checkpoint/tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    return Tokenizer(path, chat_renderer)


# ----------------------------------------------------------------------------------------------------
# FLOPs (paper Appendix C == verl FlopsCounter._estimate_qwen2_flops at 59049a66)

def _matmul_params(c: ModelConfig) -> int:
    """N: parameters that take part in matmuls, per verl: MLP, q/k/v/o, embedding AND lm_head (2VH, even
    when tied). Biases, norms, softmax and RoPE are not counted."""
    attn = c.hidden_size * (2 * c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim)
    return c.num_layers * (3 * c.hidden_size * c.intermediate_size + attn) + 2 * c.vocab_size * c.hidden_size


def flops_per_token(config: ModelConfig, seq_len: float) -> float:
    """Forward FLOPs per token of a length-`seq_len` sequence: 2N + 4 S L n_h d (attention counted in
    full, no causal halving, as in the paper). The paper plugs in the dataset-mean length S."""
    c = config
    return 2 * _matmul_params(c) + 4 * seq_len * c.num_layers * c.num_heads * c.head_dim


def train_flops_per_token(config: ModelConfig, seq_len: float) -> float:
    """Forward + backward = 3x forward (paper Appendix C)."""
    return 3 * flops_per_token(config, seq_len)


def sft_flops(config: ModelConfig, batch_size: int, mean_len: float, steps: int) -> float:
    """Paper's SFT compute: B * S * 3 F_fwd(S) * steps, with S the dataset-mean prompt+response length."""
    return batch_size * mean_len * train_flops_per_token(config, mean_len) * steps


def flops_for_lengths(config: ModelConfig, seq_lens, training: bool = True) -> float:
    """FLOPs of a batch of actual sequence lengths, verl-style: (6 or 2) N sum s + (12 or 4) L n_h d sum s^2.
    Equal to sft_flops when all lengths are equal; larger than the mean-length estimate otherwise."""
    c, mult = config, (3 if training else 1)
    s1 = sum(int(s) for s in seq_lens)
    s2 = sum(int(s) ** 2 for s in seq_lens)
    return mult * (2 * _matmul_params(c) * s1 + 4 * s2 * c.num_layers * c.num_heads * c.head_dim)


# ----------------------------------------------------------------------------------------------------
# Text embeddings (the Qwen3-Embedding recipe): the final normed hidden state at the last token, L2-normalised

def embed(model: Transformer, token_ids: list[list[int]], tokens_per_batch: int = 16384) -> torch.Tensor:
    """(N, H) fp32 unit vectors, one per token-id list (load the model with from_pretrained(..., headless=True);
    each list should end in the EOS that Qwen3-Embedding's tokenizer appends, <|endoftext|>). Sequences are
    sorted by length and run as right-padded batches of at most `tokens_per_batch` padded tokens; a longer one
    runs alone. Under causal attention no real token sees the padding after it, so the last real token's state
    equals that of an unpadded forward (HF pads on the left: RoPE is relative, so that gives the same vectors)."""
    if not token_ids or any(len(t) == 0 for t in token_ids):
        raise ValueError("embed: need a non-empty list of non-empty token-id lists")
    dev = model.embed_tokens.weight.device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))    # short first: little padding
    out = torch.empty(len(token_ids), model.config.hidden_size, dtype=torch.float32, device=dev)
    with torch.inference_mode():
        i = 0
        while i < len(order):
            j = i + 1                    # sorted order: the batch's width is the length of its last member
            while j < len(order) and (j + 1 - i) * len(token_ids[order[j]]) <= tokens_per_batch:
                j += 1
            idx = order[i:j]
            rows = [torch.tensor(token_ids[k], dtype=torch.long) for k in idx]
            ids = nn.utils.rnn.pad_sequence(rows, batch_first=True).to(dev)           # (b, T), 0-padded
            last = torch.tensor([len(r) - 1 for r in rows], device=dev)
            h = model(ids, hidden_only=True)                                           # (b, T, H)
            out[torch.tensor(idx, device=dev)] = F.normalize(h[torch.arange(len(idx), device=dev), last].float(),
                                                             dim=-1)
            i = j
    return out
