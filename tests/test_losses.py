"""losses.py against independent naive float64 implementations (explicit loops) and hand-computed numbers.

Every naive reference below walks sequences and tokens one at a time with Python control flow, so it shares no
vectorised code path with losses.py. Values and gradients (autograd through both) are compared.
"""

import math

import pytest
import torch

import losses
from losses import Agg

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def float64_default():
    """float64 inside this file's tests only: the global default must not leak into other test files."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------------------------
# random inputs and naive references


def make_batch(B=6, T=5, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=g)  # log-probs in (-3, 0)
    old = logp + 0.5 * torch.randn(B, T, generator=g)  # ratios on both sides of every clip range
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[1] = 0  # a fully masked row (padding)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    # padding holds garbage that must never leak into values or gradients
    logp = torch.where(mask, logp, torch.full_like(logp, -math.inf))
    return logp, old, mask, g


def rows(mask):
    return [[bool(v) for v in r] for r in mask.tolist()]


def naive_agg(L, mask, mode, n_tokens=None, n_seqs=None, norm_len=None, dp_size=1):
    """L: (B, T) tensor of per-token losses (autograd kept), aggregated with Python loops."""
    m = rows(mask)
    total, tokens, seqs = torch.zeros(()), 0, 0
    for i, row in enumerate(m):
        s, c = torch.zeros(()), 0
        for t, valid in enumerate(row):
            if valid:
                s = s + L[i, t]
                c += 1
        tokens += c
        if c:
            seqs += 1
            total = total + (s / c if mode == "seq-mean-token-mean" else s)
    if mode == "token-mean":
        denom = n_tokens if n_tokens is not None else tokens
    else:
        denom = n_seqs if n_seqs is not None else seqs
        if mode == "seq-mean-token-sum-norm":
            denom = denom * (norm_len if norm_len is not None else len(m[0]))
    return total * dp_size / denom if denom else total * 0


def naive_pg_token(lp, olp, a, eps_low, eps_high, clip_c, clip=True):
    d = lp - olp
    d = torch.clamp(d, -20.0, 20.0)
    r = torch.exp(d)
    l1 = -a * r
    if not clip:
        return l1
    rc = r
    if r < 1 - eps_low:
        rc = torch.full((), 1 - eps_low) + 0 * r
    elif r > 1 + eps_high:
        rc = torch.full((), 1 + eps_high) + 0 * r
    l2 = -a * rc
    loss = l1 if l1 >= l2 else l2
    if clip_c is not None and a < 0 and loss > -a * clip_c:
        loss = -a * clip_c + 0 * lp
    return loss


def per_token_apply(fn, B, T, mask):
    """Build a (B, T) tensor from a per-token scalar function (0 on padding), element by element."""
    out = [[fn(i, t) if rows(mask)[i][t] else torch.zeros(()) for t in range(T)] for i in range(B)]
    return torch.stack([torch.stack(r) for r in out])


def grad_of(f, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    val = f(*leaves)
    grads = torch.autograd.grad(val, leaves, allow_unused=True)
    return val.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def assert_close(a, b, **kw):
    torch.testing.assert_close(a, b, **(kw or TOL))


# ----------------------------------------------------------------------------------------------------------------
# agg_loss


@pytest.mark.parametrize("mode", losses.AGG_MODES)
@pytest.mark.parametrize("global_counts", [False, True])
def test_agg_loss_matches_naive(mode, global_counts):
    logp, _, mask, g = make_batch(seed=1)
    weights = torch.randn(logp.shape, generator=g)
    kw = dict(n_tokens=40.0, n_seqs=9.0, norm_len=16) if global_counts else {}

    def ours(lp):
        return losses.agg_loss(weights * lp, mask, mode, kw.get("n_tokens"), n_seqs=kw.get("n_seqs"),
                               norm_len=kw.get("norm_len"))

    def naive(lp):
        return naive_agg(weights * lp, mask, mode, **kw)

    v1, (g1,) = grad_of(ours, logp)
    v2, (g2,) = grad_of(naive, logp)
    assert torch.isfinite(v1) and torch.isfinite(g1).all()
    assert_close(v1, v2)
    assert_close(g1, g2)
    assert (g1[~mask] == 0).all()  # padding (-inf here) gets exactly zero gradient


def test_agg_loss_hand_values():
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert losses.agg_loss(L, m, "token-mean").item() == pytest.approx(10 / 4)
    assert losses.agg_loss(L, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert losses.agg_loss(L, m, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert losses.agg_loss(L, m, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))
    assert losses.agg_loss(L, m, "seq-mean-token-sum-norm", norm_len=8).item() == pytest.approx(10 / 16)
    assert losses.agg_loss(L, m, "token-mean", 20).item() == pytest.approx(0.5)
    assert losses.agg_loss(L, m, "token-mean", 20, dp_size=2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_agg_loss_empty_mask_is_zero_not_nan(mode):
    x = torch.full((3, 4), math.nan).requires_grad_(True)
    loss = losses.agg_loss(x, torch.zeros(3, 4, dtype=torch.bool), mode)
    loss.backward()
    assert loss.item() == 0.0
    assert (x.grad == 0).all()


def test_agg_loss_rejects_easy_mistakes():
    L, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="mask has shape"):
        losses.agg_loss(L, torch.ones(2, 4), "token-mean")
    with pytest.raises(ValueError, match="unknown mode"):
        losses.agg_loss(L, m, "token_mean")
    with pytest.raises(ValueError, match="smaller than this micro-batch"):
        losses.agg_loss(L, m, "token-mean", 5)  # 6 local tokens: a local count was passed as "global"
    with pytest.raises(ValueError, match="dp_size=2 needs the global n_tokens"):
        losses.agg_loss(L, m, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="only 0/1"):
        losses.agg_loss(L, 0.5 * m, "token-mean")
    with pytest.raises(ValueError, match="unknown mode"):
        Agg("mean")


# ----------------------------------------------------------------------------------------------------------------
# global token count: micro-batching and data parallelism never change the gradient


def tiny_policy_batch(B=8, T=6, d=3, V=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, d, generator=g)
    W = torch.randn(d, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4])  # very unequal lengths: the case where normalisers differ
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        old = torch.log_softmax(X @ (W + 0.3 * torch.randn(d, V, generator=g)), -1).gather(-1, y[..., None])[..., 0]
    return X, W, y, mask, adv, old


def rank_grads(W, X, y, mask, adv, old, agg_for, n_micro):
    """One rank: sum the micro-batch losses (gradient accumulation) and return dL/dW."""
    W = W.detach().clone().requires_grad_(True)
    for idx in torch.arange(X.shape[0]).chunk(n_micro):
        logp = torch.log_softmax(X[idx] @ W, -1).gather(-1, y[idx, :, None])[..., 0]
        loss, _ = losses.policy_loss(logp, old[idx], adv[idx], mask[idx], eps_high=0.28, agg=agg_for(mask[idx]))
        loss.backward()
    return W.grad


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_global_counts_make_micro_batching_and_ranks_invariant(mode):
    X, W, y, mask, adv, old = tiny_policy_batch()
    n_tok, n_seq = float(mask.sum()), float(mask.any(-1).sum())
    full = rank_grads(W, X, y, mask, adv, old, lambda m: Agg(mode, n_tok, n_seq, norm_len=6), 1)
    for n_micro in (1, 2, 4):
        split = rank_grads(W, X, y, mask, adv, old, lambda m: Agg(mode, n_tok, n_seq, norm_len=6), n_micro)
        assert_close(split, full)
    # the counts may arrive as all-reduced 0-d tensors
    as_tensors = rank_grads(W, X, y, mask, adv, old,
                            lambda m: Agg(mode, torch.tensor(n_tok), torch.tensor(n_seq), norm_len=6), 2)
    assert_close(as_tensors, full)
    # 2 simulated data-parallel ranks (half the batch each, 2 micro-batches each), gradients averaged like DDP
    halves = torch.arange(8).chunk(2)
    per_rank = [rank_grads(W, X[h], y[h], mask[h], adv[h], old[h],
                           lambda m: Agg(mode, n_tok, n_seq, norm_len=6, dp_size=2), 2) for h in halves]
    assert_close((per_rank[0] + per_rank[1]) / 2, full)
    # the authors' per-micro-batch normaliser (local counts, averaged over micro-batches) is NOT invariant here
    if mode != "seq-mean-token-sum-norm":
        local = rank_grads(W, X, y, mask, adv, old, lambda m: Agg(mode), 4) / 4
        assert not torch.allclose(local, full, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# SFT


def test_sft_loss_matches_naive_with_weights():
    logp, _, mask, g = make_batch(seed=2)
    w = torch.rand(6, generator=g) + 0.5

    def naive(lp):
        return naive_agg(per_token_apply(lambda i, t: -w[i] * lp[i, t], 6, 5, mask), mask, "token-mean")

    v1, (g1,) = grad_of(lambda lp: losses.sft_loss(lp, mask, weights=w)[0], logp)
    v2, (g2,) = grad_of(naive, logp)
    assert_close(v1, v2)
    assert_close(g1, g2)
    loss, metrics = losses.sft_loss(torch.log(torch.tensor([[0.5, 0.25]])), torch.ones(1, 2))
    assert loss.item() == pytest.approx(1.5 * math.log(2))  # (ln 2 + 2 ln 2) / 2
    assert metrics["n_tokens"] == 2.0


# ----------------------------------------------------------------------------------------------------------------
# GRPO advantages


def test_grpo_advantages_group_of_8_with_3_correct():
    r = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])
    # mean 3/8, unbiased std sqrt(3*5/56) = 0.5175491695067657, eps 1e-6
    a = losses.grpo_advantages(r, 8)
    expect = torch.where(r == 1, torch.tensor(1.2076123955202949), torch.tensor(-0.724567437312177))
    assert_close(a, expect)
    assert_close(losses.grpo_advantages(r, 8, norm_by_std=False), r - 0.375)


def test_grpo_advantages_match_naive_and_edge_cases():
    g = torch.Generator().manual_seed(4)
    r = torch.rand(12, generator=g)
    a = losses.grpo_advantages(r, 4)
    for k in range(3):
        grp = r[4 * k: 4 * k + 4].tolist()
        mu = sum(grp) / 4
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / 3)
        for j in range(4):
            assert a[4 * k + j].item() == pytest.approx((grp[j] - mu) / (sd + 1e-6), rel=1e-12)
    # group size 1: the reward passes through (mean 0, std 1), it is not zeroed
    assert_close(losses.grpo_advantages(torch.tensor([1.0, 0.0]), 1), torch.tensor([1 / (1 + 1e-6), 0.0]))
    assert_close(losses.grpo_advantages(torch.tensor([1.0, 0.0]), 1, norm_by_std=False), torch.tensor([1.0, 0.0]))
    # all-equal rewards: advantage exactly 0, no NaN
    assert (losses.grpo_advantages(torch.ones(8), 8) == 0).all()
    assert (losses.grpo_advantages(torch.zeros(8), 8) == 0).all()
    with pytest.raises(ValueError, match="do not split into groups"):
        losses.grpo_advantages(torch.ones(7), 8)
    with pytest.raises(ValueError, match="non-finite"):
        losses.grpo_advantages(torch.tensor([1.0, math.nan]), 2)


# ----------------------------------------------------------------------------------------------------------------
# policy loss (GRPO / DAPO)


@pytest.mark.parametrize("eps_low,eps_high,clip_c,clip,per_token,mode", [
    (0.2, 0.2, None, True, False, "token-mean"),
    (0.2, 0.28, 3.0, True, False, "token-mean"),
    (0.2, 0.28, 10.0, True, True, "seq-mean-token-mean"),
    (0.1, 0.3, None, True, True, "seq-mean-token-sum"),
    (0.2, 0.2, None, False, False, "seq-mean-token-sum-norm"),
])
def test_policy_loss_matches_naive(eps_low, eps_high, clip_c, clip, per_token, mode):
    logp, old, mask, g = make_batch(seed=10)  # a seed whose advantages have both signs
    B, T = logp.shape
    adv = torch.randn((B, T) if per_token else (B,), generator=g) * 2

    def a(i, t):
        return adv[i, t] if per_token else adv[i]

    def naive(lp):
        L = per_token_apply(lambda i, t: naive_pg_token(lp[i, t], old[i, t], a(i, t), eps_low, eps_high, clip_c,
                                                        clip), B, T, mask)
        return naive_agg(L, mask, mode)

    def ours(lp):
        return losses.policy_loss(lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, clip_c=clip_c,
                                  clip=clip, agg=Agg(mode))[0]

    v1, (g1,) = grad_of(ours, logp)
    v2, (g2,) = grad_of(naive, logp)
    assert_close(v1, v2)
    assert_close(g1, g2)
    _, met = losses.policy_loss(logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, clip_c=clip_c, clip=clip)
    # clip fractions against a naive count
    n = int(mask.sum())
    hi = lo = 0
    for i, row in enumerate(rows(mask)):
        for t, valid in enumerate(row):
            if valid and clip:
                r = math.exp(old[i, t].item() * -1 + logp[i, t].item())
                hi += bool(a(i, t) > 0) and r > 1 + eps_high
                lo += bool(a(i, t) < 0) and r < 1 - eps_low
    assert met["clipfrac_high"] == pytest.approx(hi / n)
    assert met["clipfrac_low"] == pytest.approx(lo / n)
    assert met["clipfrac"] == pytest.approx((hi + lo) / n)
    if clip:
        assert hi > 0 and lo > 0  # the random batch really exercises both sides


def test_policy_loss_hand_clip_cases():
    """One token per row; eps 0.2 / 0.28 (DAPO_dc), dual clip c = 10. Loss and d loss / d logp per token."""
    old = torch.zeros(5, 1)
    ratio = torch.tensor([math.exp(0.5), 0.5, 1.25, 20.0, 5.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    logp = torch.log(ratio)[:, None].requires_grad_(True)
    mask = torch.ones(5, 1, dtype=torch.bool)
    loss, met = losses.policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, clip_c=10.0,
                                   agg=Agg("seq-mean-token-sum-norm", n_seqs=1, norm_len=1))  # a plain sum
    token_losses = [-1.28,  # A>0, r=1.6487 > 1.28: clipped high, loss -A(1+eps_high), no gradient
                    0.8,  # A<0, r=0.5 < 0.8: clipped low, loss -A(1-eps_low) = 0.8, no gradient
                    -1.25,  # A>0, r=1.25: inside DAPO_dc's 1.28 (DAPO_d's 1.2 would clip it); grad -A r
                    10.0,  # A<0, r=20: the PPO max gives 20, the dual clip caps it at c|A| = 10, no gradient
                    5.0]  # A<0, r=5 < c: dual clip does not bind, loss -A r = 5, grad -A r = 5
    assert loss.item() == pytest.approx(sum(token_losses))
    loss.backward()
    assert_close(logp.grad[:, 0], torch.tensor([0.0, 0.0, -1.25, 0.0, 5.0]))
    assert met["clipfrac_high"] == pytest.approx(1 / 5)
    assert met["clipfrac_low"] == pytest.approx(1 / 5)
    assert met["dual_clipfrac"] == pytest.approx(1 / 5)
    # symmetric 0.2 clips the r = 1.25 token as well
    _, met_d = losses.policy_loss(logp, old, adv, mask)
    assert met_d["clipfrac_high"] == pytest.approx(2 / 5)


def test_policy_loss_rejects_easy_mistakes():
    logp, old, mask, _ = make_batch(seed=6)
    adv = torch.ones(6)
    with pytest.raises(ValueError, match="advantages is not finite"):
        losses.policy_loss(logp, old, torch.tensor([1.0, 1, math.nan, 1, 1, 1]), mask)
    with pytest.raises(ValueError, match="old_logp has shape"):
        losses.policy_loss(logp, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match="advantages must be"):
        losses.policy_loss(logp, old, torch.ones(5), mask)
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        losses.policy_loss(logp, old, adv, mask, clip_c=1.0)
    with pytest.raises(ValueError, match="logp is not finite"):
        losses.policy_loss(torch.where(mask, logp, 0.0).fill_(math.nan), old, adv, mask)
    # non-finite advantages on padding are fine: only valid tokens are checked
    adv_tok = torch.where(mask, 1.0, math.nan)
    loss, _ = losses.policy_loss(logp, old, adv_tok, mask)
    assert torch.isfinite(loss)


def test_old_logp_is_a_constant():
    logp, old, mask, g = make_batch(seed=10)
    _, (g_new, g_old) = grad_of(lambda lp, o: losses.policy_loss(lp, o, torch.ones(6), mask)[0], logp, old)
    assert (g_old == 0).all() and g_new.abs().sum() > 0
    ref = torch.randn(6, 5, generator=g)
    _, (_, g_ref) = grad_of(lambda lp, r: losses.kl_loss(lp, r, mask)[0], logp, ref)
    assert (g_ref == 0).all()


def test_fully_masked_and_single_token_rows():
    logp = torch.tensor([[-0.5], [-1.0], [-2.0]]).requires_grad_(True)  # T = 1
    mask = torch.tensor([[True], [False], [True]])
    loss, met = losses.policy_loss(logp, logp.detach(), torch.tensor([1.0, 5.0, -1.0]), mask)
    loss.backward()
    assert loss.item() == pytest.approx(0.0)  # (-1 * 1 + 1 * 1) / 2
    assert_close(logp.grad, torch.tensor([[-0.5], [0.0], [0.5]]))
    assert met["ratio_mean"] == 1.0 and met["clipfrac"] == 0.0
    empty = torch.zeros(2, 3, dtype=torch.bool)
    x = torch.zeros(2, 3, requires_grad=True)
    loss, met = losses.policy_loss(x, x.detach(), torch.ones(2), empty)
    loss.backward()
    assert loss.item() == 0.0 and met["clipfrac"] == 0.0 and (x.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# DAPO_dc: one mini-batch is exactly on-policy, several mini-batches let the asymmetric clip bind


def test_dapo_dc_clip_inactive_with_one_mini_batch_and_binding_with_several():
    g = torch.Generator().manual_seed(7)
    V, T, groups, n = 4, 3, 4, 8
    theta0 = torch.zeros(V)
    tokens = torch.multinomial(torch.full((V,), 1 / V), groups * n * T, replacement=True, generator=g)
    tokens = tokens.view(groups * n, T)
    rewards = (tokens == 0).any(-1).double()  # "correct" iff token 0 appears
    adv = losses.grpo_advantages(rewards, n)
    mask = torch.ones(groups * n, T, dtype=torch.bool)

    def logp_of(theta, idx):
        return torch.log_softmax(theta, -1)[tokens[idx]]  # (b, T): a context-free policy over V tokens

    old = logp_of(theta0, slice(None)).detach()
    dc = dict(eps_low=0.2, eps_high=0.28)

    # one mini-batch per step (the paper's 64/64 setting): ratio == 1 exactly, nothing clips, and the gradient is
    # the plain policy gradient -mean_t A * grad logp (because grad r = r grad logp = grad logp at r = 1)
    theta = theta0.clone().requires_grad_(True)
    loss, met = losses.policy_loss(logp_of(theta, slice(None)), old, adv, mask, **dc)
    (grad,) = torch.autograd.grad(loss, theta)
    assert met["ratio_mean"] == 1.0 and met["clipfrac"] == 0.0 and met["approx_kl"] == 0.0
    theta_b = theta0.clone().requires_grad_(True)
    (grad_pg,) = torch.autograd.grad(-(adv[:, None] * logp_of(theta_b, slice(None))).mean(), theta_b)
    assert_close(grad, grad_pg)

    # four mini-batches with an SGD step between them: later mini-batches are off-policy and the clip binds
    theta = theta0.clone().requires_grad_(True)
    seen = []
    for k, idx in enumerate(torch.arange(groups * n).chunk(4)):
        lp = logp_of(theta, idx)
        loss, met = losses.policy_loss(lp, old[idx], adv[idx], mask[idx], **dc)
        (gr,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= 0.5 * gr  # lr chosen so that ratios land on both sides of 1.28
        r = torch.exp(lp.detach() - old[idx])
        a = adv[idx][:, None].expand_as(r)
        seen.append((met, r, a))
        if k == 0:
            assert met["ratio_mean"] == 1.0 and met["clipfrac"] == 0.0
    clipped_high = sum(((a > 0) & (r > 1.28)).sum().item() for _, r, a in seen)
    between = sum(((a > 0) & (r > 1.2) & (r <= 1.28)).sum().item() for _, r, a in seen)
    assert clipped_high > 0  # the upper clip binds ...
    assert between > 0  # ... at 1.28, not at 1.2: these tokens would be clipped by DAPO_d's symmetric 0.2
    assert sum(m["clipfrac"] for m, _, _ in seen[1:]) > 0
    for met, r, a in seen:
        assert met["clipfrac_high"] == pytest.approx((((a > 0) & (r > 1.28)).sum() / r.numel()).item())


# ----------------------------------------------------------------------------------------------------------------
# KL and entropy


def test_kl_penalty_hand_values_and_clamps():
    logp = torch.tensor([0.0, math.log(2.0), 0.0, 0.0])
    ref = torch.tensor([math.log(2.0), 0.0, 30.0, -30.0])
    # k3 = exp(x) - x - 1 with x = ref - logp; ratio pi_ref/pi = 2: 2 - ln 2 - 1 = 0.3068528194400546
    k3 = losses.kl_penalty(logp, ref, "k3")
    assert k3[0].item() == pytest.approx(0.3068528194400546, rel=1e-12)
    assert k3[1].item() == pytest.approx(0.5 + math.log(2.0) - 1, rel=1e-12)  # ratio 1/2
    assert k3[2].item() == 10.0  # exp(20) - 21 clamped to 10
    assert k3[3].item() == 10.0  # x clamped to -20: exp(-20) + 19, then capped at 10
    assert_close(losses.kl_penalty(logp, ref, "k1"), logp - ref)
    assert_close(losses.kl_penalty(logp, ref, "abs"), (logp - ref).abs())
    assert_close(losses.kl_penalty(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    with pytest.raises(ValueError, match="unknown kind"):
        losses.kl_penalty(logp, ref, "full")


def test_kl_loss_matches_naive():
    logp, old, mask, _ = make_batch(seed=8)

    def k3(lp, rf):
        x = torch.clamp(rf - lp, -20.0, 20.0)
        return torch.clamp(torch.exp(x) - x - 1, -10.0, 10.0)

    def naive(lp):
        return 0.5 * naive_agg(per_token_apply(lambda i, t: k3(lp[i, t], old[i, t]), 6, 5, mask), mask, "token-mean")

    v1, (g1,) = grad_of(lambda lp: losses.kl_loss(lp, old, mask, kind="k3", coef=0.5)[0], logp)
    v2, (g2,) = grad_of(naive, logp)
    assert_close(v1, v2)
    assert_close(g1, g2)


def test_entropy_helpers():
    logp, _, mask, g = make_batch(seed=9)
    ent = torch.rand(6, 5, generator=g) * 2
    h = losses.seq_entropy(ent, mask)
    for i, row in enumerate(rows(mask)):
        vals = [ent[i, t].item() for t, v in enumerate(row) if v]
        assert h[i].item() == pytest.approx(sum(vals) / len(vals) if vals else 0.0)
    v1, (g1,) = grad_of(lambda e: losses.entropy_bonus(e, mask, coef=0.01)[0], ent)
    v2, (g2,) = grad_of(lambda e: -0.01 * naive_agg(e, mask, "token-mean"), ent)
    assert_close(v1, v2)
    assert_close(g1, g2)


# ----------------------------------------------------------------------------------------------------------------
# DAPO dynamic sampling


def test_dapo_keep_groups_and_accumulation():
    r = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0.5, 0.5, 0.5, 0.25])
    assert losses.dapo_keep_groups(r, 4).tolist() == [False, False, True, True]
    assert losses.dapo_keep_groups(torch.tensor([1.0, 0.0]), 1).tolist() == [True, True]

    s = losses.DynamicSampler(target_groups=3, group_size=2, max_rounds=3)
    assert s.add_round(torch.tensor([1.0, 1, 0, 1, 0, 0])).tolist() == [1]  # kept: group 1
    assert not s.done
    # 3 informative groups in this round, but only 2 fit: the surplus is dropped (the authors' behaviour)
    assert s.add_round(torch.tensor([0.0, 1, 1, 0, 0, 0, 1, 0])).tolist() == [0, 1]
    assert s.done and s.metrics()["kept_groups"] == 3 and s.metrics()["exhausted"] == 0.0
    with pytest.raises(RuntimeError, match="already complete"):
        s.add_round(torch.zeros(4))


def test_dynamic_sampler_out_of_rounds_proceed_or_raise():
    hard = torch.zeros(8)  # every group all-wrong
    s = losses.DynamicSampler(target_groups=2, group_size=4, max_rounds=2)
    assert s.add_round(torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0])).tolist() == [0]
    assert s.add_round(hard).numel() == 0
    assert s.done and s.metrics()["exhausted"] == 1.0 and s.metrics()["kept_groups"] == 1.0
    s = losses.DynamicSampler(target_groups=2, group_size=4, max_rounds=2, on_exhausted="raise")
    s.add_round(hard)
    with pytest.raises(ValueError, match="only 0/2 informative groups after max_rounds=2"):
        s.add_round(hard)
    s = losses.DynamicSampler(target_groups=1, group_size=4, max_rounds=0)  # unlimited
    for _ in range(20):
        s.add_round(hard)
    assert not s.done


# ----------------------------------------------------------------------------------------------------------------
# LUFFY


def naive_luffy(lp, old, adv, mask, off_rows, gamma, mode, **kw):
    def tok(i, t):
        if off_rows[i]:
            p = torch.exp(lp[i, t])
            return -adv[i] * p / (p + gamma)
        return -adv[i] * torch.exp(torch.clamp(lp[i, t] - old[i, t], -20.0, 20.0))

    B, T = mask.shape
    return naive_agg(per_token_apply(tok, B, T, mask), mask, mode, **kw)


@pytest.mark.parametrize("agg_kw", [dict(mode="token-mean"), dict(mode="seq-mean-token-sum-norm", norm_len=8192,
                                                                   n_seqs=1)])
def test_luffy_matches_naive(agg_kw):
    logp, old, mask, g = make_batch(B=8, T=4, seed=10, empty_row=False)
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 0, 1, 0])  # row 0 is the expert demo (correct)
    adv = losses.grpo_advantages(rewards, 8, norm_by_std=False)  # mixed group, no std (Eq. 5)
    off = torch.zeros(8, dtype=torch.bool)
    off[0] = True
    old = torch.where(off[:, None], math.nan, old)  # the demo has no behaviour log-prob: must be ignored
    kw = {k: v for k, v in agg_kw.items() if k != "mode"}
    v1, (g1,) = grad_of(lambda lp: losses.luffy_loss(lp, old, adv, mask, off, agg=Agg(agg_kw["mode"], **kw))[0],
                        logp)
    v2, (g2,) = grad_of(lambda lp: naive_luffy(lp, old, adv, mask, off.tolist(), 0.1, agg_kw["mode"], **kw), logp)
    assert_close(v1, v2)
    assert_close(g1, g2)


def test_luffy_shaping_gradient_at_half():
    """f(p) = p / (p + 0.1): df/dp = gamma / (p + gamma)^2 = 0.1 / 0.36 = 0.2777..., f(0.5) = 0.8333..."""
    p = torch.tensor([[0.5]], requires_grad=True)
    loss, met = losses.luffy_loss(torch.log(p), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1),
                                  torch.tensor([True]))
    loss.backward()
    assert loss.item() == pytest.approx(-0.8333333333333334)
    assert p.grad.item() == pytest.approx(-0.2777777777777778)  # loss = -A f(p), A = 1
    assert met["off_prob_mean"] == pytest.approx(0.5)


def test_luffy_without_expert_is_unclipped_policy_gradient():
    logp, old, mask, g = make_batch(seed=11)
    adv = torch.randn(6, generator=g)
    none = torch.zeros(6, dtype=torch.bool)
    a, met = losses.luffy_loss(logp, old, adv, mask, none)
    b, _ = losses.policy_loss(logp, old, adv, mask, clip=False)
    assert_close(a, b)
    assert met["off_tokens"] == 0.0
    with pytest.raises(ValueError, match="off_policy must be a bool"):
        losses.luffy_loss(logp, old, adv, mask, none.long())


# ----------------------------------------------------------------------------------------------------------------
# SRFT


def naive_srft(lp, adv, rewards, ent, mask, off_rows, gamma=0.1):
    B, T = mask.shape
    m = rows(mask)
    H = []
    for i in range(B):
        vals = [ent[i, t].item() for t in range(T) if m[i][t]]
        H.append(sum(vals) / len(vals) if vals else 0.0)
    sft_mask = torch.tensor([[m[i][t] and off_rows[i] for t in range(T)] for i in range(B)])
    sft = naive_agg(per_token_apply(lambda i, t: -0.5 * math.exp(-H[i]) * lp[i, t], B, T, sft_mask),
                    sft_mask, "token-mean")

    def tok(i, t):
        if off_rows[i]:
            p = torch.exp(lp[i, t])
            return -adv[i] * p / (p + gamma)
        if rewards[i] == 1:
            return -0.1 * math.exp(H[i]) * lp[i, t]
        return lp[i, t]

    return sft + naive_agg(per_token_apply(tok, B, T, mask), mask, "token-mean")


def test_srft_matches_naive():
    logp, _, mask, g = make_batch(B=8, T=4, seed=12, empty_row=False)
    rewards = torch.tensor([1.0, 1, 0, 0, 1, 0, 0, 0])
    adv = losses.grpo_advantages(rewards, 8, norm_by_std=False)
    off = torch.tensor([True] + [False] * 7)
    ent = torch.rand(8, 4, generator=g) * 3
    ours = lambda lp: losses.srft_loss(lp, adv, mask, off, rewards, ent)[0]  # noqa: E731
    v1, (g1,) = grad_of(ours, logp)
    v2, (g2,) = grad_of(lambda lp: naive_srft(lp, adv, rewards, ent, mask, off.tolist()), logp)
    assert_close(v1, v2)
    assert_close(g1, g2)
    # entropy is a detached weight: no gradient flows into it
    _, (_, ge) = grad_of(lambda lp, e: losses.srft_loss(lp, adv, mask, off, rewards, e)[0], logp, ent)
    assert (ge == 0).all()


def test_srft_hand_weights_and_empty_expert():
    # one demo token (H = 0 -> w1 = 0.5), one correct rollout token (H = ln 2 -> w2 = 0.2), one wrong one
    logp = torch.log(torch.tensor([[0.5], [0.25], [0.125]])).requires_grad_(True)
    ent = torch.tensor([[0.0], [math.log(2.0)], [1.0]])
    loss, met = losses.srft_loss(logp, torch.tensor([1.0, 0.0, 0.0]), torch.ones(3, 1),
                                 torch.tensor([True, False, False]), torch.tensor([1.0, 1.0, 0.0]), ent)
    sft = -0.5 * math.log(0.5)
    rl = (-(0.5 / 0.6) - 0.2 * math.log(0.25) + math.log(0.125)) / 3
    assert loss.item() == pytest.approx(sft + rl)
    assert met["w_sft_mean"] == pytest.approx(0.5) and met["w_pos_mean"] == pytest.approx(0.2)
    # no demo rows in this micro-batch: the SFT term is 0, not NaN (the authors detect the NaN and drop it)
    loss, met = losses.srft_loss(logp, torch.zeros(3), torch.ones(3, 1), torch.zeros(3, dtype=torch.bool),
                                 torch.tensor([1.0, 1.0, 0.0]), ent)
    assert met["sft_loss"] == 0.0 and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------------
# UPT


def test_upt_gate_success_counts_0_1_8():
    r = torch.cat([torch.zeros(8), torch.tensor([1.0] + [0.0] * 7), torch.ones(8)])
    sft, keep, met = losses.upt_gate(r, 8)  # gamma = 0
    assert sft.tolist() == [True, False, False]
    assert keep.tolist() == [False] * 8 + [True] * 16
    assert met["sft_prompts"] == 1.0 and met["rl_prompts"] == 2.0
    sft, keep, _ = losses.upt_gate(r, 8, gamma=1)
    assert sft.tolist() == [True, True, False]
    assert keep.tolist() == [False] * 16 + [True] * 8
    # a fuzzy 0.9 reward is not a success
    assert losses.upt_gate(torch.tensor([0.9, 0.0]), 2)[0].tolist() == [True]


@pytest.mark.parametrize("clip", [True, False])
def test_upt_loss_matches_naive(clip):
    logp, old, mask, g = make_batch(B=9, T=4, seed=13, empty_row=False)
    sft_rows = torch.tensor([True] + [False] * 8)  # one gated prompt's demo + one RL prompt's 8 rollouts
    adv = torch.cat([torch.tensor([math.nan]), losses.grpo_advantages(torch.rand(8, generator=g), 8)])
    rl_mask = mask & ~sft_rows[:, None]
    sft_mask = mask & sft_rows[:, None]

    def naive(lp):
        sft = naive_agg(per_token_apply(lambda i, t: -lp[i, t], 9, 4, sft_mask), sft_mask, "token-mean")
        rl = naive_agg(per_token_apply(lambda i, t: naive_pg_token(lp[i, t], old[i, t], adv[i], 0.2, 0.2, None,
                                                                   clip), 9, 4, rl_mask), rl_mask, "token-mean")
        return 2.0 * sft + rl

    v1, (g1,) = grad_of(lambda lp: losses.upt_loss(lp, old, adv, mask, sft_rows, sft_coef=2.0, clip=clip)[0], logp)
    v2, (g2,) = grad_of(naive, logp)
    assert_close(v1, v2)
    assert_close(g1, g2)
    # no gated prompt in the batch: pure GRPO, the SFT part is exactly 0
    none = torch.zeros(9, dtype=torch.bool)
    loss, met = losses.upt_loss(logp, old, torch.nan_to_num(adv), mask, none)
    ref, _ = losses.policy_loss(logp, old, torch.nan_to_num(adv), mask)
    assert met["sft_loss"] == 0.0
    assert_close(loss, ref)


# ----------------------------------------------------------------------------------------------------------------
# every other bad-input path names the function and the argument


def test_bad_inputs_give_clear_errors():
    lp, m, one = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2)
    cases = [
        (lambda: losses.agg_loss(torch.zeros(6), torch.ones(6), "token-mean"), "agg_loss: token_loss must be"),
        (lambda: losses.agg_loss(lp, m, "token-mean", dp_size=0), "dp_size must be >= 1"),
        (lambda: losses.agg_loss(lp, m, "seq-mean-token-sum-norm", norm_len=0), "norm_len must be positive"),
        (lambda: losses.grpo_advantages(torch.ones(2, 4), 4), "grpo_advantages: rewards must be"),
        (lambda: losses.policy_loss(lp, lp, one, m, eps_low=1.0), "policy_loss: need 0 <= eps_low < 1"),
        (lambda: losses.kl_penalty(lp, torch.zeros(2, 4)), "kl_penalty: ref_logp has shape"),
        (lambda: losses.DynamicSampler(2, 8, on_exhausted="skip"), "on_exhausted must be"),
        (lambda: losses.DynamicSampler(0, 8), "need target_groups >= 1"),
        (lambda: losses.luffy_loss(lp, lp, one, m, one.bool(), gamma=0.0), "luffy_loss: gamma must be > 0"),
        (lambda: losses.srft_loss(lp, one, m, one.bool(), torch.ones(3), lp), "srft_loss: rewards must be"),
        (lambda: losses.srft_loss(lp, one, m, one.bool(), one, torch.zeros(2, 4)), "srft_loss: entropy has shape"),
        (lambda: losses.upt_gate(torch.ones(8), 8, gamma=-1), "upt_gate: gamma must be >= 0"),
        (lambda: losses.upt_loss(lp, lp, one, m, one), "upt_loss: sft_rows must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
