"""Every training objective of the paper, as pure functions of tensors.

This file is the one place where SFT, GRPO, DAPO_d / DAPO_dc, LUFFY, SRFT and UPT are written down. Nothing here
touches a model, a tokenizer or the disk: inputs are per-token log-probabilities `logp` (B, T) of the response
tokens under the policy being trained, a response `mask` (B, T), and per-sequence rewards / advantages. Every loss
returns `(loss, metrics)`: a scalar that you call `.backward()` on and a small dict of floats to log.

Objective -> paper -> authors' code -> ours (see ../shared/reference/algorithms.md for every detail):

| objective     | paper (arXiv v1)             | authors' code                             | ours: default / option    |
|---------------|------------------------------|-------------------------------------------|---------------------------|
| SFT           | Eq. 1, NLL of expert tokens  | token mean per micro-batch                | global token mean / Agg   |
| GRPO adv.     | Eq. 2, (R - mean) / std      | unbiased std + 1e-6; group of 1 R/(1+eps) | same / norm_by_std=False  |
| GRPO, DAPO pg | Eq. 3, clip eps, 1/sum len   | PPO loss, "token-mean" per micro-batch    | global token mean         |
| DAPO_d        | Sec. 3.2, App. B.2.1         | keep 1..7 correct; raise after 10 rounds  | proceed / raise           |
| DAPO_dc       | App. B.2.2, eps_high 0.28    | + dual clip c = 10 in the launchers       | eps_high=0.28 / clip_c=10 |
| KL            | beta D_KL (estimator unnamed)| k1, k2, k3 (clamped), abs; RETU: off      | same, kind="k3"           |
| entropy bonus | -                            | -coef agg(H); 0.001 in LUFFY/SRFT/UPT     | same                      |
| LUFFY         | Eq. 4-5: 1/Z, r/(r+gamma)    | pi_phi = 1, no clip, sum / 8192           | 1/Z / constant length     |
| SRFT          | Eq. 7, weights typeset 5, 1  | 0.5 exp(-H_i), 0.1 exp(H_i), per sequence | the code's (alg. Sec. 6)  |
| UPT           | Eq. 8-9, p <= gamma, GRPO    | k <= gamma (0), unclipped, sum / 8192     | clipped / clip=False      |

Loss normalisation (the bug class behind verl PR#906, trl#3021, ms-swift#10117). The paper applies a token-level
mean across all runs (App. B.2; Eq. 3's 1/sum|tau_i|; LUFFY's 1/Z). The authors' verl "token-mean" is a mean over
one *micro-batch*, so their objective changes with the micro-batch size (with micro-batch 1 it is a per-sequence
mean). Here every loss takes an `Agg`, which can carry the GLOBAL number of valid tokens (or sequences) of the whole
optimiser mini-batch, summed over micro-batches and all-reduced over data-parallel ranks. Then
    sum over micro-batches of loss(micro-batch)            == loss(whole mini-batch)            (gradient accumulation)
    mean over ranks of grad(loss_rank) with dp_size = R     == grad(loss(whole mini-batch))      (DDP averages grads)
exactly, whatever the split. Without global counts (`Agg()`), the normaliser is the local one, as in the authors'
code. One optimiser step on R data-parallel ranks:
    n_tok = all_reduce_sum(sum(mb.mask.sum() for mb in micro_batches))   # valid tokens of the whole mini-batch
    agg = Agg("token-mean", n_tokens=n_tok, dp_size=R)
    for mb in micro_batches:
        loss, metrics = policy_loss(logp(mb), mb.old_logp, mb.adv, mb.mask, eps_high=0.28, agg=agg)
        loss.backward()                                                  # accumulates the mini-batch gradient
Masked positions may hold anything (padding garbage, -inf): they are replaced by 0 before any arithmetic, so
they never produce NaN values or gradients.

Deviations from the authors' code, all documented where they happen:
- seq-mean modes skip rows without valid tokens (verl gives NaN for them); a mask with no tokens gives loss 0.
- "seq-mean-token-sum-norm" divides by n_seqs * norm_len (Dr.GRPO's 1/(G * L_max)); verl divides by the padded
  width only and relies on its micro-batch scaling (see `agg_loss`).
- DAPO dynamic sampling proceeds with a short batch when the rounds run out (logged); on_exhausted="raise" is theirs.
- UPT's RL rows use the paper's clipped GRPO loss by default; clip=False is the authors' script.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "abs")
LOG_RATIO_CLAMP = 20.0  # |log r| is clamped before exp, as in verl, so one wild token cannot overflow the ratio
K3_CLAMP = 10.0  # verl clamps the k3 estimate to [-10, 10]


# ----------------------------------------------------------------------------------------------------------------
# input checks: the mistakes that are easy to make and silent otherwise


def _fail(fn: str, msg: str) -> NoReturn:
    raise ValueError(f"losses.{fn}: {msg}")


def _check_mask(fn: str, mask: Tensor, like: Tensor, name: str = "logp") -> Tensor:
    """Return `mask` as bool (B, T) after checking it matches `like` and holds only 0/1."""
    if like.dim() != 2:
        _fail(fn, f"{name} must be (B, T), got shape {tuple(like.shape)}")
    if mask.shape != like.shape:
        _fail(fn, f"mask has shape {tuple(mask.shape)} but {name} has {tuple(like.shape)}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            _fail(fn, "mask must hold only 0/1 (or be bool)")
        mask = mask.bool()
    return mask


def _check_same(fn: str, name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape:
        _fail(fn, f"{name} has shape {tuple(x.shape)} but logp has {tuple(like.shape)}")


def _check_finite(fn: str, name: str, x: Tensor, mask: Tensor) -> None:
    """Only valid positions must be finite; padding may hold anything."""
    bad = ~torch.isfinite(x) & mask
    if bad.any():
        i, t = bad.nonzero()[0].tolist()
        _fail(fn, f"{name} is not finite at {int(bad.sum())} valid token(s), first at row {i}, token {t}")


def _per_token(fn: str, name: str, x: Tensor, mask: Tensor) -> Tensor:
    """Broadcast a per-sequence (B,) or per-token (B, T) tensor to (B, T), with a clear error otherwise."""
    if x.dim() == 1 and x.shape[0] == mask.shape[0]:
        x = x[:, None].expand_as(mask)
    elif x.shape != mask.shape:
        _fail(fn, f"{name} must be (B,) or (B, T) = {tuple(mask.shape)}, got {tuple(x.shape)}")
    return x


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x with masked positions set to 0. torch.where, not x * mask: 0 * inf is NaN, and so is its gradient."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean(x: Tensor, mask: Tensor) -> float:
    """Masked mean for *logging* (local, detached); 0.0 when there are no valid tokens."""
    n = int(mask.sum())
    return float(_masked(x.detach(), mask).sum()) / n if n else 0.0


def _groups(fn: str, rewards: Tensor, group_size: int) -> Tensor:
    """Rewards laid out group after group (B,) -> (n_groups, group_size), checked."""
    if rewards.dim() != 1:
        _fail(fn, f"rewards must be (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        _fail(fn, f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    if not torch.isfinite(rewards).all():
        _fail(fn, "rewards contain non-finite values")
    return rewards.view(-1, group_size)


# ----------------------------------------------------------------------------------------------------------------
# aggregation: per-token losses -> one scalar


def agg_loss(
    token_loss: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    n_tokens: float | Tensor | None = None,
    *,
    n_seqs: float | Tensor | None = None,
    norm_len: int | None = None,
    dp_size: int = 1,
) -> Tensor:
    """Reduce a (B, T) per-token loss over the valid tokens of `mask` to a scalar.

    token-mean:              sum_{i,t} L m / N,  N = n_tokens (global) or the local number of valid tokens.
    seq-mean-token-mean:     sum_i (sum_t L m / sum_t m) / S
    seq-mean-token-sum:      sum_i  sum_t L m / S
    seq-mean-token-sum-norm: sum_i  sum_t L m / (S * norm_len)   (Dr.GRPO: a constant divisor, no length bias)
    S = n_seqs (global) or the local number of rows with at least one valid token; norm_len defaults to the padded
    width T (verl), which changes with padding, so pass the maximum response length for a true constant.
    In the -norm mode S * norm_len is just a constant divisor, so n_seqs is not checked against the rows here.

    Global counts: N and S count the whole optimiser mini-batch (all micro-batches, all ranks). The loss of each
    micro-batch is then one additive piece of the mini-batch loss: sum the micro-batch losses (or their gradients).
    DDP/FSDP *average* gradients over ranks, so each rank multiplies by dp_size to turn that average into a sum.
    The authors' verl instead divides each micro-batch by its own count (and by the number of micro-batches);
    Its seq-mean-token-sum-norm is sum / T per micro-batch, which equals ours with S = the number of micro-batches
    over all ranks (LUFFY/SRFT/UPT scripts: one micro-batch per GPU, 8 GPUs, T = 8192: n_seqs=8, norm_len=8192).
    """
    fn = "agg_loss"
    mask = _check_mask(fn, mask, token_loss, "token_loss")
    if mode not in AGG_MODES:
        _fail(fn, f"unknown mode {mode!r}; expected one of {AGG_MODES}")
    if dp_size < 1:
        _fail(fn, f"dp_size must be >= 1, got {dp_size}")
    total = _masked(token_loss, mask)  # (B, T)
    row_tokens = mask.sum(-1)  # (B,)
    if mode == "token-mean":
        denom, local, what = n_tokens, int(row_tokens.sum()), "n_tokens"
    else:
        denom, local, what = n_seqs, int((row_tokens > 0).sum()), "n_seqs"
    if denom is None:
        if dp_size != 1:
            _fail(fn, f"dp_size={dp_size} needs the global {what}; a local count would be wrong across ranks")
        denom = local
    denom = float(denom)
    if denom < local and mode != "seq-mean-token-sum-norm":
        _fail(fn, f"{what}={denom:g} is smaller than this micro-batch's own count {local}; pass the global count")
    if mode == "seq-mean-token-mean":
        # per-row token mean; rows without tokens contribute 0 (verl's version divides 0 by 0 here)
        total = total.sum(-1) / row_tokens.clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        width = token_loss.shape[-1] if norm_len is None else norm_len
        if width <= 0:
            _fail(fn, f"norm_len must be positive, got {width}")
        denom *= width
    # an empty mask gives 0 (the sum is exactly 0), with the graph kept so .backward() still works
    return total.sum() * (dp_size / max(denom, 1.0))


@dataclass(frozen=True)
class Agg:
    """How a loss turns per-token values into one scalar; build one per optimiser mini-batch (see `agg_loss`).

    n_tokens / n_seqs: GLOBAL counts over the mini-batch (all micro-batches and ranks) of the tokens / rows the
    loss is normalised over; None means the local count (the authors' per-micro-batch behaviour).
    """

    mode: str = "token-mean"
    n_tokens: float | Tensor | None = None
    n_seqs: float | Tensor | None = None
    norm_len: int | None = None  # constant length for seq-mean-token-sum-norm (e.g. the max response length)
    dp_size: int = 1  # data-parallel ranks whose gradients are averaged

    def __post_init__(self) -> None:
        if self.mode not in AGG_MODES:
            raise ValueError(f"losses.Agg: unknown mode {self.mode!r}; expected one of {AGG_MODES}")

    def __call__(self, token_loss: Tensor, mask: Tensor) -> Tensor:
        return agg_loss(token_loss, mask, self.mode, self.n_tokens, n_seqs=self.n_seqs,
                        norm_len=self.norm_len, dp_size=self.dp_size)


# ----------------------------------------------------------------------------------------------------------------
# SFT


def sft_loss(logp: Tensor, mask: Tensor, *, weights: Tensor | None = None, agg: Agg | None = None,
             ) -> tuple[Tensor, dict[str, float]]:
    """Eq. 1: negative log-likelihood of the expert response tokens, -w_i * logp, aggregated by `agg`.

    weights: optional per-sequence (B,) or per-token (B, T) weights, treated as constants (SRFT's 0.5 exp(-H)).
    """
    fn = "sft_loss"
    mask = _check_mask(fn, mask, logp)
    _check_finite(fn, "logp", logp, mask)
    agg = agg or Agg()
    logp = _masked(logp, mask)
    token_loss = -logp
    if weights is not None:
        token_loss = token_loss * _per_token(fn, "weights", weights.detach(), mask)
    loss = agg(token_loss, mask)
    return loss, {"sft_loss": float(loss.detach()), "nll": _mean(-logp, mask), "n_tokens": float(mask.sum())}


# ----------------------------------------------------------------------------------------------------------------
# GRPO advantages


def grpo_advantages(rewards: Tensor, group_size: int, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Eq. 2: A_i = (R_i - mean_g R) / (std_g R + eps) per group; (B,) rewards laid out group after group -> (B,).

    std is the unbiased one (torch.std, / (n-1)) as in the authors' code. A group of size 1 uses mean 0 and std 1
    (so A = R / (1 + eps), the reward is NOT zeroed; algorithms.md Sec. 1). A group whose rewards are all equal gets
    A = 0 exactly. norm_by_std=False gives A = R - mean (Dr.GRPO; LUFFY, SRFT and UPT's scripts).
    """
    g = _groups("grpo_advantages", rewards, group_size)  # (G, n)
    if group_size == 1:
        mean, std = torch.zeros_like(g), torch.ones_like(g)
    else:
        mean, std = g.mean(-1, keepdim=True), g.std(-1, keepdim=True)
    adv = (g - mean) / (std + eps) if norm_by_std else g - mean
    return adv.reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# the clipped policy-gradient loss (GRPO, DAPO_d, DAPO_dc; UPT's RL rows)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_c: float | None = None,
    clip: bool = True,
    agg: Agg | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 3 with DAPO's asymmetric clip and verl's dual clip; per-token loss max(-A r, -A clip(r, 1-el, 1+eh)).

    r = exp(clamp(logp - old_logp, -20, 20)); old_logp is a constant (detached here). advantages: (B,) or (B, T).
    clip_c: dual clip for A < 0, the loss is capped at c * |A| (verl, c > 1; DAPO launchers use 10).
    clip=False: plain importance-weighted -A r (LUFFY's on-policy term, UPT's script).
    With old_logp == logp (one mini-batch, one epoch: the authors' on-policy shortcut) r == 1 and nothing clips.
    Metrics (local to this micro-batch): clipfrac = tokens where the clip binds (high: A > 0 and r > 1 + eh, low:
    A < 0 and r < 1 - el), dual_clipfrac, ratio_mean, approx_kl = mean(old_logp - logp) (verl's ppo_kl).
    """
    fn = "policy_loss"
    mask = _check_mask(fn, mask, logp)
    _check_same(fn, "old_logp", old_logp, logp)
    adv = _per_token(fn, "advantages", advantages, mask)
    _check_finite(fn, "advantages", adv, mask)
    _check_finite(fn, "logp", logp, mask)
    _check_finite(fn, "old_logp", old_logp, mask)
    if clip and not (0 <= eps_low < 1 and eps_high >= 0):
        _fail(fn, f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if clip_c is not None and clip_c <= 1:
        _fail(fn, f"clip_c must be > 1 (the dual clip caps the loss at c*|A|), got {clip_c}")
    agg = agg or Agg()
    adv = _masked(adv.detach(), mask)
    log_ratio = (_masked(logp, mask) - _masked(old_logp.detach(), mask)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # (B, T); exactly 1 where logp == old_logp
    loss1 = -adv * ratio
    if clip:
        loss2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
        token_loss = torch.maximum(loss1, loss2)  # the pessimistic bound: clipping only ever removes gradient
        clipped = (loss2 > loss1) & mask
    else:
        token_loss, clipped = loss1, torch.zeros_like(mask)
    dual = torch.zeros_like(mask)
    if clip_c is not None:
        loss3 = -adv * clip_c
        dual = (adv < 0) & (token_loss > loss3) & mask
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, loss3), token_loss)
    loss = agg(token_loss, mask)
    n = max(int(mask.sum()), 1)
    metrics = {
        "pg_loss": float(loss.detach()),
        "clipfrac": float(clipped.sum()) / n,
        "clipfrac_high": float((clipped & (adv > 0)).sum()) / n,
        "clipfrac_low": float((clipped & (adv < 0)).sum()) / n,
        "dual_clipfrac": float(dual.sum()) / n,
        "ratio_mean": _mean(ratio, mask),
        "approx_kl": _mean(-log_ratio, mask),
        "n_tokens": float(mask.sum()),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# KL to a reference policy, entropy bonus


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token's log-probs; (B, T) -> (B, T).

    k1 = logp - ref; abs = |logp - ref|; k2 = (logp - ref)^2 / 2;
    k3 = exp(x) - x - 1 with x = clamp(ref - logp, -20, 20), then clamped to [-10, 10] (verl's low_var_kl).
    """
    if ref_logp.shape != logp.shape:
        _fail("kl_penalty", f"ref_logp has shape {tuple(ref_logp.shape)} but logp has {tuple(logp.shape)}")
    diff = logp - ref_logp.detach()
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    if kind == "k3":
        x = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(x) - x - 1).clamp(-K3_CLAMP, K3_CLAMP)
    raise ValueError(f"losses.kl_penalty: unknown kind {kind!r}; expected one of {KL_KINDS}")


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, *, kind: str = "k3", coef: float = 0.001,
            agg: Agg | None = None) -> tuple[Tensor, dict[str, float]]:
    """The KL term added to the policy loss: coef * agg(kl_penalty). (RETU's runs use none: coef 0, no ref model.)"""
    fn = "kl_loss"
    mask = _check_mask(fn, mask, logp)
    _check_finite(fn, "logp", logp, mask)
    _check_finite(fn, "ref_logp", ref_logp, mask)
    kl = kl_penalty(_masked(logp, mask), _masked(ref_logp, mask), kind)
    loss = coef * (agg or Agg())(kl, mask)
    return loss, {"kl_loss": float(loss.detach()), "kl": _mean(kl, mask)}


def seq_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence mean token entropy (B, T) -> (B,), detached; rows without valid tokens get 0.

    The token entropies come from model.py's chunked helper on the temperature-scaled logits of the training pass.
    """
    mask = _check_mask("seq_entropy", mask, entropy, "entropy")
    return _masked(entropy.detach(), mask).sum(-1) / mask.sum(-1).clamp(min=1)


def entropy_bonus(entropy: Tensor, mask: Tensor, *, coef: float = 0.001, agg: Agg | None = None,
                  ) -> tuple[Tensor, dict[str, float]]:
    """The entropy term of the loss, -coef * agg(H) (verl; LUFFY/SRFT/UPT use 0.001, RETU's DAPO runs 0)."""
    fn = "entropy_bonus"
    mask = _check_mask(fn, mask, entropy, "entropy")
    _check_finite(fn, "entropy", entropy, mask)
    h = (agg or Agg())(_masked(entropy, mask), mask)
    return -coef * h, {"entropy": _mean(entropy, mask)}


# ----------------------------------------------------------------------------------------------------------------
# DAPO dynamic sampling


def dapo_keep_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Which groups of one generation round are informative: (B,) rewards -> (n_groups,) bool.

    Keep a group iff its rewards are not all equal (std > 0): an all-correct or all-wrong group has zero advantage
    everywhere and only costs compute. For binary rewards this is exactly the fork's `win_num_range` 1..n-1; a group
    of size 1 is kept, as in upstream verl.
    """
    g = _groups("dapo_keep_groups", rewards, group_size)
    if group_size == 1:
        return torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    return (g != g[:, :1]).any(-1)


@dataclass
class DynamicSampler:
    """Fill a batch of `target_groups` informative groups across generation rounds (DAPO dynamic sampling).

    Each round: generate, score, then `take = sampler.add_round(rewards)` gives the indices of this round's groups
    to append to the batch (the kept ones, in order, cut so that the batch never exceeds the target: any surplus is
    discarded, as in the authors' code). Loop while `not sampler.done`.
    When `max_rounds` rounds (0 = unlimited) have not filled the batch, the authors' trainer raises
    (on_exhausted="raise"). Ours (the default, "proceed") trains on the short batch and reports `exhausted=1` and
    `kept_groups` in `metrics()`: one hard prompt set should not kill a run, and with global token counts a
    smaller batch is still a correct (just noisier) gradient. With zero kept groups the driver must skip the step.
    """

    target_groups: int
    group_size: int
    max_rounds: int = 10
    on_exhausted: str = "proceed"
    rounds: int = 0
    kept: int = 0
    seen: int = 0
    exhausted: bool = False

    def __post_init__(self) -> None:
        if self.on_exhausted not in ("proceed", "raise"):
            raise ValueError(f"losses.DynamicSampler: on_exhausted must be 'proceed' or 'raise', "
                             f"got {self.on_exhausted!r}")
        if self.target_groups < 1 or self.group_size < 1 or self.max_rounds < 0:
            raise ValueError("losses.DynamicSampler: need target_groups >= 1, group_size >= 1, max_rounds >= 0")

    @property
    def done(self) -> bool:
        return self.kept >= self.target_groups or self.exhausted

    def add_round(self, rewards: Tensor) -> Tensor:
        """(B,) rewards of one round -> int64 indices of the groups to add to the batch."""
        if self.done:
            raise RuntimeError("losses.DynamicSampler.add_round: the batch is already complete")
        keep = dapo_keep_groups(rewards, self.group_size)
        take = keep.nonzero().squeeze(-1)[: self.target_groups - self.kept]
        self.rounds += 1
        self.seen += keep.numel()
        self.kept += take.numel()
        if not self.done and self.max_rounds and self.rounds >= self.max_rounds:
            if self.on_exhausted == "raise":
                raise ValueError(f"losses.DynamicSampler: only {self.kept}/{self.target_groups} informative groups "
                                 f"after max_rounds={self.max_rounds} generation rounds")
            self.exhausted = True
        return take

    def metrics(self) -> dict[str, float]:
        return {"rounds": float(self.rounds), "kept_groups": float(self.kept), "seen_groups": float(self.seen),
                "keep_rate": self.kept / max(self.seen, 1), "exhausted": float(self.exhausted)}


# ----------------------------------------------------------------------------------------------------------------
# LUFFY, SRFT (mixed on/off-policy groups: 7 rollouts + 1 expert demo per prompt)


def _off_mask(fn: str, off_policy: Tensor, mask: Tensor) -> Tensor:
    """Expert tokens as a (B, T) bool: off_policy is per row (B,) or per token (B, T) (verl's prefix_mask)."""
    if off_policy.dtype != torch.bool:
        _fail(fn, f"off_policy must be a bool tensor, got {off_policy.dtype}")
    return _per_token(fn, "off_policy", off_policy, mask) & mask


def luffy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    off_policy: Tensor,
    *,
    gamma: float = 0.1,
    agg: Agg | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 4: -A f(p) on expert tokens with f(p) = p / (p + gamma), p = pi_theta(token); -A r on rollout tokens.

    advantages: from `grpo_advantages(rewards, n, norm_by_std=False)` over the MIXED group (demo included, Eq. 5).
    The demo has no behaviour log-prob (the authors take pi_phi = 1), so old_logp is ignored on expert tokens.
    No clipping anywhere. The shaping's gradient w.r.t. p is gamma / (p + gamma)^2: large for unlikely expert
    tokens, small for likely ones, which keeps the policy from collapsing onto the demo (LUFFY's argument).
    Normalisation: the paper's 1/Z over all on- and off-policy tokens is Agg("token-mean"); the authors' scripts
    divide by a constant 8192 per GPU instead: Agg("seq-mean-token-sum-norm", n_seqs=8, norm_len=8192) (`agg_loss`).
    """
    fn = "luffy_loss"
    mask = _check_mask(fn, mask, logp)
    _check_same(fn, "old_logp", old_logp, logp)
    off = _off_mask(fn, off_policy, mask)
    on = mask & ~off
    adv = _per_token(fn, "advantages", advantages, mask)
    _check_finite(fn, "advantages", adv, mask)
    _check_finite(fn, "logp", logp, mask)
    _check_finite(fn, "old_logp", old_logp, on)
    if gamma <= 0:
        _fail(fn, f"gamma must be > 0, got {gamma}")
    adv = _masked(adv.detach(), mask)
    logp = _masked(logp, mask)
    prob = torch.exp(logp)  # (B, T) pi_theta of the expert's token
    shaped = prob / (prob + gamma)
    log_ratio = (logp - _masked(old_logp.detach(), on)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    token_loss = torch.where(off, -adv * shaped, -adv * ratio)
    loss = (agg or Agg())(token_loss, mask)
    metrics = {
        "pg_loss": float(loss.detach()),
        "off_tokens": float(off.sum()),
        "on_tokens": float(on.sum()),
        "off_prob_mean": _mean(prob, off),
        "ratio_mean": _mean(ratio, on),
        "approx_kl": _mean(-log_ratio, on),
    }
    return loss, metrics


def srft_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    off_policy: Tensor,
    rewards: Tensor,
    entropy: Tensor,
    *,
    gamma: float = 0.1,
    w_sft: float = 0.5,
    w_pos: float = 0.1,
    w_neg: float = 1.0,
    agg: Agg | None = None,
    sft_agg: Agg | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 7: w1 J_SFT + J_off + w2 J_pos + J_neg with the weights of the authors' code (algorithms.md Sec. 6).

    Per sequence i, H_i = mean token entropy of row i (detached): w1_i = w_sft * exp(-H_i) on the expert rows'
    SFT term, w2_i = w_pos * exp(H_i) on correct rollouts. The paper's typeset "5" and "1" appear in no code.
      SFT (expert rows):    -w1_i logp, aggregated by `sft_agg` over expert tokens only (0 if there are none)
      off (expert tokens):  -A f(p), f(p) = p / (p + gamma), as in LUFFY
      pos (reward == 1):    -w2_i logp           (advantage ignored, no ratio, no clip: srft_type="paper")
      neg (other rollouts): +w_neg logp          (pushes the probability of wrong answers down)
    off + pos + neg are one per-token loss aggregated by `agg` over all tokens, as the authors merge them.
    rewards: (B,) per-row outcome; "correct" means exactly 1. entropy: (B, T) token entropies of this pass.
    advantages: (B,) from grpo_advantages(..., norm_by_std=False) over the mixed group; used on expert rows only.
    """
    fn = "srft_loss"
    mask = _check_mask(fn, mask, logp)
    off = _off_mask(fn, off_policy, mask)
    on = mask & ~off
    adv = _per_token(fn, "advantages", advantages, mask)
    _check_finite(fn, "advantages", adv, off)
    _check_finite(fn, "logp", logp, mask)
    if rewards.shape != mask.shape[:1]:
        _fail(fn, f"rewards must be (B,) = ({mask.shape[0]},), got {tuple(rewards.shape)}")
    if gamma <= 0:
        _fail(fn, f"gamma must be > 0, got {gamma}")
    _check_same(fn, "entropy", entropy, logp)
    _check_finite(fn, "entropy", entropy, mask)
    h = seq_entropy(entropy, mask)  # (B,) detached
    logp = _masked(logp, mask)
    adv = _masked(adv.detach(), off)
    # SFT on the expert rows, each weighted by its own entropy
    expert = off.any(-1)  # (B,)
    w1 = w_sft * torch.exp(-h)  # (B,)
    loss_sft = (sft_agg or Agg())(-w1[:, None] * logp, off)
    # the RL part: off-policy shaped term, and REINFORCE-like terms on the rollouts
    prob = torch.exp(logp)
    correct = (rewards == 1)[:, None]  # (B, 1)
    w2 = w_pos * torch.exp(h)[:, None]
    on_loss = torch.where(correct, -w2 * logp, w_neg * logp)
    token_loss = torch.where(off, -adv * prob / (prob + gamma), on_loss)
    loss_rl = (agg or Agg())(token_loss, mask)
    loss = loss_sft + loss_rl
    metrics = {
        "sft_loss": float(loss_sft.detach()),
        "pg_loss": float(loss_rl.detach()),
        "w_sft_mean": _mean(w1[:, None], expert[:, None]),
        "w_pos_mean": _mean(w2, (correct[:, 0] & on.any(-1))[:, None]),
        "entropy_seq_mean": _mean(h[:, None], mask.any(-1)[:, None]),
        "off_tokens": float(off.sum()),
        "pos_tokens": float((on & correct).sum()),
        "neg_tokens": float((on & ~correct).sum()),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# UPT: a per-prompt hard gate between SFT on the demo and RL on the rollouts


def upt_gate(rewards: Tensor, group_size: int, *, gamma: int = 0) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Eq. 9 as the authors' code implements it: prompt g trains with SFT iff its success count k_g <= gamma.

    rewards: (B,) of the n = group_size verification rollouts per prompt, group after group; success = reward == 1.
    Returns (sft_groups (G,) bool, keep_rollouts (B,) bool, metrics). An SFT prompt contributes exactly ONE row, its
    expert demo, and its n rollouts are dropped; an RL prompt keeps its n rollouts and gets no demo.
    The paper gates on the mean reward p <= gamma_p, i.e. k <= gamma_p * n: the same gate with gamma = 0 (default).
    """
    fn = "upt_gate"
    g = _groups(fn, rewards, group_size)
    if gamma < 0:
        _fail(fn, f"gamma must be >= 0, got {gamma}")
    successes = (g == 1).sum(-1)  # (G,)
    sft_groups = successes <= gamma
    keep_rollouts = (~sft_groups).repeat_interleave(group_size)
    metrics = {"sft_prompts": float(sft_groups.sum()), "rl_prompts": float((~sft_groups).sum()),
               "sft_fraction": float(sft_groups.float().mean())}
    return sft_groups, keep_rollouts, metrics


def upt_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    sft_rows: Tensor,
    *,
    sft_coef: float = 1.0,
    clip: bool = True,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    sft_agg: Agg | None = None,
    rl_agg: Agg | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 8: sft_coef * J_SFT on the demo rows (sft_rows) + J_GRPO on the rollout rows.

    sft_rows: (B,) bool, True for the expert demos of gated prompts (see `upt_gate`); the other rows are rollouts
    with GRPO `advantages` (on SFT rows they are ignored). sft_agg normalises over demo tokens, rl_agg over rollout
    tokens; give each its own global count. clip=True is the paper's GRPO (Eq. 3); the authors' script removes the
    clip (clip=False). Either part is exactly 0 when it has no rows.
    """
    fn = "upt_loss"
    mask = _check_mask(fn, mask, logp)
    if sft_rows.dtype != torch.bool or sft_rows.shape != mask.shape[:1]:
        _fail(fn, f"sft_rows must be a (B,) = ({mask.shape[0]},) bool tensor, got {sft_rows.dtype} "
                  f"{tuple(sft_rows.shape)}")
    sft_mask = mask & sft_rows[:, None]
    rl_mask = mask & ~sft_rows[:, None]
    loss_sft, _ = sft_loss(logp, sft_mask, agg=sft_agg)
    adv = _masked(_per_token(fn, "advantages", advantages, mask), rl_mask)
    loss_rl, pg = policy_loss(logp, old_logp, adv, rl_mask, eps_low=eps_low, eps_high=eps_high, clip=clip,
                              agg=rl_agg)
    loss = sft_coef * loss_sft + loss_rl
    metrics = {"sft_loss": float(loss_sft.detach()), "pg_loss": float(loss_rl.detach()),
               "sft_rows": float(sft_rows.sum()), "rl_rows": float((~sft_rows).sum()),
               "clipfrac": pg["clipfrac"], "ratio_mean": pg["ratio_mean"]}
    return loss, metrics


__all__ = [
    "AGG_MODES", "KL_KINDS", "Agg", "DynamicSampler", "agg_loss", "dapo_keep_groups", "entropy_bonus",
    "grpo_advantages", "kl_loss", "kl_penalty", "luffy_loss", "policy_loss", "seq_entropy", "sft_loss",
    "srft_loss", "upt_gate", "upt_loss",
]
