"""`retu.py sft` end to end on a tiny random Qwen2: the loss against a naive float64 computation, micro-batch and
world-size invariance (torchrun, 2 ranks, gloo), exact resume after a crash, atomic checkpoints, the HF export,
non-finite step skipping, and memorisation (the loop learns)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from fixtures import build_checkpoint, write_jsonl
from safetensors.torch import load_file

import data as D
import losses
import model as M
import retu
import rollout
import train as T

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["apple", "banana", "cherry", "copy", "the", "word", "answer", "is"]


def sft_data(path, n=12, seed=0):
    rng = np.random.default_rng(seed)
    recs = [{"prompt": f"copy the word {WORDS[i % len(WORDS)]} {i}",
             "response": " ".join(rng.choice(WORDS, size=1 + i % 4))} for i in range(n)]
    return write_jsonl(path, recs)


def argv(ck, train, run, **kw):
    flags = dict(model=ck, train=train, run_dir=run, device="cpu", sequences_per_step=4, max_steps=6, lr=1e-2,
                 warmup_ratio=0.0, max_seq_len=128, tokens_per_microbatch=4096, save_every=2, val_every=1000,
                 log_every=1000)
    flags.update(kw)
    out = ["sft"]
    for k, v in flags.items():
        out += ["--" + k.replace("_", "-")] + ([str(v)] if v != "" else [])   # "" = a bare boolean flag
    return out


def records(run, kind="train"):
    with open(Path(run) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    return build_checkpoint(tmp / "base"), sft_data(tmp / "train.jsonl"), tmp


@pytest.fixture(scope="module")
def reference_run(setup):
    ck, train, tmp = setup
    assert retu.main(argv(ck, train, tmp / "ref")) == 0
    return tmp / "ref"


def test_first_loss_is_the_global_token_mean_nll(setup, reference_run):
    """Step 1's logged loss == sum over the batch's response tokens (EOS included) of -log p, divided by their
    number, computed example by example in float64 with full logits (no packing)."""
    ck, train, _ = setup
    tok = M.load_tokenizer(ck)
    ds = D.load_sft(str(train), tok, max_seq_len=128)
    net = M.from_pretrained(ck).double()
    nll, n = 0.0, 0
    for i in retu.sft_batch(0, len(ds), 4, seed=0):
        tokens, n_prompt = ds.example(i)
        ids = torch.tensor(tokens, dtype=torch.long)[None]
        with torch.no_grad():
            logits = net(ids)[0].double()
        for t in range(n_prompt - 1, len(tokens) - 1):     # predicts tokens[n_prompt], ..., the EOS
            nll -= float(torch.log_softmax(logits[t], -1)[tokens[t + 1]])
            n += 1
    assert n == records(reference_run)[0]["trained_tokens"]
    assert abs(records(reference_run)[0]["loss"] - nll / n) < 1e-5


def test_microbatch_size_does_not_change_the_run(setup, reference_run):
    ck, train, tmp = setup
    assert retu.main(argv(ck, train, tmp / "small_mb", tokens_per_microbatch=128)) == 0
    a = [r["loss"] for r in records(reference_run)]
    b = [r["loss"] for r in records(tmp / "small_mb")]
    assert len(a) == 6 and np.allclose(a, b, rtol=0, atol=1e-5)
    assert a[-1] < a[0] - 0.5  # and it trains


def torchrun_2(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "retu.py"), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def resume_from(run, checkpoint):
    """A fresh run directory holding only `checkpoint` (linked), for --resume auto."""
    (run / "checkpoints").mkdir(parents=True)
    os.symlink(checkpoint, run / "checkpoints" / checkpoint.name)


@pytest.fixture(scope="module")
def two_rank_run(setup):
    ck, train, tmp = setup
    torchrun_2(argv(ck, train, tmp / "two"))
    return tmp / "two"


def test_two_ranks_equal_one_process(reference_run, two_rank_run):
    """torchrun --nproc_per_node=2 (gloo, FSDP2): same losses (1e-5) and the same exported weights."""
    assert records(two_rank_run, "config")[0]["world_size"] == 2
    a = [r["loss"] for r in records(reference_run)]
    b = [r["loss"] for r in records(two_rank_run)]
    assert np.allclose(a, b, rtol=0, atol=1e-5)
    wa = load_file(reference_run / "checkpoints" / "step_00000006" / "hf" / "model.safetensors")
    wb = load_file(two_rank_run / "checkpoints" / "step_00000006" / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k


def test_checkpoints_resume_across_world_sizes(setup, reference_run, two_rank_run):
    """One fp32 process trains a plain module (no FSDP), two ranks FSDP2 shards: the step-4 checkpoint of either
    resumes under the other and the rest of the run equals the uninterrupted one (losses to 1e-5)."""
    ck, train, tmp = setup
    want = {r["step"]: r["loss"] for r in records(reference_run)}
    resume_from(tmp / "one_to_two", reference_run / "checkpoints" / "step_00000004")
    res = torchrun_2(argv(ck, train, tmp / "one_to_two", resume="auto"))
    assert "resumed from" in res.stdout and records(tmp / "one_to_two", "config")[0]["world_size"] == 2
    resume_from(tmp / "two_to_one", two_rank_run / "checkpoints" / "step_00000004")
    assert retu.main(argv(ck, train, tmp / "two_to_one", resume="auto")) == 0
    for run in ("one_to_two", "two_to_one"):
        got = {r["step"]: r["loss"] for r in records(tmp / run)}
        assert sorted(got) == [5, 6] and all(abs(got[s] - want[s]) < 1e-5 for s in (5, 6)), run


def test_resume_after_a_crash_continues_exactly(setup, reference_run, monkeypatch):
    ck, train, tmp = setup
    run = tmp / "crash"
    real = T.lr_at

    def crash_at_step_4(step, *a, **k):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real(step, *a, **k)
    monkeypatch.setattr(T, "lr_at", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        retu.main(argv(ck, train, run))
    monkeypatch.setattr(T, "lr_at", real)
    assert [Path(p).name for p in T.list_checkpoints(str(run))] == ["step_00000002", "step_00000004"]
    assert retu.main(argv(ck, train, run, resume="auto")) == 0
    got = {r["step"]: r["loss"] for r in records(run)}
    want = {r["step"]: r["loss"] for r in records(reference_run)}
    assert sorted(got) == list(range(1, 7))
    assert all(abs(got[s] - want[s]) < 1e-6 for s in range(1, 7))
    assert abs(records(run)[-1]["eflops"] - records(reference_run)[-1]["eflops"]) < 1e-15


def test_a_checkpoint_interrupted_mid_write_is_never_used(setup, reference_run, monkeypatch):
    ck, train, tmp = setup
    run = tmp / "torn"
    real, calls = T.dcp.save, []

    def die_on_second_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(T.dcp, "save", die_on_second_save)
    with pytest.raises(RuntimeError, match="disk full"):
        retu.main(argv(ck, train, run))
    monkeypatch.setattr(T.dcp, "save", real)
    ckdir = run / "checkpoints"
    assert sorted(os.listdir(ckdir)) == [".tmp_step_00000004", "step_00000002"]
    assert [Path(p).name for p in T.list_checkpoints(str(run))] == ["step_00000002"]
    assert retu.main(argv(ck, train, run, resume="auto")) == 0
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]   # steps 3-4 of the torn run were dropped
    got = {r["step"]: r["loss"] for r in records(run)}
    want = {r["step"]: r["loss"] for r in records(reference_run)}
    assert all(abs(got[s] - want[s]) < 1e-6 for s in range(1, 7))
    assert sorted(os.listdir(ckdir)) == ["step_00000002", "step_00000004", "step_00000006"]


# reading the sharded state in one process without a process group is the point here, and DCP warns about it
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_exported_checkpoint_reloads_to_identical_logits(setup, reference_run):
    ck, train, _ = setup
    step = reference_run / "checkpoints" / "step_00000006"
    exported = M.from_pretrained(step / "hf")
    restored = M.from_pretrained(ck)                   # the same architecture, then the resumable state on top
    sd = restored.state_dict()
    dcp.load({"model": sd}, checkpoint_id=str(step / "state"))
    restored.load_state_dict(sd)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    assert torch.equal(exported(ids), restored(ids))
    assert not torch.allclose(exported(ids), M.from_pretrained(ck)(ids))   # it is the trained model
    assert (step / "hf" / "tokenizer.json").exists() and (step / "hf" / "tokenizer_config.json").exists()
    state = json.loads((step / "trainer.json").read_text())
    assert state["step"] == 6 and abs(state["eflops"] - records(reference_run)[-1]["eflops"]) < 1e-15


def test_eflops_are_three_forward_passes_of_the_actual_lengths(setup, reference_run):
    ck, train, _ = setup
    tok = M.load_tokenizer(ck)
    ds = D.load_sft(str(train), tok, max_seq_len=128)
    config = M.ModelConfig.from_json(Path(ck) / "config.json")
    lengths = [ds.length(i) for i in retu.sft_batch(0, len(ds), 4, seed=0)]
    n_mm = sum(p.numel() for n, p in M.Transformer(config).named_parameters() if p.dim() == 2 and "embed" not in n)
    n_mm += 2 * config.vocab_size * config.hidden_size       # embedding and (tied) head both counted, as verl does
    by_hand = sum(3 * (2 * n_mm * s + 4 * s * s * config.num_layers * config.hidden_size) for s in lengths)
    assert records(reference_run)[0]["eflops"] == pytest.approx(by_hand / 1e18, rel=1e-12)


def test_non_finite_step_is_skipped_and_counted(setup, monkeypatch, capsys):
    ck, train, tmp = setup
    real, calls = losses.sft_loss, []

    def nan_on_third_call(*a, **k):
        loss, m = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), m
    monkeypatch.setattr(losses, "sft_loss", nan_on_third_call)
    assert retu.main(argv(ck, train, tmp / "nan", max_steps=5)) == 0
    recs = records(tmp / "nan")
    assert [r["skipped"] for r in recs] == [0, 0, 1, 0, 0]
    assert recs[-1]["skipped_steps"] == 1 and np.isfinite(recs[-1]["loss"])
    # K in a row: the run stops with a clear message (exit code 2, no traceback)
    monkeypatch.setattr(losses, "sft_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    assert retu.main(argv(ck, train, tmp / "nan2", max_bad_steps=2)) == 2
    assert "2 optimiser steps in a row had a non-finite loss or gradient norm" in capsys.readouterr().err
    assert len(records(tmp / "nan2")) == 2


def test_sft_memorises_a_small_set(tmp_path):
    """A few hundred steps: validation loss (on the training set itself) collapses and greedy decoding of the
    exported checkpoint reproduces every target response."""
    ck = build_checkpoint(tmp_path / "base", hidden_size=64, intermediate_size=128)
    recs = [{"prompt": f"copy the word {w}", "response": f"the word is {w}"} for w in WORDS[:6]]
    train = write_jsonl(tmp_path / "mem.jsonl", recs)
    run = tmp_path / "mem"
    assert retu.main(argv(ck, train, run, val=train, sequences_per_step=6, max_steps=200, lr=3e-3, save_every=200,
                          val_every=50, warmup_ratio=0.05)) == 0
    val = records(run, "val")
    assert [v["step"] for v in val] == [0, 50, 100, 150, 200]
    assert val[0]["val_loss"] > 3.0 and val[-1]["val_loss"] < 0.05
    tok = M.load_tokenizer(ck)
    net = M.from_pretrained(run / "checkpoints" / "step_00000200" / "hf")
    prompts = [tok.encode(D.format_prompt(tok, r["prompt"])) for r in recs]
    outs = rollout.generate(net, prompts, n=1, max_new_tokens=12, temperature=0.0, stop_token_ids=tok.eos_token_ids)
    for o, r in zip(outs, recs):
        assert o.finish_reason == "stop" and tok.decode(o.token_ids[:-1]) == r["response"]


def test_activation_checkpointing_changes_nothing_but_memory(setup, reference_run):
    ck, train, tmp = setup
    assert retu.main(argv(ck, train, tmp / "ac", activation_checkpointing="")) == 0
    a = [r["loss"] for r in records(reference_run)]
    b = [r["loss"] for r in records(tmp / "ac")]
    assert np.allclose(a, b, rtol=0, atol=1e-6)


def test_bf16_mixed_precision_path_tracks_fp32(setup, reference_run):
    """--precision bf16 (the GPU default) on CPU: FSDP2 gathers bf16 parameters, keeps fp32 master weights."""
    ck, train, tmp = setup
    assert retu.main(argv(ck, train, tmp / "bf16", precision="bf16")) == 0
    a = [r["loss"] for r in records(reference_run)]
    b = [r["loss"] for r in records(tmp / "bf16")]
    assert a != b and np.allclose(a, b, rtol=0, atol=0.05)
    w = load_file(tmp / "bf16" / "checkpoints" / "step_00000006" / "hf" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in w.values())     # the export holds the fp32 master weights
