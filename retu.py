"""retu: post-training driver. SFT, RL (GRPO, DAPO_d, DAPO_dc, LUFFY, SRFT, UPT), evaluation and curve fitting.

    python retu.py sft  --model BASE --train sft.jsonl --val val.jsonl --run-dir runs/sft          # one process
    torchrun --nproc_per_node=8 retu.py sft  --model BASE --train sft.jsonl --run-dir runs/sft     # FSDP2
    torchrun --nproc_per_node=8 retu.py rl   --algo dapo --eps-high 0.28 \\
                                             --model runs/sft/checkpoints/step_00010800/hf \\
                                             --train rl.jsonl --run-dir runs/dapo
    python retu.py eval --checkpoints runs/sft --benchmarks aime24.jsonl gsm8k.jsonl --run-dir runs/sft
    python retu.py fit  --run-dir runs/sft --rl-runs runs/dapo
    python retu.py demo [--quick] [--out runs/demo]        # the whole study at toy scale on a CPU, with a report

Every subcommand has one config dataclass below; its fields are the command-line flags (`--field-name`), and the
resolved config is the first record of the run's metrics.jsonl. Batch sizes carry their unit in the name:
sequences_per_step (SFT), prompts_per_step and samples_per_prompt (RL), tokens_per_microbatch (memory only: it
never changes the objective, because every loss is normalised by the global token count of its optimiser step).

Where things live: data.py (reading, validation, chat formatting, packing), train.py (processes, FSDP2,
checkpoints, schedule, metrics), rl.py (the RL step: generation rounds, rewards, the algorithms' batches and
losses), and the shared modules model.py, rollout.py, losses.py, verify.py, fit.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import cli
import curate
import data as D
import demo
import demo_report
import fit
import losses
import model as M
import rl
import rollout
import stages
import train as T
import verify
from cli import opt

# ----------------------------------------------------------------------------------------------------------------
# Configs (one per subcommand); flags are generated from the fields


@dataclass(kw_only=True)
class CommonConfig:
    """Fields shared by sft, rl and eval."""

    run_dir: str = opt(help="output directory: metrics.jsonl, checkpoints/, eval results")
    seed: int = opt(0, "seed for data order and sampling")
    device: str = opt("auto", "auto | cpu | cuda")
    instruction: str = opt(D.PAPER_INSTRUCTION, "appended to every prompt after a newline ('' = none)")


@dataclass(kw_only=True)
class SFTConfig(CommonConfig):
    """supervised fine-tuning on expert trajectories (paper Eq. 1, App. B.1)"""

    model: str = opt(help="HF checkpoint directory to start from (config.json, safetensors, tokenizer)")
    train: str = opt(help="SFT data (.jsonl/.parquet): {prompt, response} or {messages}")
    val: str = opt("", "held-out SFT data for the validation loss (the paper's Val-199 role)")
    sequences_per_step: int = opt(512, "global batch: sequences per optimiser step (all ranks)")
    tokens_per_microbatch: int = opt(16384, "packed tokens per forward/backward (memory only)")
    max_seq_len: int = opt(12000, "prompt + response tokens per example")
    overlong: str = opt("drop", "examples over max_seq_len: drop | truncate | error")
    epochs: float = opt(8.0, "passes over the training data (SFT889K: 8; 102K sets: 9)")
    max_steps: int = opt(0, "stop after this many optimiser steps (0: epochs decide); the schedule spans it")
    lr: float = opt(1e-5, "peak learning rate")
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW betas")
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay")
    warmup_ratio: float = opt(0.1, "linear warmup over this fraction of the steps, then cosine to min_lr_ratio")
    min_lr_ratio: float = opt(0.0, "final learning rate / peak")
    grad_clip: float = opt(1.0, "global gradient-norm clip (0: none)")
    max_bad_steps: int = opt(10, "stop after this many non-finite steps in a row (each one is skipped)")
    val_every: int = opt(360, "validation loss every N steps (and at the start and the end)")
    save_every: int = opt(360, "checkpoint every N steps (and at the end)")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward")
    precision: str = opt("auto", "training compute: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 (master "
                                 "weights and optimiser state are always fp32)")
    resume: str = opt("", "'' | auto (latest checkpoint in run_dir) | a checkpoint directory")
    log_every: int = opt(1, "progress line every N steps (metrics.jsonl gets every step)")

    def __post_init__(self):
        if self.overlong not in D.OVERLONG_POLICIES:
            raise ValueError(f"--overlong must be one of {D.OVERLONG_POLICIES}")
        if self.max_seq_len > self.tokens_per_microbatch:
            raise ValueError(f"--max-seq-len {self.max_seq_len} must be <= --tokens-per-microbatch "
                             f"{self.tokens_per_microbatch}: an example must fit one micro-batch")
        if self.sequences_per_step < 1:
            raise ValueError("--sequences-per-step must be >= 1")


ALGOS = ("grpo", "dapo", "luffy", "srft", "upt")
# per-algorithm defaults from the authors' launchers (algorithms.md Sec. 4-7); an explicit flag overrides them
ALGO_DEFAULTS = {
    "grpo": dict(lr=1e-6, temperature=0.7, entropy_coef=0.0, norm_adv_by_std=True),
    "dapo": dict(lr=1e-6, temperature=0.7, entropy_coef=0.0, norm_adv_by_std=True),
    "luffy": dict(lr=1e-6, temperature=1.0, entropy_coef=0.001, norm_adv_by_std=False),
    "srft": dict(lr=1e-6, temperature=1.0, entropy_coef=0.001, norm_adv_by_std=False),
    "upt": dict(lr=5e-6, temperature=1.0, entropy_coef=0.001, norm_adv_by_std=False),
}


@dataclass(kw_only=True)
class RLConfig(CommonConfig):
    """RL from a checkpoint: grpo | dapo (DAPO_d / DAPO_dc) | luffy | srft | upt (rl.py).

    Fields left at -1 / auto take the algorithm's default (ALGO_DEFAULTS)."""

    model: str = opt(help="HF checkpoint directory of the policy to start from (e.g. an SFT checkpoint's hf/)")
    train: str = opt(help="RL prompts (.jsonl/.parquet): {prompt, answer} (+ response for luffy/srft/upt)")
    algo: str = opt("dapo", "grpo | dapo (DAPO_d; add --eps-high 0.28 for DAPO_dc) | luffy | srft | upt")
    prompts_per_step: int = opt(64, "prompts (groups) per RL step, all ranks")
    samples_per_prompt: int = opt(8, "rollouts per prompt (luffy/srft: the expert demo is one of them)")
    prompts_per_round: int = opt(0, "dapo: prompts per generation round (0: 2 x prompts_per_step, paper 128)")
    max_rounds: int = opt(10, "dapo: give up filling the batch after this many rounds (0: unlimited)")
    on_exhausted: str = opt("proceed", "dapo, rounds exhausted: proceed (train the short batch) | raise")
    minibatches_per_step: int = opt(1, "optimiser steps per RL step (more than 1 lets the clip act)")
    tokens_per_microbatch: int = opt(32768, "packed tokens per forward/backward (memory only)")
    max_prompt_len: int = opt(1024, "prompt tokens; longer prompts follow --overlong")
    max_response_len: int = opt(8192, "generated tokens per rollout (and expert trajectory cap)")
    overlong: str = opt("drop", "over-long prompts / expert trajectories: drop | truncate | error")
    temperature: float = opt(-1.0, "sampling temperature, also divides the training logits (-1: algo default)")
    top_p: float = opt(1.0, "nucleus sampling")
    top_k: int = opt(0, "top-k sampling (0: off)")
    lr: float = opt(-1.0, "learning rate, constant after the warmup (-1: algo default: 1e-6; upt 5e-6)")
    warmup_steps: int = opt(0, "linear lr warmup over the first N RL steps, (k+1)/N at step k (0: none, the paper's)")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay")
    grad_clip: float = opt(1.0, "global gradient-norm clip")
    skip_grad_norm: float = opt(0.0, "skip the update when the grad norm exceeds this (0: never; UPT script 80)")
    eps_low: float = opt(0.2, "PPO clip, lower")
    eps_high: float = opt(0.2, "PPO clip, upper (0.28 = DAPO_dc)")
    clip_c: float = opt(0.0, "dual clip for A < 0, loss capped at c|A| (0: off, the paper; authors' DAPO runs: 10)")
    norm_adv_by_std: str = opt("auto", "divide group advantages by std: auto (algo default) | true | false")
    kl_coef: float = opt(0.0, "KL-to-reference loss coefficient (0: no reference model is built)")
    kl_type: str = opt("k3", "k1 | k2 | k3 | abs")
    entropy_coef: float = opt(-1.0, "entropy bonus coefficient (-1: algo default, 0.001 for luffy/srft/upt)")
    loss_agg: str = opt("token-mean", "token-mean (paper: global token mean) | seq-mean-token-sum-norm (scripts)")
    luffy_gamma: float = opt(0.1, "luffy/srft: off-policy shaping f(p) = p / (p + gamma)")
    upt_gate: int = opt(0, "upt: a prompt gets SFT on its demo iff #correct rollouts <= this")
    upt_sft_coef: float = opt(1.0, "upt: SFT loss coefficient")
    upt_clip: bool = opt(True, "upt: clip the RL rows' ratio (paper GRPO); --no-upt-clip = authors' script")
    steps: int = opt(500, "RL steps")
    save_every: int = opt(10, "checkpoint every N steps (and at the end)")
    max_bad_steps: int = opt(10, "stop after this many non-finite steps in a row")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward")
    precision: str = opt("auto", "training compute: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 (master "
                                 "weights and optimiser state are always fp32)")
    resume: str = opt("", "'' | auto | a checkpoint directory")

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"--algo must be one of {ALGOS}, got {self.algo!r}")
        dflt = ALGO_DEFAULTS[self.algo]
        for k in ("lr", "temperature", "entropy_coef"):
            if getattr(self, k) < 0:
                setattr(self, k, dflt[k])
        if self.norm_adv_by_std == "auto":
            self.norm_adv_by_std = "true" if dflt["norm_adv_by_std"] else "false"
        if self.norm_adv_by_std not in ("true", "false"):
            raise ValueError("--norm-adv-by-std must be auto | true | false")
        if self.prompts_per_round <= 0:
            self.prompts_per_round = 2 * self.prompts_per_step if self.algo == "dapo" else self.prompts_per_step
        if self.algo != "dapo" and self.prompts_per_round != self.prompts_per_step:
            raise ValueError("--prompts-per-round differs from --prompts-per-step only for --algo dapo")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.prompts_per_step % self.minibatches_per_step:
            raise ValueError("--prompts-per-step must be a multiple of --minibatches-per-step")
        if self.algo in ("luffy", "srft") and self.samples_per_prompt < 2:
            raise ValueError("luffy/srft need --samples-per-prompt >= 2 (one is the expert demo)")
        if self.max_prompt_len + self.max_response_len > self.tokens_per_microbatch:
            raise ValueError("--tokens-per-microbatch must hold one prompt + response "
                             f"({self.max_prompt_len} + {self.max_response_len})")
        if self.loss_agg not in ("token-mean", "seq-mean-token-sum-norm"):
            raise ValueError("--loss-agg must be token-mean | seq-mean-token-sum-norm")
        if self.overlong not in D.OVERLONG_POLICIES:
            raise ValueError(f"--overlong must be one of {D.OVERLONG_POLICIES}")


@dataclass(kw_only=True)
class EvalConfig(CommonConfig):
    """pass@1 (avg@k) and pass@k of checkpoints on benchmark files, keyed by step and EFLOPs"""

    checkpoints: list[str] = opt(help="checkpoint dirs, HF dirs, or run dirs (all their checkpoints)")
    benchmarks: list[str] = opt(help="benchmark files (.jsonl/.parquet), one per benchmark: {prompt|problem, answer}")
    samples_per_prompt: int = opt(0, "samples per problem (0: 16 for sets of <= small_set_size problems, else 1)")
    small_set_size: int = opt(100, "benchmarks this small get 16 samples per problem (AIME: avg@16)")
    temperature: float = opt(0.7, "sampling temperature (paper: 0.7)")
    top_p: float = opt(1.0, "nucleus sampling (paper: 1.0)")
    top_k: int = opt(0, "top-k sampling (0: off)")
    max_new_tokens: int = opt(8192, "generation budget per sample (paper: 8192)")
    max_prompt_len: int = opt(4096, "prompts longer than this are reported and skipped")
    dtype: str = opt("auto", "weights for generation: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    redo: bool = opt(False, "re-evaluate checkpoints that run_dir/eval.jsonl already has for these benchmarks")


@dataclass(kw_only=True)
class FitConfig:
    """the Plasticity-Ceiling analysis (fit.py) of an SFT run and its RL branches"""

    run_dir: str = opt(help="the SFT run: its eval.jsonl (scores per checkpoint) and metrics.jsonl (val loss)")
    rl_runs: list[str] = opt([], "RL runs branched from the SFT run's checkpoints (each with its eval.jsonl)")
    metric: str = opt("overall", "a benchmark name, or overall (problem-weighted mean)")
    boot: int = opt(200, "bootstrap replicates for the ceiling CIs (0: none)")
    out: str = opt("", "output directory (default: <run_dir>/fit)")
    plots: bool = opt(True, "write ceiling.png and branches.png")


@dataclass(kw_only=True)
class DemoConfig:
    """the whole RETU study at toy scale on a CPU, with a report (demo.py, demo_report.py)"""

    out: str = opt("runs/demo", "study directory: data, base model, runs, report.md and its figures")
    quick: bool = opt(False, "every stage at its minimum size (a smoke test; the numbers mean nothing)")
    seed: int = opt(0, "seed of the data, the base model and every run")
    workers: int = opt(2, "worker processes running independent stages at once, one thread each (1: in this process)")
    worker: bool = opt(False, "internal: serve the stages named on stdin (how --workers starts its processes)")

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")


COMMANDS = {"sft": SFTConfig, "rl": RLConfig, "eval": EvalConfig, "fit": FitConfig, "demo": DemoConfig}


def parse_args(argv: list[str] | None = None):
    """argv -> (command, config instance)."""
    return cli.parse("retu.py", __doc__.split("\n")[0], COMMANDS, argv)


# ----------------------------------------------------------------------------------------------------------------
# SFT


def sft_batch(step: int, n_examples: int, batch: int, seed: int) -> list[int]:
    """Global example indices of optimiser step `step`: a fresh seeded permutation per epoch, the incomplete last
    batch of each epoch dropped (as the authors' DistributedSampler). A pure function of step: resuming needs no
    loader state."""
    per_epoch = n_examples // batch
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return perm[pos * batch:(pos + 1) * batch].tolist()


DUMMY = D.pack_sequences([(np.array([0, 0]), 2)])   # a 1-token micro-batch with nothing trained (see _microbatches)


def _microbatches(items: list, lengths: list[int], max_tokens: int, d: T.Dist) -> list[list]:
    """This rank's items packed into micro-batches, padded with `None` (a dummy micro-batch) to the largest count of
    any rank: under FSDP every rank must run the same number of forward/backward passes (each one all-gathers)."""
    groups = [[items[i] for i in g] for g in D.pack_microbatches(lengths, max_tokens)] if items else []
    n = T.all_reduce_max(len(groups), d.device)
    return groups + [None] * (n - len(groups))


def sft_eval_loss(model, ds: D.TokenizedSFT, cfg: SFTConfig, d: T.Dist) -> float:
    """Token-mean NLL over the whole set (all ranks, global token count)."""
    idx = list(range(len(ds)))
    mine = [idx[j] for j in D.balance_across_ranks([ds.length(i) for i in idx], d.world_size)[d.rank]]
    nll, n = 0.0, 0.0
    with torch.no_grad():
        for mb in _microbatches(mine, [ds.length(i) - 1 for i in mine], cfg.tokens_per_microbatch, d):
            p = (DUMMY if mb is None else D.pack_sequences([ds.example(i) for i in mb])).to(d.device)
            logp, _ = model(p.input_ids, cu_seqlens=p.cu_seqlens, targets=p.targets)
            nll -= float((logp * p.loss_mask).sum())
            n += float(p.loss_mask.sum())
    nll, n = T.all_reduce_sum([nll, n], d.device)
    return nll / max(n, 1.0)


def run_sft(cfg: SFTConfig) -> dict:
    """`retu.py sft`: the paper's SFT (Eq. 1; App. B.1; the authors' recipe in algorithms.md Sec. 9).

    Each step takes `sequences_per_step` examples (a seeded permutation per epoch, last partial batch dropped),
    splits them over ranks balanced by tokens, packs each rank's share into micro-batches of at most
    `tokens_per_microbatch` tokens, and trains the response tokens (EOS included) with AdamW, warmup + cosine,
    gradient clipping. A step whose loss or gradient norm is not finite is skipped (no update) and counted;
    `max_bad_steps` in a row stop the run. Validation loss every `val_every` steps (and at 0 and the end),
    checkpoints every `save_every` steps (and at the end). Returns the final trainer state.

    Deviations from the authors' code: the loss is the token mean over the whole optimiser step (all micro-batches
    and ranks; the paper's Eq. 1 up to a constant), theirs a mean of per-micro-batch token means, which depends on
    the micro-batch size. Compute is counted per sequence at its own length (3x forward, App. C); the paper's
    estimate uses the dataset-mean length, which is lower by E[s^2]/E[s]^2 in the attention term. Every rank reads
    and tokenises the whole file (simple; for very large sets tokenise once offline)."""
    d = T.init_distributed(cfg.device)
    try:
        return _sft(cfg, d)
    finally:
        T.close_distributed(d)


def _sft(cfg: SFTConfig, d: T.Dist) -> dict:
    torch.manual_seed(cfg.seed)
    tok = M.load_tokenizer(cfg.model)
    kw = dict(max_seq_len=cfg.max_seq_len, overlong=cfg.overlong, instruction=cfg.instruction)
    train = D.load_sft(cfg.train, tok, **kw)
    val = D.load_sft(cfg.val, tok, **kw) if cfg.val else None
    for ds in (train, val):
        if ds is not None and ds.report.overlong:
            T.print0(d, ds.report.message())
    per_epoch = len(train) // cfg.sequences_per_step
    if per_epoch == 0:
        raise D.DataError(f"{cfg.train}: {len(train)} usable examples, fewer than one step of "
                          f"--sequences-per-step {cfg.sequences_per_step}")
    total = cfg.max_steps or max(1, int(cfg.epochs * per_epoch))
    warmup = int(cfg.warmup_ratio * total)

    model = M.from_pretrained(cfg.model, dtype=torch.float32, device=d.device)
    config = model.config
    T.shard_model(model, d, activation_checkpointing=cfg.activation_checkpointing, precision=cfg.precision)
    optim = T.make_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay)

    state = {"step": 0, "eflops": 0.0, "tokens": 0, "trained_tokens": 0, "skipped_steps": 0, "bad_in_a_row": 0}
    ckpt = T.resolve_resume(cfg.resume, cfg.run_dir)
    if ckpt:
        state.update(T.load_checkpoint(ckpt, model, optim, d))
        T.print0(d, f"resumed from {ckpt} at step {state['step']}")
    log = T.Metrics(cfg.run_dir, d, total, append=ckpt is not None, first_step=state["step"])
    log.write({"kind": "config", "command": "sft", "config": asdict(cfg), "world_size": d.world_size,
               "total_steps": total, "steps_per_epoch": per_epoch, "train_examples": len(train),
               "train_overlong": train.report.overlong, "model_config": config.to_hf()})

    def validate():
        if val is not None:
            v = sft_eval_loss(model, val, cfg, d)
            log.write({"kind": "val", "step": state["step"], "eflops": state["eflops"], "val_loss": v})
            T.print0(d, f"step {state['step']}: val_loss {v:.4f}")

    def save():
        T.save_checkpoint(cfg.run_dir, state["step"], model, optim, state, d, tokenizer_dir=cfg.model)

    if state["step"] == 0:
        validate()
    peak = T.peak_flops(d)
    while state["step"] < total:
        step, t0 = state["step"], time.time()
        idx = sft_batch(step, len(train), cfg.sequences_per_step, cfg.seed)
        lengths = [train.length(i) for i in idx]
        mine = [idx[j] for j in D.balance_across_ranks(lengths, d.world_size)[d.rank]]
        n_trained_local = sum(train.length(i) - int(train.n_prompt[i]) for i in mine)
        (n_trained,) = T.all_reduce_sum([n_trained_local], d.device)
        agg = losses.Agg("token-mean", n_tokens=n_trained)   # global token mean over the whole step
        loss_sum = 0.0
        for mb in _microbatches(mine, [train.length(i) - 1 for i in mine], cfg.tokens_per_microbatch, d):
            p = (DUMMY if mb is None else D.pack_sequences([train.example(i) for i in mb])).to(d.device)
            logp, _ = model(p.input_ids, cu_seqlens=p.cu_seqlens, targets=p.targets)
            loss, _ = losses.sft_loss(logp, p.loss_mask, agg=agg)
            loss.backward()
            loss_sum += loss.item()
        (loss_val,) = T.all_reduce_sum([loss_sum], d.device)
        gnorm = T.grad_norm_and_clip(model, cfg.grad_clip)
        lr = T.lr_at(step, total, cfg.lr, warmup, cfg.min_lr_ratio)
        finite = math.isfinite(gnorm) and math.isfinite(loss_val)
        if finite:
            for g in optim.param_groups:
                g["lr"] = lr
            optim.step()
            state["bad_in_a_row"] = 0
        else:
            state["skipped_steps"] += 1
            state["bad_in_a_row"] += 1
        optim.zero_grad(set_to_none=True)
        # compute was spent whether or not the update was applied: it counts
        step_flops = M.flops_for_lengths(config, lengths, training=True)
        state["eflops"] += step_flops / 1e18
        state["tokens"] += sum(lengths)
        state["trained_tokens"] += int(n_trained)
        state["step"] = step + 1
        dt = time.time() - t0
        mfu = {"mfu": step_flops / dt / (peak * d.world_size)} if peak else {}
        log.write({"kind": "train", "step": state["step"], **mfu, "loss": loss_val, "grad_norm": gnorm, "lr": lr,
                   "skipped": int(not finite), "skipped_steps": state["skipped_steps"], "eflops": state["eflops"],
                   "tokens": sum(lengths), "trained_tokens": int(n_trained), "tokens_per_s": sum(lengths) / dt,
                   "step_time": dt})
        if state["step"] % cfg.log_every == 0 or not finite:
            log.progress(state["step"], f"loss {loss_val:.4f} gnorm {gnorm:.3g} lr {lr:.3g}"
                         + ("" if finite else f" NON-FINITE: step skipped ({state['skipped_steps']} so far)"))
        if state["bad_in_a_row"] >= cfg.max_bad_steps:
            log.close()
            raise T.TrainingStopped(f"{state['bad_in_a_row']} optimiser steps in a row had a non-finite loss or "
                                  f"gradient norm (last: loss {loss_val}, grad norm {gnorm}) at step "
                                  f"{state['step']}; stopping. Lower --lr, check the data, or --resume from an "
                                  "earlier checkpoint.")
        last = state["step"] == total
        if state["step"] % cfg.val_every == 0 or last:
            validate()
        if state["step"] % cfg.save_every == 0 or last:
            save()
    log.close()
    return state


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def expand_checkpoints(paths: list[str]) -> list[tuple[str, int, float]]:
    """(HF directory, step, cumulative EFLOPs) for each checkpoint: a retu checkpoint dir (trainer.json), its hf/
    subdirectory, a run dir (all its checkpoints, in order), or a plain HF dir (a base model: step 0, 0 EFLOPs)."""
    out = []
    for p in paths:
        p = os.path.normpath(p)
        if os.path.isdir(T.checkpoint_dir(p)):
            out += expand_checkpoints(T.list_checkpoints(p))
        elif os.path.exists(os.path.join(p, "trainer.json")):
            with open(os.path.join(p, "trainer.json")) as f:
                st = json.load(f)
            out.append((os.path.join(p, "hf"), int(st["step"]), float(st["eflops"])))
        elif os.path.exists(os.path.join(p, "config.json")):
            parent = os.path.dirname(p)
            if os.path.basename(p) == "hf" and os.path.exists(os.path.join(parent, "trainer.json")):
                out += expand_checkpoints([parent])
            else:
                out.append((p, 0, 0.0))
        else:
            raise FileNotFoundError(f"{p}: not a checkpoint, an HF model directory, or a run directory")
    return out


def run_eval(cfg: EvalConfig) -> list[dict]:
    d = T.init_distributed(cfg.device)
    try:
        return _eval(cfg, d)
    finally:
        T.close_distributed(d)


def _eval(cfg: EvalConfig, d: T.Dist) -> list[dict]:
    """Every checkpoint x every benchmark. Problems are split over ranks (each rank holds the full model: evaluation
    is data parallel), results gathered on rank 0 and appended to <run_dir>/eval.jsonl, one record per checkpoint:
    {"step", "eflops", "checkpoint", "scores": {bench: pass@1 %}, "overall": %, "pass_at_k": {bench: {k: %}},
    "n_problems": {bench: n}, "samples_per_prompt": {bench: k}} -- the `sft_points` input of fit.analyze. Every
    sample is also written to <run_dir>/eval/step_XXXXXXXX/<bench>.jsonl for inspection."""
    ckpts = expand_checkpoints(cfg.checkpoints)
    tok = M.load_tokenizer(ckpts[0][0])
    stop_ids = set(tok.eos_token_ids)
    benches = {}
    for path in cfg.benchmarks:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in benches:
            raise D.DataError(f"{path}: two benchmark files are named {name!r}")
        probs, report = D.load_prompts(path, tok, max_prompt_len=cfg.max_prompt_len, overlong="drop",
                                       instruction=cfg.instruction, benchmark=True)
        if report.overlong:
            T.print0(d, report.message())
        benches[name] = probs
    dtype = {"auto": torch.bfloat16 if d.device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    done = {(r["checkpoint"], tuple(sorted(r["scores"]))) for r in _read_jsonl(os.path.join(cfg.run_dir, "eval.jsonl"))}
    records = []
    for hf_dir, step, eflops in ckpts:
        if not cfg.redo and (hf_dir, tuple(sorted(benches))) in done:
            T.print0(d, f"{hf_dir}: already evaluated on these benchmarks (--redo to repeat)")
            continue
        model = M.from_pretrained(hf_dir, dtype=dtype, device=d.device).eval()
        stop = sorted(stop_ids | set(model.config.eos_token_ids))
        rec = {"kind": "eval", "step": step, "eflops": eflops, "checkpoint": hf_dir, "scores": {},
               "pass_at_k": {}, "n_problems": {}, "samples_per_prompt": {}, "truncated_frac": {}}
        for name, probs in benches.items():
            k = cfg.samples_per_prompt or (16 if len(probs) <= cfg.small_set_size else 1)
            mine = list(range(d.rank, len(probs), d.world_size))
            outs = rollout.generate(model, [probs[i].prompt_ids for i in mine], n=k, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    stop_token_ids=stop, seed=cfg.seed * 7919 + d.rank) if mine else []
            local = []
            for o in outs:
                ids = o.token_ids[:-1] if o.token_ids and o.token_ids[-1] in stop_ids | set(stop) else o.token_ids
                text = tok.decode(ids)
                local.append((mine[o.prompt_index], text, float(verify.score(text, probs[mine[o.prompt_index]].answer)),
                              o.finish_reason))
            gathered = [None] * d.world_size
            dist.all_gather_object(gathered, local)
            if not d.is_main:
                continue
            per = [[] for _ in probs]
            for part in gathered:
                for i, text, score, finish in part:
                    per[i].append((text, score, finish))
            correct = [sum(s == 1.0 for _, s, _ in p) for p in per]
            rec["scores"][name] = 100.0 * float(np.mean([np.mean([s for _, s, _ in p]) for p in per]))
            rec["pass_at_k"][name] = {str(kk): 100.0 * float(np.mean([pass_at_k(k, c, kk) for c in correct]))
                                      for kk in sorted({2 ** j for j in range(int(math.log2(k)) + 1)} | {k})}
            rec["n_problems"][name] = len(probs)
            rec["samples_per_prompt"][name] = k
            rec["truncated_frac"][name] = float(np.mean([f != "stop" for p in per for _, _, f in p]))
            dump = os.path.join(cfg.run_dir, "eval", f"step_{step:08d}")
            os.makedirs(dump, exist_ok=True)
            with open(os.path.join(dump, f"{name}.jsonl"), "w") as f:
                for prob, p in zip(probs, per):
                    f.write(json.dumps({"where": prob.where, "problem": prob.problem, "answer": prob.answer,
                                        "completions": [t for t, _, _ in p], "scores": [s for _, s, _ in p]}) + "\n")
        if d.is_main:
            n_total = sum(rec["n_problems"].values())
            rec["overall"] = sum(rec["scores"][b] * n for b, n in rec["n_problems"].items()) / n_total
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"step {step} ({eflops:.4g} EF): " + " ".join(f"{b} {v:.1f}" for b, v in rec["scores"].items())
                  + f" | overall {rec['overall']:.1f}", flush=True)
            records.append(rec)
        del model
    return records


# ----------------------------------------------------------------------------------------------------------------
# Fit: the Plasticity-Ceiling analysis of an SFT run and its RL branches


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_points(run_dir: str) -> dict[int, dict]:
    """step -> {"eflops", "scores", "n_problems"} from run_dir/eval.jsonl; records of the same step (e.g. separate
    benchmark files evaluated at different times) are merged, a later score of a benchmark replacing an earlier."""
    out: dict[int, dict] = {}
    for r in _read_jsonl(os.path.join(run_dir, "eval.jsonl")):
        p = out.setdefault(r["step"], {"eflops": r["eflops"], "scores": {}, "n_problems": {}})
        p["scores"].update(r["scores"])
        p["n_problems"].update(r["n_problems"])
    return out


def fit_inputs(cfg: FitConfig) -> dict:
    """The input of fit.analyze from run directories: the SFT run's evaluated checkpoints (with the validation loss
    of the same step from metrics.jsonl) and, per RL run, its evaluated checkpoints keyed by the SFT step it started
    from (read from the RL run's config record: the model it was started from is an SFT checkpoint's hf/)."""
    evals = eval_points(cfg.run_dir)
    if not evals:
        raise D.DataError(f"{cfg.run_dir}/eval.jsonl: no evaluation results; run `retu.py eval` first")
    val = {r["step"]: r["val_loss"] for r in _read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
           if r.get("kind") == "val"}
    sizes = {}
    for p in evals.values():
        sizes.update(p["n_problems"])
    sft_points = [{"step": s, "eflops": r["eflops"], "scores": r["scores"],
                   **({"val_loss": val[s]} if s in val else {})} for s, r in sorted(evals.items())]
    branches: dict[int, list[dict]] = {}
    starts: dict[str, int] = {}                     # RL run -> the SFT step it started from
    for run in cfg.rl_runs:
        conf = next((r for r in _read_jsonl(os.path.join(run, "metrics.jsonl")) if r.get("kind") == "config"), None)
        if conf is None:
            raise D.DataError(f"{run}/metrics.jsonl: no config record; is this an RL run directory?")
        start = expand_checkpoints([conf["config"]["model"]])[0][1]
        pts = [{"eflops": p["eflops"], "scores": p["scores"]} for s, p in sorted(eval_points(run).items()) if s > 0]
        branches.setdefault(start, []).extend(pts)
        starts[run] = start
    return {"name": os.path.basename(os.path.normpath(cfg.run_dir)), "sft_points": sft_points,
            "rl_branches": branches, "bench_sizes": sizes, "rl_starts": starts}


def problem_scores(run_dir: str, step: int, benches: list[str]) -> list[tuple[str, float]]:
    """(problem location, mean score of its samples) per problem of `benches` at one evaluated checkpoint, from the
    per-problem files `retu.py eval` writes (run_dir/eval/step_*/<benchmark>.jsonl)."""
    out = []
    for b in benches:
        path = os.path.join(run_dir, "eval", f"step_{step:08d}", f"{b}.jsonl")
        if not os.path.exists(path):
            raise D.DataError(f"{path}: missing (the per-problem results of `retu.py eval` for step {step}, {b})")
        for n, rec in enumerate(_read_jsonl(path), 1):
            if not rec.get("scores") or "where" not in rec:
                raise D.DataError(f"{path}:{n}: need 'where' and a non-empty 'scores'")
            out.append((rec["where"], sum(rec["scores"]) / len(rec["scores"])))
    return out


def rl_changes(spec: dict, cfg: FitConfig) -> list[dict]:
    """Per RL run: did it change the score of its SFT checkpoint beyond noise? Problem by problem between that
    checkpoint and the run's last evaluated one (a paired comparison: the same problems, so their own difficulty
    is no noise), on the benchmarks of `cfg.metric`: scores at start and end, problems gained / lost, and the
    exact sign test on them (fit.sign_test)."""
    out = []
    for run, start in spec["rl_starts"].items():
        evals = eval_points(run)
        last = max((s for s in evals if s > 0), default=None)
        if last is None:
            continue
        benches = sorted(evals[last]["scores"]) if cfg.metric == "overall" else [cfg.metric]
        a, b = problem_scores(cfg.run_dir, start, benches), problem_scores(run, last, benches)
        if [w for w, _ in a] != [w for w, _ in b]:
            raise D.DataError(f"{run}: step {last} was evaluated on other problems than {cfg.run_dir} step {start}")
        d = [y - x for (_, x), (_, y) in zip(a, b)]
        up, down = sum(x > 0 for x in d), sum(x < 0 for x in d)
        out.append({"run": os.path.basename(os.path.normpath(run)), "sft_step": start, "rl_step": last, "n": len(d),
                    "start": 100.0 * sum(x for _, x in a) / len(d), "end": 100.0 * sum(y for _, y in b) / len(d),
                    "up": up, "down": down, "p": fit.sign_test(up, down)})
    return out


def run_fit(cfg: FitConfig) -> dict:
    spec = fit_inputs(cfg)
    report = fit.analyze(spec["sft_points"], spec["rl_branches"], metric=cfg.metric, bench_sizes=spec["bench_sizes"],
                         n_boot=cfg.boot, name=spec["name"])
    report["rl_changes"] = rl_changes(spec, cfg)
    out = cfg.out or os.path.join(cfg.run_dir, "fit")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "input.json"), "w") as f:
        json.dump(spec, f, indent=1)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(fit.jsonable(report), f, indent=1)
    text = fit.format_report(report)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    if cfg.plots and report["rows"]:
        fit.plot_decomposition(report, os.path.join(out, "ceiling.png"))
        fit.plot_branches(report, os.path.join(out, "branches.png"))
    print(text, end="")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Demo: the toy study, every run a subcommand of this driver, in this process


def run_demo(cfg: DemoConfig) -> str:
    """Run (or resume) the study's stages, then write DIR/report.md; returns the report's path."""
    # the toy model's matrices are too small to gain from a second thread: on the 2-core machine --quick took 21 s
    # with one thread and 38 s with two; two one-thread workers use both cores
    torch.set_num_threads(1)
    t0 = time.time()
    plan = demo.all_stages(cfg.out, quick=cfg.quick, seed=cfg.seed)
    runner = stages.StageRunner(cfg.out, execute=lambda cmd: main(cmd[2:]))
    if cfg.worker:
        stages.serve(runner, plan)
        return ""
    if cfg.workers > 1:
        runner.run_parallel(plan, demo.retu_cmd("demo", out=cfg.out, quick=cfg.quick, seed=cfg.seed, worker=True),
                            workers=cfg.workers)
    else:
        runner.run(plan)
    path = demo_report.write_report(cfg.out, demo.study_config(cfg.quick, cfg.seed), quick=cfg.quick)
    print(f"[demo] report: {path} ({time.time() - t0:.0f} s)", flush=True)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:                        # the data curation commands live in curate.py
        return curate.main(argv[1:])
    cmd, cfg = parse_args(argv)
    runners = {"sft": run_sft, "rl": rl.run_rl, "eval": run_eval, "fit": run_fit, "demo": run_demo}
    try:
        runners[cmd](cfg)
    except (D.DataError, T.TrainingStopped, FileNotFoundError) as e:   # the user's input, said plainly
        print(f"retu {cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
