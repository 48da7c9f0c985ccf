"""`retu.py rl`, `eval` and `fit` end to end on a learnable toy task.

Task: every prompt's gold answer is "7". A tiny model is first SFT'd to answer \\boxed{d} with a random digit d
(so about 1 in 10 samples is right), then each RL algorithm must raise the mean reward: learning, not just
"it runs". The answer is boxed so that any verifier policy grades it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import build_checkpoint, write_jsonl

import data as D
import model as M
import retu
import rl
import train as T

ROOT = Path(__file__).resolve().parent.parent


def records(run, kind="train", name="metrics.jsonl"):
    with open(Path(run) / name) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def cli(sub, **flags):
    out = [sub]
    for k, v in flags.items():
        if isinstance(v, bool):
            out.append(("--" if v else "--no-") + k.replace("_", "-"))
        elif isinstance(v, list):
            out += ["--" + k.replace("_", "-"), *map(str, v)]
        else:
            out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(SFT'd checkpoint dir, RL prompt file with expert "7", tmp dir)."""
    tmp = tmp_path_factory.mktemp("rl")
    base = build_checkpoint(tmp / "base")
    sft = write_jsonl(tmp / "digits.jsonl", [{"prompt": f"pick a digit {i}", "response": f"\\boxed{{{i % 10}}}"}
                                              for i in range(40)])
    assert retu.main(cli("sft", model=base, train=sft, run_dir=tmp / "sft", device="cpu", sequences_per_step=20,
                         max_steps=40, lr=1e-2, save_every=40, val_every=30, max_seq_len=64,
                         tokens_per_microbatch=1024, instruction="", log_every=100)) == 0
    prompts = write_jsonl(tmp / "rl.jsonl", [{"prompt": f"pick a digit {i}", "answer": "7", "response": "\\boxed{7}"}
                                             for i in range(16)])
    return tmp / "sft" / "checkpoints" / "step_00000040", prompts, tmp


def rl_args(toy, algo, run, **kw):
    ckpt, prompts, tmp = toy
    flags = dict(algo=algo, model=ckpt / "hf", train=prompts, run_dir=tmp / run, device="cpu", prompts_per_step=4,
                 samples_per_prompt=8, max_response_len=8, max_prompt_len=64, tokens_per_microbatch=1024, lr=3e-3,
                 steps=12, save_every=12, instruction="")
    flags.update(kw)
    return cli("rl", **flags)


@pytest.mark.parametrize("algo, extra", [
    ("grpo", {}), ("dapo", {}), ("dapo", {"eps_high": 0.28, "minibatches_per_step": 2}),
    ("luffy", {}), ("srft", {}), ("upt", {})])
def test_rl_raises_the_mean_reward(toy, algo, extra):
    run = f"{algo}{'_dc' if extra else ''}"
    assert retu.main(rl_args(toy, algo, run, **extra)) == 0
    recs = records(toy[2] / run)
    reward = [r["reward_mean"] for r in recs]
    assert len(recs) == 12
    assert np.mean(reward[:2]) < 0.4, reward          # the SFT'd start: about 1 digit in 10 is a 7
    assert np.mean(reward[-3:]) > np.mean(reward[:2]) + 0.3, reward
    for r in recs:
        assert np.isfinite(r["loss"]) and r["eflops"] > 0 and r["gen_time"] >= 0
    if algo in ("luffy", "srft"):   # 7 rollouts + the expert per prompt
        assert all(r["trained_rows"] == 4 * 8 and r["expert_rows"] == 4 for r in recs)
    if algo == "upt":               # one demo per prompt that got no success, its rollouts dropped
        assert all(r["expert_rows"] == r["sft_prompts"] and
                   r["trained_rows"] == r["sft_prompts"] + 8 * r["rl_prompts"] for r in recs)
    if algo == "dapo":
        assert all(r["kept_groups"] <= 4 and r["rounds"] >= 1 for r in recs)
    if extra:   # with 2 mini-batches the second update is off-policy: the clip can act
        assert max(r["clipfrac"] for r in recs if "clipfrac" in r) > 0


def test_rl_flops_are_a_hand_computation():
    """Tiny config: N = L (3 H Hff + H (2 nh d + 2 nkv d)) + 2 V H = 2 (3*32*48 + 32*96) + 2*97*32 = 21568;
    forward per token at length s = 2N + 4 s L nh d = 43136 + 256 s."""
    config = M.ModelConfig.tiny(vocab_size=97)   # hidden 32, ffn 48, 2 layers, 4 heads (d 8), 2 kv heads
    gen, trained = [5, 7], [5, 7, 6]
    gen_f = 5 * (43136 + 256 * 5) + 7 * (43136 + 256 * 7)            # 536576
    train_f = 3 * (gen_f + 6 * (43136 + 256 * 6))                     # 3 * 804608 = 2413824
    assert gen_f == 536576 and train_f == 2413824
    assert rl.step_flops(config, gen, trained, recompute=False) == 2950400
    assert rl.step_flops(config, gen, trained, recompute=True) == 2950400 + 804608


def test_rl_logged_flops_come_from_the_actual_lengths(toy, monkeypatch):
    seen = []
    real = rl.step_flops
    monkeypatch.setattr(rl, "step_flops", lambda *a: seen.append(a) or real(*a))
    assert retu.main(rl_args(toy, "grpo", "flops", steps=2, save_every=100)) == 0
    recs = records(toy[2] / "flops")
    config = M.ModelConfig.from_json(toy[0] / "hf" / "config.json")
    prompt_len = len(M.load_tokenizer(toy[0] / "hf").encode("<|im_start|>user\npick a digit 1<|im_end|>\n"
                                                             "<|im_start|>assistant\n"))
    for (cfg_, gen, trained, recompute), r in zip(seen, recs):
        assert cfg_ == config and not recompute
        assert len(gen) == 4 * 8 and sorted(gen) == sorted(trained)     # GRPO trains every rollout
        # every prompt here has the same length, so the lengths are that plus each response's length
        assert np.isclose(np.mean(gen) - prompt_len, r["response_len_mean"])
        assert r["step_eflops"] == pytest.approx(real(config, gen, trained, False) / 1e18, rel=1e-12)
    assert recs[-1]["eflops"] == pytest.approx(sum(r["step_eflops"] for r in recs), rel=1e-12)


def test_rl_warmup_ramps_the_learning_rate(toy):
    assert [rl.warmup_lr(1e-3, 4, k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert rl.warmup_lr(1e-3, 0, 0) == 1e-3
    assert retu.main(rl_args(toy, "grpo", "warm", steps=3, warmup_steps=2, save_every=100)) == 0
    assert [r["lr"] for r in records(toy[2] / "warm")] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    with pytest.raises(SystemExit):
        retu.parse_args(rl_args(toy, "grpo", "x", warmup_steps=-1))


def test_kl_reference_only_when_its_coefficient_is_set(toy):
    assert retu.main(rl_args(toy, "grpo", "kl", steps=2, kl_coef=0.05, save_every=100)) == 0
    recs = records(toy[2] / "kl")
    assert all("kl" in r and r["kl"] >= 0 for r in recs)
    assert recs[1]["kl"] > 0     # the policy has moved away from the frozen reference after one update
    assert all("kl" not in r for r in records(toy[2] / "grpo"))


def test_rl_on_two_ranks(toy):
    """torchrun, 2 ranks (gloo): generation on unsharded FSDP2 weights, groups gathered, 2 mini-batches, and the
    sharded reference model of the KL term kept in step across ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "retu.py"), *rl_args(toy, "dapo", "two", steps=4, minibatches_per_step=2, save_every=2,
                                                       kl_coef=0.01)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = records(toy[2] / "two")
    assert len(recs) == 4 and all(np.isfinite(r["loss"]) and r["kl"] >= 0 for r in recs)
    assert [Path(p).name for p in T.list_checkpoints(str(toy[2] / "two"))] == ["step_00000002", "step_00000004"]


def test_eval_pass_at_1_and_pass_at_k_keyed_by_step_and_eflops(toy):
    ckpt, _, tmp = toy
    assert retu.main(rl_args(toy, "grpo", "for_eval", steps=8, save_every=4)) == 0
    b7 = write_jsonl(tmp / "seven.jsonl", [{"problem": f"pick a digit {i}", "answer": 7} for i in range(6)])
    b3 = write_jsonl(tmp / "three.jsonl", [{"prompt": f"pick a digit {i}", "answer": "3"} for i in range(3)])
    out = tmp / "for_eval"
    assert retu.main(cli("eval", checkpoints=[ckpt, out], benchmarks=[b7, b3], run_dir=out, device="cpu",
                         samples_per_prompt=4, max_new_tokens=8, instruction="")) == 0
    recs = records(out, "eval", "eval.jsonl")
    assert [(r["step"], r["checkpoint"]) for r in recs] == [
        (40, str(ckpt / "hf")), (4, str(out / "checkpoints" / "step_00000004" / "hf")),
        (8, str(out / "checkpoints" / "step_00000008" / "hf"))]
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer.json").read_text())
    assert recs[2]["eflops"] == state["eflops"] > 0
    for r in recs:
        assert r["n_problems"] == {"seven": 6, "three": 3} and r["samples_per_prompt"] == {"seven": 4, "three": 4}
        for bench in ("seven", "three"):
            dump = [json.loads(x) for x in (out / "eval" / f"step_{r['step']:08d}" / f"{bench}.jsonl").open()]
            scores = np.array([d["scores"] for d in dump])             # (problems, samples)
            assert scores.shape == (r["n_problems"][bench], 4)
            assert r["scores"][bench] == pytest.approx(100 * scores.mean())
            c = scores.sum(1)
            for k in (1, 2, 4):
                want = 100 * np.mean([retu.pass_at_k(4, int(ci), k) for ci in c])
                assert r["pass_at_k"][bench][str(k)] == pytest.approx(want)
            assert r["pass_at_k"][bench]["4"] == pytest.approx(100 * np.mean(c > 0))
        assert r["overall"] == pytest.approx((6 * r["scores"]["seven"] + 3 * r["scores"]["three"]) / 9)
    assert recs[2]["scores"]["seven"] > recs[0]["scores"]["seven"] + 30     # RL learned to answer 7
    # evaluating again skips what eval.jsonl already holds, unless --redo
    assert retu.main(cli("eval", checkpoints=[out], benchmarks=[b7, b3], run_dir=out, device="cpu",
                         samples_per_prompt=4, max_new_tokens=8, instruction="")) == 0
    assert len(records(out, "eval", "eval.jsonl")) == 3
    assert retu.main(cli("eval", checkpoints=[out], benchmarks=[b7], run_dir=out, device="cpu",
                         samples_per_prompt=4, max_new_tokens=8, instruction="")) == 0
    assert len(records(out, "eval", "eval.jsonl")) == 5                    # another benchmark set: evaluated


def test_samples_per_prompt_default_is_16_for_small_sets(toy):
    ckpt, _, tmp = toy
    b = write_jsonl(tmp / "aime_like.jsonl", [{"problem": "pick a digit 1", "answer": "7"}])
    assert retu.main(cli("eval", checkpoints=[ckpt], benchmarks=[b], run_dir=tmp / "ev16", device="cpu",
                         max_new_tokens=8, instruction="")) == 0
    assert records(tmp / "ev16", "eval", "eval.jsonl")[0]["samples_per_prompt"] == {"aime_like": 16}


def test_fit_reads_run_directories(tmp_path):
    """An SFT run (eval.jsonl + val losses) and two RL runs branched from its checkpoints go through fit.analyze:
    the branch points are read from the RL runs' config records and the ceilings recovered."""
    sft = tmp_path / "sft"
    ck = {}
    for s in (100, 200):
        ck[s] = sft / "checkpoints" / f"step_{s:08d}"
        (ck[s] / "hf").mkdir(parents=True)
        (ck[s] / "hf" / "config.json").write_text("{}")
        (ck[s] / "trainer.json").write_text(json.dumps({"step": s, "eflops": s / 100}))
    sizes = {"a": 30, "b": 10}
    sft_scores = {0: 10.0, 100: 30.0, 200: 40.0}
    # step 100 was evaluated in two sittings, one benchmark each: the records are merged
    write_jsonl(sft / "eval.jsonl", [{"kind": "eval", "step": s, "eflops": s / 100, "scores": {"a": v, "b": v},
                                      "n_problems": sizes} for s, v in sft_scores.items() if s != 100] +
                [{"kind": "eval", "step": 100, "eflops": 1.0, "scores": {b: 30.0}, "n_problems": {b: sizes[b]}}
                 for b in ("a", "b")])
    write_jsonl(sft / "metrics.jsonl", [{"kind": "val", "step": s, "eflops": s / 100, "val_loss": v}
                                        for s, v in ((0, 2.0), (100, 1.0), (200, 0.9))])
    ceilings = {100: 60.0, 200: 70.0}
    for s, A in ceilings.items():
        run = tmp_path / f"rl{s}"
        run.mkdir()
        write_jsonl(run / "metrics.jsonl", [{"kind": "config", "config": {"model": str(ck[s] / "hf")}}])
        xs = np.linspace(0.1, 4.0, 12)
        p0 = sft_scores[s]
        ys = p0 + (A - p0) / (1 + (xs / 1.0) ** -2.0)                 # the paper's sigmoidal power law
        write_jsonl(run / "eval.jsonl", [{"kind": "eval", "step": 10 * (i + 1), "eflops": float(x),
                                          "scores": {"a": float(y), "b": float(y)}, "n_problems": sizes}
                                         for i, (x, y) in enumerate(zip(xs, ys))])
    # per-problem results (retu.py eval's eval/step_*/<bench>.jsonl): problem i solved iff i < k; rl100 gains
    # 9 + 3 problems and loses problem 0 of "a", rl200 changes nothing
    def dump(run, step, k, lost=()):
        for b, n in sizes.items():
            d = run / "eval" / f"step_{step:08d}"
            d.mkdir(parents=True, exist_ok=True)
            write_jsonl(d / f"{b}.jsonl", [{"where": f"{b}.jsonl:{i + 1}",
                                            "scores": [float(i < k[b] and (b, i) not in lost)]} for i in range(n)])
    dump(sft, 100, {"a": 9, "b": 3})
    dump(sft, 200, {"a": 12, "b": 4})
    dump(tmp_path / "rl100", 120, {"a": 18, "b": 6}, lost={("a", 0)})
    dump(tmp_path / "rl200", 120, {"a": 12, "b": 4})
    runs = [str(tmp_path / "rl100"), str(tmp_path / "rl200")]
    report = retu.run_fit(retu.FitConfig(run_dir=str(sft), rl_runs=runs, boot=0, plots=False))
    # 12 up, 1 down: p = 2 (C(13, 0) + C(13, 1)) / 2^13
    assert report["rl_changes"] == [
        {"run": "rl100", "sft_step": 100, "rl_step": 120, "n": 40, "start": 30.0, "end": 57.5, "up": 12, "down": 1,
         "p": pytest.approx(28 / 8192)},
        {"run": "rl200", "sft_step": 200, "rl_step": 120, "n": 40, "start": 40.0, "end": 40.0, "up": 0, "down": 0,
         "p": 1.0}]
    assert "| rl100 | 100 | 40 | 30.00 | 57.50 | 12 / 1 | 0.00342 |" in (sft / "fit" / "report.md").read_text()
    rows = {r["sft_step"]: r for r in report["rows"]}
    assert sorted(rows) == [100, 200]
    for s, A in ceilings.items():
        assert rows[s]["P_sft"] == pytest.approx(sft_scores[s])
        assert rows[s]["A_post"] == pytest.approx(A, abs=0.5)
    assert report["best_step"] == 200
    spec = json.loads((sft / "fit" / "input.json").read_text())
    assert spec["bench_sizes"] == sizes and [p.get("val_loss") for p in spec["sft_points"]] == [2.0, 1.0, 0.9]
    # the per-problem comparison needs the same problems before and after, and the files
    (tmp_path / "rl200" / "eval" / "step_00000120" / "b.jsonl").write_text('{"where": "other:1", "scores": [1]}\n')
    with pytest.raises(D.DataError, match="rl200: step 120 was evaluated on other problems than .*sft step 200"):
        retu.run_fit(retu.FitConfig(run_dir=str(sft), rl_runs=runs, boot=0, plots=False))
    (tmp_path / "rl200" / "eval" / "step_00000120" / "b.jsonl").write_text('{"where": "b.jsonl:1"}\n')
    with pytest.raises(D.DataError, match=r"step_00000120.b\.jsonl:1: need 'where' and a non-empty 'scores'"):
        retu.run_fit(retu.FitConfig(run_dir=str(sft), rl_runs=runs, boot=0, plots=False))
    (tmp_path / "rl200" / "eval" / "step_00000120" / "b.jsonl").unlink()
    with pytest.raises(D.DataError, match=r"step_00000120.b\.jsonl: missing \(the per-problem results"):
        retu.run_fit(retu.FitConfig(run_dir=str(sft), rl_runs=runs, boot=0, plots=False))


def test_rl_resume_continues_exactly(toy, monkeypatch):
    """Crash in step 4 of 5 (checkpoints every 2), resume: steps 3-5 match an uninterrupted run, because sampling
    seeds and the prompt stream are functions of the saved state."""
    assert retu.main(rl_args(toy, "dapo", "rl_ref", steps=5, save_every=2)) == 0
    real = rl.collect_batch

    def crash(model, tok, prompts, cfg, state, d, stop_ids):
        if state["step"] == 3:
            raise RuntimeError("simulated crash")
        return real(model, tok, prompts, cfg, state, d, stop_ids)
    monkeypatch.setattr(rl, "collect_batch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        retu.main(rl_args(toy, "dapo", "rl_crash", steps=5, save_every=2))
    monkeypatch.setattr(rl, "collect_batch", real)
    assert retu.main(rl_args(toy, "dapo", "rl_crash", steps=5, save_every=2, resume="auto")) == 0
    want = {r["step"]: r for r in records(toy[2] / "rl_ref")}
    got = {r["step"]: r for r in records(toy[2] / "rl_crash")}
    assert sorted(got) == [1, 2, 3, 4, 5]
    for s in range(1, 6):
        for key in ("reward_mean", "loss", "rounds", "kept_groups", "eflops"):
            assert got[s][key] == pytest.approx(want[s][key], abs=1e-6), (s, key)


def test_rl_bf16_sampler_and_trainer_agree(toy):
    """bf16 compute (the GPU default): the sampler runs on the bf16-gathered weights the trainer uses, so the
    |sampler - trainer| log-prob gap stays at rounding level, and the task is still learned."""
    assert retu.main(rl_args(toy, "dapo", "bf16", precision="bf16", steps=8, save_every=100)) == 0
    recs = records(toy[2] / "bf16")
    assert all(0 <= r["logp_gap"] < 0.02 for r in recs)
    assert max(r["logp_gap"] for r in recs) > 0                    # bf16 rounding is visible: the gap is measured
    assert np.mean([r["reward_mean"] for r in recs[-3:]]) > 0.4
