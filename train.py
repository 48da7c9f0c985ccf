"""Training infrastructure shared by `retu.py sft` and `retu.py rl`: processes, FSDP2, optimiser schedule,
atomic resumable checkpoints, metrics.

Distributed: one code path. Under `torchrun` the process group comes from the environment; a plain
`python retu.py ...` creates a one-process group on a free local port, so FSDP2 and torch.distributed.checkpoint
work the same way everywhere (gloo on CPU, NCCL on GPU). The model is sharded torchtitan-style: `fully_shard` on
every transformer block, then on the root (embedding, final norm, LM head). On GPU the parameters are kept in fp32
and FSDP2's MixedPrecisionPolicy gathers them in bf16 for compute, reducing gradients in fp32.

Gradient reduction is a SUM, not FSDP's default mean (`set_gradient_divide_factor(1)`): every loss in retu is
already divided by the *global* token count of its optimiser step (all-reduced), so summing the ranks' gradients
gives exactly the gradient of the global objective, independent of world size and micro-batching.

Checkpoints (`<run_dir>/checkpoints/step_XXXXXXXX/`):
    hf/            HF-format export (config.json, safetensors, tokenizer files) via model.save_pretrained
    state/         torch.distributed.checkpoint of {"model", "optim"} (sharded; any world size can load it)
    trainer.json   step, EFLOPs, data position, the run's counters
    rng_rank{r}.pt every rank's torch / numpy / python RNG state
A checkpoint is written into `.tmp_step_XXXXXXXX` and renamed when every piece is on disk, so a directory named
`step_*` is always complete; a crash mid-write leaves only a `.tmp_*` directory that is ignored and overwritten.
Multi-node runs need run_dir on a filesystem shared by all nodes (every rank writes its shards there).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import model as M

# ----------------------------------------------------------------------------------------------------------------
# Processes


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. K non-finite steps in a row); the message says why."""


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool   # we created the process group (so we destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> Dist:
    """Join (torchrun) or create (plain python) the default process group; pick this rank's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:   # launched by torchrun
            dist.init_process_group("nccl" if use_cuda else "gloo")
        else:
            store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
            dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=0, world_size=1)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return Dist(rank, world, local_rank, dev, owns)


def close_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks (in float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def print0(d: Dist, *args) -> None:
    if d.is_main:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Model sharding


def shard_model(model: torch.nn.Module, d: Dist, *, activation_checkpointing: bool = False,
                precision: str = "auto") -> torch.nn.Module:
    """FSDP2: fully_shard each block, then the root. precision "bf16": bf16 compute (parameters gathered in bf16,
    gradients reduced in fp32) with fp32 master weights; "fp32": fp32 throughout; "auto": bf16 on GPU, fp32 on CPU.

    One process in fp32 keeps the plain module: FSDP would gather from and reduce-scatter to itself and cast
    nothing, which cost 15% of a demo SFT step on the CPU (5.3-5.5 against 6.1-6.4 steps/s, identical losses).
    Checkpoints do not depend on it: get_state_dict and DCP save plain and sharded modules alike, and a run saved
    by one process resumes under torchrun (tested)."""
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint
        for block in model.layers:
            checkpoint(block)   # recompute the block's activations in backward; keeps parameter names
    if precision == "auto":
        precision = "bf16" if d.device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto | bf16 | fp32, got {precision!r}")
    if d.world_size == 1 and precision == "fp32":
        return model
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16" else MixedPrecisionPolicy())
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again right at the start of backward: keep them gathered
        block.retu_reshard_after_forward = i < len(model.layers) - 1   # Unsharded restores it
        fully_shard(block, mp_policy=mp, reshard_after_forward=block.retu_reshard_after_forward)
    fully_shard(model, mp_policy=mp)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)   # sum over ranks: the losses are globally normalised already
        m.set_force_sum_reduction_for_comms(True)   # a plain SUM (gloo has no PREMUL_SUM)
    # FSDP2 warns when a module returns a view (the model's (B, T) log-probs); we never modify outputs in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def fsdp_modules(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class Unsharded:
    """Context manager: all-gather every FSDP2 module's parameters once and keep them gathered, so many forward
    calls (token-by-token generation) run on full weights without re-gathering per call."""

    def __init__(self, model: torch.nn.Module):
        self.mods = fsdp_modules(model)

    def __enter__(self):
        for m in self.mods:
            m.set_reshard_after_forward(False)
            m.unshard()
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.reshard()
            m.set_reshard_after_forward(getattr(m, "retu_reshard_after_forward", True))
        return False


def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> float:
    """Clip gradients to max_norm (if > 0) and return the global L2 norm before clipping (inf/nan if so)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):   # a DTensor under FSDP2: materialise the global value
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------------------------------------------
# Optimiser and schedule


def make_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float):
    # decoupled weight decay on every parameter, as the authors' verl configs do (no norm/bias exemption)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             foreach=True)


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr_ratio: float = 0.0,
          schedule: str = "cosine") -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup from 0 over warmup_steps, then cosine
    from peak down to min_lr_ratio*peak at total_steps (HF get_cosine_schedule_with_warmup), or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * cos)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and
                   os.path.exists(os.path.join(root, n, "trainer.json")))
    return [os.path.join(root, n) for n in names]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def export_hf(model: torch.nn.Module, path: str, d: Dist, tokenizer_dir: str | None) -> None:
    """Gather the full fp32 state dict on rank 0 and write an HF-format checkpoint there."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        M.save_pretrained(model, path, tokenizer_dir=tokenizer_dir, state_dict=sd)
    dist.barrier()


def save_checkpoint(run_dir: str, step: int, model, optimizer, trainer_state: dict, d: Dist, *,
                    tokenizer_dir: str | None) -> str:
    """Write checkpoint `step` atomically (temp dir + rename). Returns its final path."""
    root = checkpoint_dir(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp_step_{step:08d}")
    if d.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)   # leftovers of a crash
        os.makedirs(tmp)
    dist.barrier()
    export_hf(model, os.path.join(tmp, "hf"), d, tokenizer_dir)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "state"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{d.rank}.pt"))
    dist.barrier()
    if d.is_main:
        # trainer.json is written last: its presence is what marks the checkpoint complete
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump({**trainer_state, "step": step, "world_size": d.world_size}, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, d: Dist) -> dict:
    """Restore model, optimiser and (same world size) RNG state from a checkpoint; return its trainer state."""
    with open(os.path.join(path, "trainer.json")) as f:
        state = json.load(f)
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = os.path.join(path, f"rng_rank{d.rank}.pt")
    if os.path.exists(rng) and state.get("world_size") == d.world_size:
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def resolve_resume(resume: str, run_dir: str) -> str | None:
    """--resume "" (no), "auto" (latest complete checkpoint of run_dir, if any) or a checkpoint path."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    if not os.path.exists(os.path.join(resume, "trainer.json")):
        raise FileNotFoundError(f"--resume {resume}: not a complete retu checkpoint (no trainer.json)")
    return resume


# ----------------------------------------------------------------------------------------------------------------
# Metrics

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}   # dense bf16 FLOP/s per GPU


def peak_flops(d: Dist) -> float | None:
    """The card's dense bf16 peak (for MFU), or None on CPU / an unknown card."""
    if d.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(d.device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)



class Metrics:
    """One JSON record per line in <run_dir>/metrics.jsonl (rank 0 only), TensorBoard when installed, and a
    progress line with rate and ETA."""

    def __init__(self, run_dir: str, d: Dist, total_steps: int, *, append: bool, first_step: int = 0):
        self.d, self.total, self.t0, self.step0 = d, total_steps, time.time(), first_step
        self.f = self.tb = None
        if d.is_main:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            if append and os.path.exists(path):
                # resuming at first_step: drop what the interrupted run logged after its last checkpoint, so every
                # step appears once and the curve is the one the resumed run produces
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= first_step]
                with open(path, "w") as f:
                    f.writelines(keep)
            self.f = open(path, "a" if append else "w")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k.replace(".", "/"), v, record["step"])

    def progress(self, step: int, text: str) -> None:
        """Print `step/total text | rate | ETA` (rank 0)."""
        if not self.d.is_main:
            return
        done = step - self.step0
        rate = done / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        print(f"step {step}/{self.total} {text} | {rate:.2f} steps/s | ETA {_hms(eta)}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
