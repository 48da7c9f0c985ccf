"""rollout.generate against a naive no-cache loop, full-forward log-prob recomputation, and the intended
top-k / top-p / temperature distribution; plus stop/length handling, seeding, the KV budget and bad input."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels_cpu
import rollout
from model import ModelConfig, Transformer
from rollout import generate, sample

PROMPTS = [[5, 6, 7], [9] * 11, [3], [40, 41, 42, 43, 44, 45, 46]]  # mixed lengths, one single-token prompt


def tiny_model(arch="Qwen2ForCausalLM", seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.tiny(arch, **kw)).eval()


def naive_greedy(model, prompt, max_new, stop=()):
    """Re-run the full forward on prompt + generated tokens for every new token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] in stop or len(ids) >= model.config.max_position_embeddings:
                break
    return ids[len(prompt):]


def full_forward_logprobs(model, prompt, completion, temperature):
    """log softmax(logits / T)[token] of each completion token, from one forward over prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0].double() / temperature
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# Greedy == naive loop


@pytest.mark.parametrize("fast", [True, False], ids=["fast-cpu-decode", "model-forward"])
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_greedy_matches_naive_loop_with_refills(arch, fast, monkeypatch):
    monkeypatch.setattr(rollout, "FAST_CPU_DECODE", fast)  # both CPU decode paths (CUDA/FSDP use model-forward)
    model = tiny_model(arch)
    stats = {}
    outs = generate(model, PROMPTS, n=3, max_new_tokens=9, temperature=0, max_batch=4, stats=stats)
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(p, j) for p in range(4) for j in range(3)]
    for o in outs:
        assert o.token_ids == naive_greedy(model, PROMPTS[o.prompt_index], 9), (o.prompt_index, o.sample_index)
        assert o.finish_reason == "length"
    assert stats["slots"] == 4
    assert stats["refills"] == 12 - 4  # 12 samples through 4 slots: 8 started in slots freed by earlier ones
    # prefix sharing: every prompt prefilled exactly once although its 3 samples started at different times
    assert stats["prefill_tokens"] == sum(len(p) for p in PROMPTS)


@pytest.mark.parametrize("packed", [False, True], ids=["compacting", "packed-gemm"])
def test_greedy_with_stop_tokens_matches_naive_and_compacts(packed, monkeypatch):
    """Early finishers leave holes and the long tail gets compacted. With GEMMs packed for the slot count
    (rollout.PACKED_GEMM) every decode forward computes all slots, the same tokens."""
    if packed and not rollout.PACKED_GEMM:
        pytest.skip("torch built without MKL")
    monkeypatch.setattr(rollout, "PACKED_GEMM", packed)
    model = tiny_model()
    free_run = {p: naive_greedy(model, PROMPTS[p], 14) for p in range(4)}
    # stop on the 3rd token of prompt 0's free run and the 8th of prompt 2's: different finishing times
    stop = (free_run[0][2], free_run[2][7])
    stats = {}
    outs = generate(model, PROMPTS, n=2, max_new_tokens=14, temperature=0, stop_token_ids=stop, stats=stats)
    for o in outs:
        want = naive_greedy(model, PROMPTS[o.prompt_index], 14, stop=stop)
        assert o.token_ids == want
        assert o.finish_reason == ("stop" if want[-1] in stop else "length")
        assert all(t not in stop for t in o.token_ids[:-1])
    assert {o.finish_reason for o in outs} == {"stop", "length"}
    assert outs[0].finish_reason == "stop" and len(outs[0].token_ids) <= 3
    assert stats["compactions"] >= 1
    if packed:
        assert stats["decode_rows"] == 8 * stats["decode_steps"]
        assert rollout.FastDecoder._cache[model][1].rows == 8
    else:
        assert stats["decode_rows"] < 8 * stats["decode_steps"]
        assert rollout.FastDecoder._cache[model][1].rows == 0


@pytest.mark.parametrize("native", [True, False], ids=["native-step", "torch-ops"])
def test_packed_gemm_decoder_matches_transposed_one_and_rebuilds_per_row_count(native, monkeypatch):
    """FastDecoder with packed GEMMs (rows in PACK_ROWS) -- the native step of kernels_cpu.c, or MKL-packed torch
    ops -- against the x @ W_t one on the same step: logits and the K/V written to fp32 rounding, for biases on
    q/k/v (Qwen2), on o as well (Llama with attention_bias) and q/k norms (Qwen3); a call with another row count
    is refused rather than silently computed from weights packed for another shape."""
    if not rollout.PACKED_GEMM:
        pytest.skip("torch built without MKL")
    if native and not kernels_cpu.available():
        pytest.skip(f"native CPU step unavailable: {kernels_cpu.unavailable_reason()}")
    monkeypatch.setattr(kernels_cpu, "USE_NATIVE", native)
    for arch, kw in [("Qwen2ForCausalLM", {}), ("LlamaForCausalLM", dict(attention_bias=True)),
                     ("Qwen3ForCausalLM", {})]:
        model = tiny_model(arch, **kw)
        c = model.config
        packed, plain = rollout.FastDecoder(model, rows=3), rollout.FastDecoder(model, rows=1)
        assert (packed.rows, plain.rows, packed.native, plain.native) == (3, 0, native, False)
        assert packed.nbytes > 0 and plain.nbytes > 0
        assert rollout.FastDecoder.packed_rows(model, rollout.PACK_ROWS[1] + 1) == 0
        assert rollout.FastDecoder.packed_rows(model.to(torch.float64), 3) == 0   # MKL packs fp32 only
        model.float()
        cache = rollout.KVCache(c.num_layers, 3, c.num_kv_heads, 16, c.head_dim)
        torch.manual_seed(1)
        cache._allocate(torch.zeros(()))
        cache.kv.normal_()                                        # some cached history for attention to read
        history = cache.kv.clone()
        tokens, pos = torch.tensor([3, 7, 11]), torch.tensor([5, 0, 9])
        with torch.inference_mode():
            got, kv = [], []
            for dec in (packed, plain):
                cache.kv.copy_(history)
                dec._rope_tables(16)
                cache.set_decode(pos, 16)
                got.append(dec(tokens, pos, cache))
                kv.append(cache.kv.clone())
            torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kv[0], kv[1], atol=1e-5, rtol=1e-5)
            assert not torch.equal(kv[0], history)               # the step wrote its K/V
            with pytest.raises(RuntimeError, match="packed for 3 rows, got 2"):
                cache.set_decode(pos[:2], 16)
                packed(tokens[:2], pos[:2], cache)
            if native:   # indices the C code would follow are checked before it writes anything
                cache.kv.copy_(history)
                for bad_tok, bad_pos in [([3, 7, c.vocab_size], [5, 0, 9]), ([3, 7, 11], [5, 0, 16])]:
                    with pytest.raises(RuntimeError, match="outside"):
                        packed(torch.tensor(bad_tok), torch.tensor(bad_pos), cache)
                assert torch.equal(cache.kv, history)
    # the cache of decoders: a call with another slot count rebuilds for it
    model = tiny_model()
    generate(model, PROMPTS, max_new_tokens=3, temperature=0)                # 4 slots
    assert rollout.FastDecoder._cache[model][1].rows == 4
    generate(model, PROMPTS[:2], max_new_tokens=3, temperature=0)            # 2 slots
    assert rollout.FastDecoder._cache[model][1].rows == 2
    generate(model, PROMPTS[:1], max_new_tokens=3, temperature=0)            # 1 slot: x @ W_t
    assert rollout.FastDecoder._cache[model][1].rows == 0


def test_static_decode_matches_naive_loop():
    """cuda_graph=True decodes every slot at the full cache length each step (the shape a CUDA graph replays);
    on CPU that static step runs eagerly. Same tokens as the naive loop, with refills and early stops."""
    model = tiny_model()
    stop = (naive_greedy(model, PROMPTS[0], 8)[2],)
    stats = {}
    outs = generate(model, PROMPTS, n=2, max_new_tokens=8, temperature=0, stop_token_ids=stop, max_batch=3,
                    cuda_graph=True, stats=stats)
    for o in outs:
        assert o.token_ids == naive_greedy(model, PROMPTS[o.prompt_index], 8, stop=stop)
    assert stats["refills"] > 0 and stats["compactions"] == 0
    assert stats["decode_rows"] == 3 * stats["decode_steps"]  # every step ran all 3 slots


def test_small_kv_budget_and_prefill_chunks_give_the_same_tokens():
    model = tiny_model()
    c = model.config
    max_len = max(len(p) for p in PROMPTS) + 6 - 1
    slot_bytes = c.num_layers * 2 * c.num_kv_heads * max_len * c.head_dim * 4
    stats = {}
    outs = generate(model, PROMPTS, n=2, max_new_tokens=6, temperature=0, kv_cache_bytes=2 * slot_bytes + 7,
                    max_prefill_tokens=8, stats=stats)
    assert stats["slots"] == 2  # the budget holds exactly two sequences
    assert stats["prefill_tokens"] == sum(len(p) for p in PROMPTS)
    for o in outs:
        assert o.token_ids == naive_greedy(model, PROMPTS[o.prompt_index], 6)
    stats = {}
    generate(model, PROMPTS, max_new_tokens=2, temperature=0, max_prefill_tokens=8, stats=stats)
    assert stats["prefill_forwards"] == 3  # 3+11 > 8 and 11+1+7 > 8: packed as [3], [11], [1, 7]


# ----------------------------------------------------------------------------------------------------------------
# Log-probs


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logprobs_match_full_forward(temperature):
    model = tiny_model()
    outs = generate(model, PROMPTS, n=2, max_new_tokens=12, temperature=temperature, seed=3, max_batch=3)
    for o in outs:
        want = full_forward_logprobs(model, PROMPTS[o.prompt_index], o.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(o.logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0)
    # and they agree with the trainer's path: model(..., targets, temperature)
    o = outs[3]
    ids = torch.tensor([PROMPTS[o.prompt_index] + o.token_ids])
    with torch.no_grad():
        logp, _ = model(ids[:, :-1], targets=ids[:, 1:], temperature=temperature)
    P = len(PROMPTS[o.prompt_index])
    torch.testing.assert_close(logp[0, P - 1:], torch.tensor(o.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,kw", [("Qwen2ForCausalLM", {}), ("Qwen3ForCausalLM", dict(attention_bias=True)),
                                     ("LlamaForCausalLM", dict(attention_bias=True))])
def test_fast_cpu_decode_logprobs_match_full_forward_per_architecture(arch, kw, monkeypatch):
    """rollout.FastDecoder re-implements the decode step with regrouped weights: q/k/v and o biases (Qwen2 has
    no o bias, Llama with attention_bias has one), Qwen3's per-head q/k norms, Llama-3 RoPE scaling. Its
    log-probs must be the model's, and the model-forward path must give the same tokens."""
    model = tiny_model(arch, **kw)
    outs = generate(model, PROMPTS, n=2, max_new_tokens=10, temperature=1.0, seed=5, max_batch=3)
    for o in outs:
        want = full_forward_logprobs(model, PROMPTS[o.prompt_index], o.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(o.logprobs, dtype=torch.float64), want, atol=1e-5, rtol=0)
    monkeypatch.setattr(rollout, "FAST_CPU_DECODE", False)
    slow = generate(model, PROMPTS, n=2, max_new_tokens=10, temperature=1.0, seed=5, max_batch=3)
    assert [o.token_ids for o in slow] == [o.token_ids for o in outs]
    torch.testing.assert_close(torch.tensor([o.logprobs for o in slow]), torch.tensor([o.logprobs for o in outs]),
                               atol=1e-5, rtol=0)


def test_fast_cpu_decode_never_samples_stale_weights():
    """FastDecoder keeps its regrouped weight copies between calls; any in-place update of the parameters (an
    optimizer step, a copy_ under no_grad) must rebuild them before the next generate."""
    model = tiny_model()
    before = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert [o.token_ids for o in before] == [naive_greedy(model, p, 6) for p in PROMPTS]
    built = rollout.FastDecoder._cache[model][1]
    generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert rollout.FastDecoder._cache[model][1] is built  # unchanged weights: reused
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([PROMPTS[1]])
    logp, _ = model(ids[:, :-1], targets=ids[:, 1:])
    logp.sum().backward()
    opt.step()  # changes every parameter in place
    after = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert [o.token_ids for o in after] == [naive_greedy(model, p, 6) for p in PROMPTS]
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    built = rollout.FastDecoder._cache[model][1]
    with torch.no_grad():  # one in-place write to one element of one weight is enough to rebuild
        model.layers[1].mlp.down_proj.weight[3, 5].copy_(torch.tensor(4.0))
    again = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert rollout.FastDecoder._cache[model][1] is not built
    assert [o.token_ids for o in again] == [naive_greedy(model, p, 6) for p in PROMPTS]
    # the documented limit: a write through .data bumps no version counter, FastDecoder.clear() is the remedy
    built = rollout.FastDecoder._cache[model][1]
    model.layers[0].self_attn.q_proj.weight.data.mul_(3.0)
    generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert rollout.FastDecoder._cache[model][1] is built
    rollout.FastDecoder.clear()
    outs = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert [o.token_ids for o in outs] == [naive_greedy(model, p, 6) for p in PROMPTS]


def test_greedy_logprobs_are_untempered():
    model = tiny_model()
    o = generate(model, PROMPTS[:1], max_new_tokens=5, temperature=0)[0]
    want = full_forward_logprobs(model, PROMPTS[0], o.token_ids, 1.0)
    torch.testing.assert_close(torch.tensor(o.logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# The sampling distribution


def naive_filtered_probs(logits, temperature, top_k, top_p):
    """float64 reference: softmax(logits / T), keep the top_k most likely, then the smallest most-likely prefix
    whose mass reaches top_p (a token is kept iff the mass strictly before it is < top_p), renormalise."""
    z = [float(v) / temperature for v in logits]
    m = max(z)
    p = [math.exp(v - m) for v in z]
    p = [v / sum(p) for v in p]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep, before = set(), 0.0
    kept_mass = sum(p[i] for i in order[:top_k or len(p)])
    for rank, i in enumerate(order):
        if top_k and rank >= top_k:
            break
        if before / kept_mass >= top_p:
            break
        keep.add(i)
        before += p[i]
    total = sum(p[i] for i in keep)
    return [p[i] / total if i in keep else 0.0 for i in range(len(p))]


# Hand-computed targets. Probabilities (0.1, 0.4, 0.2, 0.3) in a shuffled vocabulary order:
#   T=1, top_p=0.65: keep 0.4 (mass before 0), 0.3 (before 0.4 < 0.65); drop 0.2 (before 0.7) -> 0, 4/7, 0, 3/7
#   T=1, top_k=3: drop 0.1, renormalise by 0.9 -> 0, 4/9, 2/9, 3/9
#   T=0.5: p^2 / sum p^2 = (0.01, 0.16, 0.04, 0.09) / 0.30
#   T=0.5, top_k=3, top_p=0.8: (16, 4, 9)/29 -> masses before: 0, 16/29=.55, 25/29=.86 -> keep 16, 9 -> /25
HAND = [
    (1.0, 0, 0.65, [0, 4 / 7, 0, 3 / 7]),
    (1.0, 3, 1.0, [0, 4 / 9, 2 / 9, 3 / 9]),
    (0.5, 0, 1.0, [1 / 30, 16 / 30, 4 / 30, 9 / 30]),
    (0.5, 3, 0.8, [0, 16 / 25, 0, 9 / 25]),
]


@pytest.mark.parametrize("temperature,top_k,top_p,want", HAND)
def test_sampling_matches_intended_distribution(temperature, top_k, top_p, want):
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64).log() + 1.7  # a shift must not matter
    assert naive_filtered_probs(logits, temperature, top_k, top_p) == pytest.approx(want, abs=1e-12)
    N = 40_000
    gen = torch.Generator().manual_seed(1234)
    tok, lp = sample(logits.float().expand(N, 4), temperature, top_k, top_p, gen)
    freq = torch.bincount(tok, minlength=4).double() / N
    sigma = torch.tensor([math.sqrt(max(p * (1 - p), 1e-12) / N) for p in want])
    # within 5 standard errors of the intended probabilities (about 0.012 at p = 0.5) ...
    assert ((freq - torch.tensor(want)).abs() <= 5 * sigma).all(), (freq, want)
    # ... and never a token the filter removed
    assert all(freq[i] == 0 for i in range(4) if want[i] == 0)
    # returned log-probs are those of the renormalised distribution
    torch.testing.assert_close(lp.double(), torch.tensor(want, dtype=torch.float64).log()[tok], atol=1e-6, rtol=0)
    # the test can fail: the unfiltered, untempered distribution is more than 5 errors away from the target
    plain = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    assert ((plain - torch.tensor(want)).abs() > 10 * sigma).any()


def test_filtered_logprobs_match_naive_on_random_logits():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 11, generator=gen) * 2
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (1.3, 4, 1.0), (0.9, 5, 0.6), (1.0, 1, 1.0)]:
        tok, lp = sample(logits, temperature, top_k, top_p, gen)
        for b in range(64):
            want = naive_filtered_probs(logits[b], temperature, top_k, top_p)
            assert want[int(tok[b])] > 0
            assert float(lp[b]) == pytest.approx(math.log(want[int(tok[b])]), abs=1e-5)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_model()
    greedy = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        outs = generate(model, PROMPTS, max_new_tokens=6, temperature=1.5, seed=0, **kw)
        assert [o.token_ids for o in outs] == [o.token_ids for o in greedy]
        assert all(lp == pytest.approx(0.0, abs=1e-6) for o in outs for lp in o.logprobs)  # a point mass


# ----------------------------------------------------------------------------------------------------------------
# Stop tokens, lengths, seeds, errors


def test_stop_tokens_and_finish_reasons_when_sampling():
    model = tiny_model()
    stop = tuple(range(0, 97, 9))  # 11 of 97 tokens
    outs = generate(model, PROMPTS, n=8, max_new_tokens=15, temperature=1.0, seed=0, stop_token_ids=stop,
                    max_batch=5)
    reasons = {o.finish_reason for o in outs}
    assert reasons == {"stop", "length"}
    for o in outs:
        assert all(t not in stop for t in o.token_ids[:-1])
        assert len(o.token_ids) == len(o.logprobs) >= 1
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in stop and len(o.token_ids) <= 15
        else:
            assert o.token_ids[-1] not in stop and len(o.token_ids) == 15


def test_max_new_tokens_one_and_context_limit():
    model = tiny_model()  # max_position_embeddings = 256
    outs = generate(model, PROMPTS, n=2, max_new_tokens=1, temperature=0)
    assert all(len(o.token_ids) == 1 and o.finish_reason == "length" for o in outs)
    assert [o.token_ids for o in outs[::2]] == [naive_greedy(model, p, 1) for p in PROMPTS]
    long_prompt = [7] * 250
    o = generate(model, [long_prompt, [1]], max_new_tokens=20, temperature=0)
    assert len(o[0].token_ids) == 6 and o[0].finish_reason == "length"  # 250 + 6 = 256 = the context
    assert o[0].token_ids == naive_greedy(model, long_prompt, 20)
    assert len(o[1].token_ids) == 20


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.9, max_batch=4)
    a = generate(model, PROMPTS, seed=11, **kw)
    b = generate(model, PROMPTS, seed=11, **kw)
    c = generate(model, PROMPTS, seed=12, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # the n samples of one prompt are different draws, not copies
    assert len({tuple(o.token_ids) for o in a[:3]}) > 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[1] * 256]), r"prompts\[0\] has 256 tokens .* is 256"),
    (dict(prompts=[[1, 97]]), r"prompts\[0\] has token id 97 outside"),
    (dict(prompts=["hello"]), r"prompts\[0\] must be a list of token ids"),
    (dict(n=0), "n .* must be an int >= 1"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-1), "top_k must be"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(stop_token_ids=[500]), "stop token id 500"),
    (dict(kv_cache_bytes=100), "cannot hold one sequence"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    model = tiny_model()
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), **args)


def test_uninitialised_memory_cannot_leak_into_results(monkeypatch):
    """Simulate uninitialised memory: every float torch.empty() comes back full of NaN. The torch decode path
    reads cache positions past a row's length (with weight 0, and 0 * NaN = NaN), so they must be real zeros."""
    real_empty = torch.empty

    def nan_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    model = tiny_model()
    want = [naive_greedy(model, p, 4) for p in PROMPTS]
    monkeypatch.setattr(torch, "empty", nan_empty)
    outs = generate(model, PROMPTS, max_new_tokens=4, temperature=0, max_batch=3)
    assert [o.token_ids for o in outs] == want
    assert all(math.isfinite(lp) for o in outs for lp in o.logprobs)


FSDP_SCRIPT = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
import rollout
from model import ModelConfig, Transformer
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + sys.argv[1])
rollout.FAST_CPU_DECODE = False  # FSDP models decode through model.forward: give the plain model that path too
prompts = [[5, 6, 7], [9] * 11, [3]]
for param_dtype in (None, torch.bfloat16):
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.tiny("Qwen2ForCausalLM")).to(param_dtype or torch.float32)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny("Qwen2ForCausalLM"))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    want = rollout.generate(plain, prompts, n=2, max_new_tokens=6, temperature=0, max_batch=3)
    got = rollout.generate(model, prompts, n=2, max_new_tokens=6, temperature=0, max_batch=3)
    assert [o.token_ids for o in got] == [o.token_ids for o in want], param_dtype
    assert [o.logprobs for o in got] == [o.logprobs for o in want], param_dtype
    ids = torch.tensor([prompts[1] + got[2].token_ids])  # the same model trains right after sampling
    logp, _ = model(ids[:, :-1], targets=ids[:, 1:])
    logp.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
dist.destroy_process_group()
print("fsdp ok")
'''


def test_generate_on_an_fsdp2_model_matches_the_plain_model(tmp_path):
    """The driver samples with the FSDP2-wrapped training model (fp32, and bf16 mixed precision whose compute
    dtype differs from the parameter dtype), then trains it: same tokens as the unwrapped model, and backward
    still works (the sampler must not leave inference tensors behind)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(tmp_path / "pg")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "fsdp ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
