"""`retu.py rl`: one loop for GRPO, DAPO_d / DAPO_dc, LUFFY, SRFT and UPT (paper Sec. 3.2-3.3, App. B.2).

    python retu.py rl --algo dapo --model SFT_CKPT/hf --train rl.jsonl --run-dir runs/dapo            # DAPO_d
    torchrun --nproc_per_node=8 retu.py rl --algo dapo --eps-high 0.28 ...                              # DAPO_dc
    torchrun --nproc_per_node=8 retu.py rl --algo luffy --train mix.jsonl ...                           # + expert

One RL step:
  1. generation round(s): the step's prompts are split over the ranks; each rank samples `samples_per_prompt`
     completions per prompt with rollout.generate on the policy's own weights (FSDP2 unsharded for the round),
     scores them with verify.score, and every rank receives every group (all_gather). DAPO repeats rounds of
     `prompts_per_round` fresh prompts, keeping only groups whose rewards differ (losses.DynamicSampler), until
     `prompts_per_step` groups are kept; GRPO / LUFFY / SRFT / UPT run one round of `prompts_per_step` prompts.
  2. the algorithm's batch: GRPO/DAPO train the rollouts; LUFFY/SRFT sample n-1 rollouts and add the expert
     trajectory as the n-th member of the group (advantages over the mixed group, no std); UPT gates each prompt
     on its n rollouts (losses.upt_gate): no success -> its n rollouts are dropped and the demo alone is trained
     with SFT, otherwise the n rollouts are trained with GRPO.
  3. `minibatches_per_step` optimiser steps, each on a contiguous share of the groups. Whole groups are assigned
     to ranks (a group is never split), balanced by tokens. With one mini-batch the update is on-policy and the
     old log-probs are the training pass's own (detached), exactly the authors' shortcut (so the clip cannot act);
     with more, the old log-probs are recomputed by a no-grad pass before the first update, as verl does.
  Training runs on temperature-scaled logits (the sampler's temperature). Every loss is normalised by global
  counts of its mini-batch (all-reduced), so rank count and micro-batching do not change the objective.

Compute (EFLOPs, cumulative, from actual lengths; paper App. C): every generated sequence (prompt + response) at
forward cost, every trained sequence at 3x forward, and the old-log-prob recompute pass (only with more than one
mini-batch) at forward cost. Deviation: Eq. 24 also charges the expert trajectories of LUFFY/SRFT a generation
forward; they are not generated, so they are charged training cost only.

Deviation from the authors' code (the paper's choices are the defaults, theirs are options): global token-mean
aggregation (theirs: per-micro-batch token mean, or sum / 8192 for LUFFY/SRFT/UPT: --loss-agg
seq-mean-token-sum-norm); DAPO with too few informative groups after max_rounds trains on the short batch
(theirs raises: --on-exhausted raise); UPT's RL rows are clipped (theirs: --no-upt-clip).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import data as D
import losses
import model as M
import rollout
import train as T
import verify

# ----------------------------------------------------------------------------------------------------------------
# The batch of one step


@dataclass
class Row:
    """One trained sequence."""
    group: int                        # index of its group in the step's batch (groups stay on one rank)
    prompt: list[int]
    response: list[int]               # generated tokens (with the stop token if one was hit), or expert + EOS
    sampler_logp: list[float] | None  # log q of each response token under the sampler; None for expert rows
    reward: float
    expert: bool = False
    truncated: bool = False
    advantage: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


def prompt_order(cursor: int, k: int, n: int, seed: int) -> list[int]:
    """Prompt indices cursor .. cursor+k-1 of the endless stream of seeded per-epoch permutations of n prompts."""
    out, perms = [], {}
    for c in range(cursor, cursor + k):
        epoch, pos = divmod(c, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][pos]))
    return out


def response_text(tok, ids: list[int], stop_ids: set[int]) -> str:
    """The completion as the verifier sees it: decoded, the final stop token removed."""
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tok.decode(ids)


def generate_round(model, tok, prompts: list[D.RLPrompt], idx: list[int], n_gen: int, cfg, seed: int,
                   d: T.Dist, stop_ids: set[int]) -> tuple[list[list[Row]], dict]:
    """Generate n_gen completions for each prompt of `idx` (split over ranks), score them, all-gather.
    Returns the groups in the order of idx (rows without expert), and timings."""
    mine = list(range(d.rank, len(idx), d.world_size))
    t0 = time.time()
    outs = []
    if mine:
        with T.Unsharded(model):
            outs = rollout.generate(model, [prompts[idx[i]].prompt_ids for i in mine], n=n_gen,
                                    max_new_tokens=cfg.max_response_len, temperature=cfg.temperature,
                                    top_p=cfg.top_p, top_k=cfg.top_k, stop_token_ids=sorted(stop_ids),
                                    seed=seed * 1000 + d.rank)
    else:   # FSDP2: the unshard above is collective; a rank without prompts must still take part
        with T.Unsharded(model):
            pass
    t_gen = time.time() - t0
    t0 = time.time()
    local = [(mine[o.prompt_index], o.token_ids, o.logprobs, o.finish_reason,
              float(verify.score(response_text(tok, o.token_ids, stop_ids), prompts[idx[mine[o.prompt_index]]].answer)))
             for o in outs]
    t_score = time.time() - t0
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, local)
    groups: list[list[Row]] = [[] for _ in idx]
    for part in gathered:
        for j, ids, lps, finish, reward in part:
            groups[j].append(Row(-1, prompts[idx[j]].prompt_ids, list(ids), list(lps), reward,
                                 truncated=finish != "stop"))
    times = T.all_reduce_sum([t_gen, t_score], d.device)
    return groups, {"gen_time": times[0] / d.world_size, "score_time": times[1] / d.world_size}


def expert_row(tok, p: D.RLPrompt, stop_ids: set[int], group: int) -> Row:
    """The expert trajectory as a row of group `group`, scored by the verifier like any rollout."""
    reward = float(verify.score(response_text(tok, p.expert_ids, stop_ids), p.answer))
    return Row(group, p.prompt_ids, list(p.expert_ids), None, reward, expert=True)


def collect_batch(model, tok, prompts, cfg, state: dict, d: T.Dist, stop_ids: set[int],
                  ) -> tuple[list[Row], dict, list[int]]:
    """Steps 1-2 of the module docstring: the rows to train on (with advantages), the generation metrics, and the
    length (prompt + response) of every generated sequence of every round (for the FLOPs)."""
    n, algo = cfg.samples_per_prompt, cfg.algo
    n_gen = n - 1 if algo in ("luffy", "srft") else n
    norm_std = cfg.norm_adv_by_std == "true"
    sampler = (losses.DynamicSampler(cfg.prompts_per_step, n, cfg.max_rounds, cfg.on_exhausted)
               if algo == "dapo" else None)
    kept: list[tuple[int, list[Row]]] = []       # (prompt index, rows)
    gen_rows: list[Row] = []                      # every generated row of every round (for metrics and FLOPs)
    timing = {"gen_time": 0.0, "score_time": 0.0}
    rounds = 0
    while True:
        idx = prompt_order(state["prompt_cursor"], cfg.prompts_per_round, len(prompts), cfg.seed)
        state["prompt_cursor"] += len(idx)
        groups, t = generate_round(model, tok, prompts, idx, n_gen, cfg, cfg.seed * 100003 + state["step"] * 101
                                   + rounds, d, stop_ids)
        rounds += 1
        for k in timing:
            timing[k] += t[k]
        gen_rows += [r for g in groups for r in g]
        if sampler is None:
            kept = list(zip(idx, groups))
            break
        rewards = torch.tensor([r.reward for g in groups for r in g], dtype=torch.float64)
        take = sampler.add_round(rewards)
        kept += [(idx[int(i)], groups[int(i)]) for i in take]
        if sampler.done:
            break

    for gi, (_, g) in enumerate(kept):   # group ids follow the kept order
        for r in g:
            r.group = gi
    rows: list[Row] = []
    upt_metrics = {}
    if algo in ("grpo", "dapo", "luffy", "srft"):
        for gi, (pi, g) in enumerate(kept):
            if algo in ("luffy", "srft"):
                g = g + [expert_row(tok, prompts[pi], stop_ids, gi)]   # the demo joins the group (LUFFY Eq. 4-5)
            rows += g
        if rows:
            adv = losses.grpo_advantages(torch.tensor([r.reward for r in rows], dtype=torch.float64), n,
                                         norm_by_std=norm_std)
            for r, a in zip(rows, adv.tolist()):
                r.advantage = a
    else:  # upt
        rewards = torch.tensor([r.reward for _, g in kept for r in g], dtype=torch.float64)
        sft_groups, _, upt_metrics = losses.upt_gate(rewards, n, gamma=cfg.upt_gate)
        for gi, ((pi, g), sft) in enumerate(zip(kept, sft_groups.tolist())):
            if sft:
                rows.append(expert_row(tok, prompts[pi], stop_ids, gi))
            else:
                adv = losses.grpo_advantages(torch.tensor([r.reward for r in g], dtype=torch.float64), n,
                                             norm_by_std=norm_std)
                for r, a in zip(g, adv.tolist()):
                    r.advantage = a
                rows += g
    rewards = [r.reward for r in gen_rows]
    lens = [len(r.response) for r in gen_rows]
    metrics = {
        "reward_mean": float(np.mean(rewards)), "acc": float(np.mean([r == 1 for r in rewards])),
        "train_reward_mean": float(np.mean([r.reward for r in rows])) if rows else 0.0,
        "rounds": rounds, "kept_groups": len(kept), "generated_groups": rounds * cfg.prompts_per_round,
        "response_len_mean": float(np.mean(lens)), "response_len_max": max(lens), "response_len_min": min(lens),
        "truncated_frac": float(np.mean([r.truncated for r in gen_rows])),
        "trained_rows": len(rows), "expert_rows": sum(r.expert for r in rows), **timing, **upt_metrics,
    }
    if sampler is not None:
        metrics.update({f"dapo_{k}": v for k, v in sampler.metrics().items()})
    return rows, metrics, [r.length for r in gen_rows]


# ----------------------------------------------------------------------------------------------------------------
# Training on the batch


def _pack_rows(rows: list[Row]) -> tuple[D.Packed, torch.Tensor, torch.Tensor]:
    """Pack rows; also the (B, R) index of each response token's position in the packed row and its mask."""
    packed = D.pack_sequences([(r.prompt + r.response, len(r.prompt)) for r in rows])
    R = max(len(r.response) for r in rows)
    index = torch.zeros(len(rows), R, dtype=torch.long)
    mask = torch.zeros(len(rows), R)
    off = 0
    for i, r in enumerate(rows):
        # response token j is the target of input position len(prompt) - 1 + j of this document
        index[i, :len(r.response)] = off + len(r.prompt) - 1 + torch.arange(len(r.response))
        mask[i, :len(r.response)] = 1
        off += r.length - 1
    return packed, index, mask


def _padded(rows: list[Row], values, R: int) -> torch.Tensor:
    out = torch.zeros(len(rows), R)
    for i, v in enumerate(values):
        if v is not None:
            out[i, :len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def minibatch_loss(algo: str, cfg, logp, old_logp, ent, mask, rows: list[Row], counts: dict, ref_logp=None):
    """The algorithm's loss on one micro-batch of rows: (B, R) per-token tensors -> (loss, metrics)."""
    dev = logp.device
    adv = torch.tensor([r.advantage for r in rows], device=dev)
    rewards = torch.tensor([r.reward for r in rows], device=dev)
    expert = torch.tensor([r.expert for r in rows], device=dev)
    if cfg.loss_agg == "token-mean":
        agg = losses.Agg("token-mean", n_tokens=counts["tokens"])
    else:
        agg = losses.Agg("seq-mean-token-sum-norm", n_seqs=counts["seqs"], norm_len=cfg.max_response_len)
    if algo in ("grpo", "dapo"):
        loss, m = losses.policy_loss(logp, old_logp, adv, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                     clip_c=cfg.clip_c or None, agg=agg)
    elif algo == "luffy":
        loss, m = losses.luffy_loss(logp, old_logp, adv, mask, expert, gamma=cfg.luffy_gamma, agg=agg)
    elif algo == "srft":
        sft_agg = losses.Agg("token-mean", n_tokens=counts["expert_tokens"])
        loss, m = losses.srft_loss(logp, adv, mask, expert, rewards=rewards, entropy=ent, gamma=cfg.luffy_gamma,
                                   agg=agg, sft_agg=sft_agg)
    else:  # upt
        if cfg.loss_agg == "token-mean":
            rl_agg = losses.Agg("token-mean", n_tokens=counts["rollout_tokens"])
        else:
            rl_agg = losses.Agg("seq-mean-token-sum-norm", n_seqs=counts["rollout_seqs"],
                                norm_len=cfg.max_response_len)
        loss, m = losses.upt_loss(logp, old_logp, adv, mask, expert, sft_coef=cfg.upt_sft_coef, clip=cfg.upt_clip,
                                  eps_low=cfg.eps_low, eps_high=cfg.eps_high, rl_agg=rl_agg,
                                  sft_agg=losses.Agg("token-mean", n_tokens=counts["expert_tokens"]))
    if cfg.entropy_coef:
        e_loss, _ = losses.entropy_bonus(ent, mask, coef=cfg.entropy_coef, agg=agg)
        loss = loss + e_loss
    if cfg.kl_coef:
        k_loss, km = losses.kl_loss(logp, ref_logp, mask, kind=cfg.kl_type, coef=cfg.kl_coef, agg=agg)
        loss = loss + k_loss
        m["kl"] = km["kl"]
    return loss, m


LOGGED = ("clipfrac", "clipfrac_high", "clipfrac_low", "dual_clipfrac", "ratio_mean", "approx_kl", "kl",
          "sft_loss", "pg_loss")


def train_on_batch(model, ref_model, optim, rows: list[Row], cfg, d: T.Dist, lr: float) -> dict:
    """Step 3 of the module docstring, every mini-batch's update at learning rate `lr`. Returns the step's training
    metrics (global)."""
    n_mb = cfg.minibatches_per_step
    n_groups = max(r.group for r in rows) + 1
    bounds = [round(i * n_groups / n_mb) for i in range(n_mb + 1)]
    sums: dict[str, float] = {}   # token-weighted metric sums (local), and counts
    recompute = n_mb > 1

    def my_rows(lo, hi):
        g_rows = [[r for r in rows if r.group == g] for g in range(lo, hi)]
        parts = D.balance_across_ranks([sum(r.length for r in g) for g in g_rows], d.world_size)[d.rank]
        return [r for j in parts for r in g_rows[j]]

    def microbatches(mine):
        return row_microbatches(mine, cfg.tokens_per_microbatch, d)

    def forward(mb, grad: bool, net=model):
        """(B, R) log-probs, entropies and mask of the rows' response tokens under `net`."""
        packed, index, mask = _pack_rows(mb)
        packed, index, mask = packed.to(d.device), index.to(d.device), mask.to(d.device)
        with torch.set_grad_enabled(grad):
            logp, ent = net(packed.input_ids, cu_seqlens=packed.cu_seqlens, targets=packed.targets,
                            temperature=cfg.temperature, return_entropy=net is model)
        return logp[0][index], (None if ent is None else ent[0][index]), mask

    def add(name, value, weight):
        sums[name] = sums.get(name, 0.0) + value * weight
        sums[name + "@w"] = sums.get(name + "@w", 0.0) + weight

    def gap_metrics(mb, logp, mask):
        samp = _padded(mb, [r.sampler_logp for r in mb], mask.shape[1]).to(d.device)
        on = mask * torch.tensor([not r.expert for r in mb], device=d.device, dtype=mask.dtype)[:, None]
        if on.sum() > 0:
            add("logp_gap", float(((logp.detach() - samp).abs() * on).sum() / on.sum()), float(on.sum()))

    assigned = [my_rows(bounds[k], bounds[k + 1]) for k in range(n_mb)]
    old: dict[int, torch.Tensor] = {}
    if recompute:   # old log-probs before any update of this step (verl's recompute of old_log_prob)
        for mb in microbatches([r for mine in assigned for r in mine]):
            if mb is None:
                forward(DUMMY_ROWS, False)
                continue
            logp, _, mask = forward(mb, False)
            gap_metrics(mb, logp, mask)
            for i, r in enumerate(mb):
                old[id(r)] = logp[i].detach()
    results = []
    for mine in assigned:
        local = {"tokens": sum(len(r.response) for r in mine), "seqs": len(mine),
                 "expert_tokens": sum(len(r.response) for r in mine if r.expert),
                 "rollout_tokens": sum(len(r.response) for r in mine if not r.expert),
                 "rollout_seqs": sum(not r.expert for r in mine)}
        counts = dict(zip(local, T.all_reduce_sum(list(local.values()), d.device)))
        loss_sum = 0.0
        for mb in microbatches(mine):
            if mb is None:   # keep FSDP's collectives in step with the other ranks; contributes nothing
                if ref_model is not None:
                    forward(DUMMY_ROWS, False, ref_model)
                logp, _, _ = forward(DUMMY_ROWS, True)
                (logp.sum() * 0.0).backward()
                continue
            logp, ent, mask = forward(mb, True)
            if not recompute:
                gap_metrics(mb, logp, mask)
                old_logp = logp.detach()
            else:
                old_logp = torch.stack([torch.nn.functional.pad(old[id(r)], (0, mask.shape[1] - old[id(r)].shape[0]))
                                        for r in mb])
            ref_logp = forward(mb, False, ref_model)[0] if ref_model is not None else None
            loss, m = minibatch_loss(cfg.algo, cfg, logp, old_logp, ent, mask, mb, counts, ref_logp)
            loss.backward()
            loss_sum += loss.item()
            w = float(mask.sum())
            add("entropy", float((ent.detach() * mask).sum() / mask.sum()), w)
            for key in LOGGED:
                if key in m:
                    add(key, m[key], w)
        gnorm = T.grad_norm_and_clip(model, cfg.grad_clip)
        (loss_total,) = T.all_reduce_sum([loss_sum], d.device)
        skip = not (math.isfinite(gnorm) and math.isfinite(loss_total)) or (
            cfg.skip_grad_norm > 0 and gnorm > cfg.skip_grad_norm)
        if not skip:
            for g in optim.param_groups:
                g["lr"] = lr
            optim.step()
        optim.zero_grad(set_to_none=True)
        results.append((loss_total, gnorm, skip))
    keys = sorted(k for k in sums if not k.endswith("@w"))
    vals = T.all_reduce_sum([sums[k] for k in keys] + [sums[k + "@w"] for k in keys], d.device)
    out = {k: vals[i] / max(vals[len(keys) + i], 1e-12) for i, k in enumerate(keys)}
    out.update(loss=sum(r[0] for r in results), grad_norm=max(r[1] for r in results),
               skipped_minibatches=sum(r[2] for r in results), nonfinite=any(not math.isfinite(r[1])
                                                                              or not math.isfinite(r[0])
                                                                              for r in results))
    return out


DUMMY_ROWS = [Row(0, [0], [0], None, 0.0)]


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of RL step `step` (0-based): lr * (step+1)/warmup_steps during the warmup, then lr. Why a
    warmup at all: Adam's first updates move every weight by about lr whatever its gradient's noise (m/sqrt(v) is
    +-1 at the first step), a large random move for a small model; the paper's runs use none (lr 1e-6, 7B)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def row_microbatches(mine: list[Row], max_tokens: int, d: T.Dist) -> list[list[Row] | None]:
    """Micro-batches of whole rows within the token budget, padded with None to the same count on every rank."""
    groups = [[mine[i] for i in g] for g in D.pack_microbatches([r.length - 1 for r in mine], max_tokens)] \
        if mine else []
    n = T.all_reduce_max(len(groups), d.device)
    return groups + [None] * (n - len(groups))


def step_flops(config: M.ModelConfig, gen_lengths: list[int], train_lengths: list[int], recompute: bool) -> float:
    """FLOPs of one RL step (paper App. C from actual lengths; see the module docstring): each generated sequence
    at forward cost, each trained sequence at 3x forward (+1x for the old-log-prob pass when recomputed)."""
    f = M.flops_for_lengths(config, gen_lengths, training=False) + M.flops_for_lengths(config, train_lengths)
    if recompute:
        f += M.flops_for_lengths(config, train_lengths, training=False)
    return f


# ----------------------------------------------------------------------------------------------------------------
# The run


def run_rl(cfg) -> dict:
    d = T.init_distributed(cfg.device)
    try:
        return _rl(cfg, d)
    finally:
        T.close_distributed(d)


def _rl(cfg, d: T.Dist) -> dict:
    torch.manual_seed(cfg.seed)
    tok = M.load_tokenizer(cfg.model)
    need_expert = cfg.algo in ("luffy", "srft", "upt")
    prompts, report = D.load_prompts(cfg.train, tok, max_prompt_len=cfg.max_prompt_len, need_expert=need_expert,
                                     max_response_len=cfg.max_response_len, overlong=cfg.overlong,
                                     instruction=cfg.instruction)
    if report.overlong:
        T.print0(d, report.message())
    model = M.from_pretrained(cfg.model, dtype=torch.float32, device=d.device)
    config = model.config
    stop_ids = set(tok.eos_token_ids) | set(config.eos_token_ids)
    T.shard_model(model, d, activation_checkpointing=cfg.activation_checkpointing, precision=cfg.precision)
    ref_model = None
    if cfg.kl_coef:   # a frozen copy of the initial policy, only when the KL term is on
        ref_model = M.from_pretrained(cfg.model, dtype=torch.float32, device=d.device)
        ref_model.requires_grad_(False)
        T.shard_model(ref_model, d, precision=cfg.precision)
    optim = T.make_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay)
    state = {"step": 0, "eflops": 0.0, "prompt_cursor": 0, "skipped_steps": 0, "bad_in_a_row": 0}
    ckpt = T.resolve_resume(cfg.resume, cfg.run_dir)
    if ckpt:
        state.update(T.load_checkpoint(ckpt, model, optim, d))
        T.print0(d, f"resumed from {ckpt} at step {state['step']}")
    log = T.Metrics(cfg.run_dir, d, cfg.steps, append=ckpt is not None, first_step=state["step"])
    log.write({"kind": "config", "command": "rl", "config": asdict(cfg), "world_size": d.world_size,
               "train_prompts": len(prompts), "train_overlong": report.overlong, "model_config": config.to_hf()})
    while state["step"] < cfg.steps:
        t0 = time.time()
        rows, gm, gen_lengths = collect_batch(model, tok, prompts, cfg, state, d, stop_ids)
        t1 = time.time()
        lr = warmup_lr(cfg.lr, cfg.warmup_steps, state["step"])
        if rows:
            tm = train_on_batch(model, ref_model, optim, rows, cfg, d, lr)
        else:   # DAPO found no informative group at all: nothing to learn from, the step is skipped
            tm = {"loss": 0.0, "grad_norm": 0.0, "skipped_minibatches": cfg.minibatches_per_step, "nonfinite": False}
        t_train = time.time() - t1
        nonfinite = tm.pop("nonfinite")
        state["skipped_steps"] += int(tm["skipped_minibatches"] > 0)
        state["bad_in_a_row"] = state["bad_in_a_row"] + 1 if nonfinite else 0
        step_f = step_flops(config, gen_lengths, [r.length for r in rows], cfg.minibatches_per_step > 1)
        state["eflops"] += step_f / 1e18
        state["step"] += 1
        dt = time.time() - t0
        rec = {"kind": "train", "step": state["step"], **gm, **tm, "train_time": t_train, "step_time": dt,
               "gen_tokens_per_s": sum(gen_lengths) / max(gm["gen_time"], 1e-9),
               "train_tokens_per_s": sum(r.length for r in rows) / max(t_train, 1e-9),
               "step_eflops": step_f / 1e18, "eflops": state["eflops"], "lr": lr}
        log.write(rec)
        log.progress(state["step"], f"reward {gm['reward_mean']:.3f} kept {gm['kept_groups']} rounds "
                                    f"{gm['rounds']} loss {tm['loss']:.4g} gen {gm['gen_time']:.1f}s "
                                    f"train {t_train:.1f}s")
        if state["bad_in_a_row"] >= cfg.max_bad_steps:
            log.close()
            raise T.TrainingStopped(f"{state['bad_in_a_row']} RL steps in a row had a non-finite loss or gradient "
                                    f"norm (step {state['step']}); stopping. Lower --lr or --resume from an "
                                    "earlier checkpoint.")
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            T.save_checkpoint(cfg.run_dir, state["step"], model, optim, state, d, tokenizer_dir=cfg.model)
    log.close()
    return state
