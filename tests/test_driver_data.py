"""Driver data path and config: validation messages, chat formatting, tokenisation, masks, packing, batching,
flag generation, schedules, pass@k. Fast: no training."""

import itertools
import math

import numpy as np
import pytest
from fixtures import build_checkpoint, write_jsonl

import data as D
import model as M
import retu
import train as T


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return M.load_tokenizer(build_checkpoint(tmp_path_factory.mktemp("ck") / "base"))


# ---------------------------------------------------------------------------------------------------------------
# malformed data: file:line and the field name, before anything else happens


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], ":2: not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '[1, 2]'], ":2: expected a JSON object, got list"),
    (['{"prompt": "a", "response": "b"}', '', '{"prompt": "a"}'], ":3: missing field 'response'"),
    (['{"prompt": "a", "response": "   "}'], ":1: field 'response' is empty"),
    (['{"prompt": 3, "response": "b"}'], ":1: field 'prompt' must be a string, got int"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}'],
     ":1: field 'messages': the last turn must have role 'assistant'"),
    (['{"messages": [{"role": "user", "content": "q"}]}'], ":1: field 'messages' must be a list of at least 2"),
])
def test_malformed_sft_lines_name_file_line_and_field(tmp_path, tok, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(D.DataError) as e:
        D.load_sft(str(path), tok, max_seq_len=512)
    assert str(e.value).startswith(str(path) + message.split(":", 2)[0] + ":" + message.split(":", 2)[1])
    assert message in str(e.value)


def test_malformed_rl_and_benchmark_lines(tmp_path, tok):
    p = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "q", "answer": 3}, {"prompt": "q"}])
    with pytest.raises(D.DataError, match=r"rl.jsonl:2: missing field 'answer'"):
        D.load_prompts(str(p), tok, max_prompt_len=512)
    p = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": "q", "answer": "3"}])
    with pytest.raises(D.DataError, match=r"mix.jsonl:1: missing field 'response'"):
        D.load_prompts(str(p), tok, max_prompt_len=512, need_expert=True)
    p = write_jsonl(tmp_path / "bench.jsonl", [{"problem": "q", "answer": 7}])
    probs, _ = D.load_prompts(str(p), tok, max_prompt_len=512, benchmark=True)
    assert probs[0].answer == "7" and probs[0].problem == "q"   # numbers become strings; "problem" accepted
    with pytest.raises(D.DataError, match="missing field 'prompt'"):
        D.load_prompts(str(p), tok, max_prompt_len=512)          # ... only for benchmarks
    with pytest.raises(D.DataError, match="no such file"):
        D.read_records(str(tmp_path / "nope.jsonl"))


def test_cli_reports_bad_data_before_training(tmp_path, capsys):
    ck = build_checkpoint(tmp_path / "base")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}] * 3 + [{"prompt": "a"}])
    rc = retu.main(["sft", "--model", str(ck), "--train", str(bad), "--run-dir", str(tmp_path / "run"),
                    "--device", "cpu", "--max-seq-len", "128", "--tokens-per-microbatch", "256"])
    assert rc == 2
    assert f"{bad}:4: missing field 'response'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------
# formatting, tokenisation, over-long policy


def test_prompt_goes_through_chat_template_with_instruction(tok):
    text = D.format_prompt(tok, "What is 1+1?")
    assert text == ("<|im_start|>user\nWhat is 1+1?\nPlease reason step by step, and put your final answer within "
                    "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert D.format_prompt(tok, "Q", instruction="") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_sft_tokens_are_prompt_then_response_then_eos(tmp_path, tok):
    p = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "apple", "response": "banana"},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "cherry"}]}])
    ds = D.load_sft(str(p), tok, max_seq_len=512)
    eos = tok.encode("<|im_end|>")
    assert len(eos) == 1 and D.eos_id(tok) == eos[0]
    prompt = tok.encode(D.format_prompt(tok, "apple"))
    tokens, n_prompt = ds.example(0)
    assert tokens.tolist() == prompt + tok.encode("banana") + eos and n_prompt == len(prompt)
    prompt2 = tok.encode("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    tokens, n_prompt = ds.example(1)
    assert tokens.tolist() == prompt2 + tok.encode("cherry") + eos and n_prompt == len(prompt2)
    assert ds.where == [f"{p}:1", f"{p}:2"]


def test_overlong_policies_count_and_act(tmp_path, tok):
    short, long = {"prompt": "a", "response": "b"}, {"prompt": "a", "response": "apple " * 40}
    p = write_jsonl(tmp_path / "s.jsonl", [short, long, short])
    n_short = len(tok.encode(D.format_prompt(tok, "a"))) + len(tok.encode("b")) + 1
    limit = n_short + 5
    ds = D.load_sft(str(p), tok, max_seq_len=limit, overlong="drop")
    assert len(ds) == 2 and ds.report.overlong == 1 and ds.where == [f"{p}:1", f"{p}:3"]
    assert "1 of 3 examples over-long (drop)" in ds.report.message()
    ds = D.load_sft(str(p), tok, max_seq_len=limit, overlong="truncate")
    assert len(ds) == 3 and ds.length(1) == limit and ds.report.overlong == 1
    with pytest.raises(D.DataError, match=r"s.jsonl:2: example has \d+ tokens > max_seq_len"):
        D.load_sft(str(p), tok, max_seq_len=limit, overlong="error")
    with pytest.raises(D.DataError, match="no example fits"):
        D.load_sft(str(p), tok, max_seq_len=3, overlong="drop")


# ---------------------------------------------------------------------------------------------------------------
# packing and batching


def test_pack_sequences_masks_exactly_the_response_and_eos():
    p = D.pack_sequences([(np.array([10, 11, 12, 13, 14]), 2), (np.array([20, 21, 22]), 1)])
    assert p.input_ids.tolist() == [[10, 11, 12, 13, 20, 21]]
    assert p.targets.tolist() == [[11, 12, 13, 14, 21, 22]]
    # doc 1: targets 12, 13, 14 (response incl. EOS 14) trained, 11 (prompt) not; doc 2: both targets trained
    assert p.loss_mask.tolist() == [[0, 1, 1, 1, 1, 1]]
    assert p.cu_seqlens.tolist() == [0, 4, 6]


def test_pack_microbatches_first_fit_decreasing():
    # longest first: 6 -> bin A (room 2), 5 -> B (room 3), 4 -> C (room 4), 3 -> B (room 0), 2 -> A (room 0)
    assert D.pack_microbatches([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    with pytest.raises(ValueError, match="does not fit tokens_per_microbatch 8"):
        D.pack_microbatches([9], 8)


def test_balance_across_ranks_is_deterministic_and_balanced():
    parts = D.balance_across_ranks([7, 1, 5, 3, 4], 2)
    assert parts == [[0, 3], [1, 2, 4]]          # 7+3 = 10 vs 5+4+1 = 10
    assert D.balance_across_ranks([1, 2], 3) == [[1], [0], []]


def test_sft_batches_cover_each_epoch_once_and_drop_the_remainder():
    n, b = 10, 3
    seen = [retu.sft_batch(s, n, b, seed=1) for s in range(6)]
    for epoch in range(2):
        flat = sum(seen[3 * epoch:3 * epoch + 3], [])
        assert len(flat) == 9 and len(set(flat)) == 9
    assert seen[0] != seen[3]                         # a fresh permutation per epoch
    assert retu.sft_batch(4, n, b, seed=1) == seen[4]  # a pure function of the step (resume needs no state)


# ---------------------------------------------------------------------------------------------------------------
# configs and flags


def test_flags_are_generated_from_the_config_fields():
    cmd, cfg = retu.parse_args(["sft", "--model", "m", "--train", "t.jsonl", "--run-dir", "r",
                                "--betas", "0.8", "0.9", "--activation-checkpointing", "--sequences-per-step", "4"])
    assert cmd == "sft" and cfg.betas == (0.8, 0.9) and cfg.activation_checkpointing is True
    assert cfg.sequences_per_step == 4 and cfg.lr == 1e-5 and cfg.overlong == "drop"
    with pytest.raises(SystemExit):
        retu.parse_args(["sft", "--model", "m", "--run-dir", "r"])          # --train is required
    with pytest.raises(SystemExit):
        retu.parse_args(["sft", "--model", "m", "--train", "t", "--run-dir", "r", "--max-seq-len", "99999"])
    _, e = retu.parse_args(["eval", "--checkpoints", "a", "b", "--benchmarks", "x.jsonl", "--run-dir", "r"])
    assert e.checkpoints == ["a", "b"] and e.temperature == 0.7 and e.top_p == 1.0 and e.max_new_tokens == 8192


def test_rl_algorithm_defaults_follow_the_authors_launchers():
    def rl(*extra):
        return retu.parse_args(["rl", "--model", "m", "--train", "t", "--run-dir", "r", *extra])[1]
    dapo = rl()
    assert (dapo.algo, dapo.lr, dapo.temperature, dapo.entropy_coef, dapo.norm_adv_by_std) == \
        ("dapo", 1e-6, 0.7, 0.0, "true")
    assert dapo.prompts_per_round == 128 and dapo.eps_high == 0.2 and dapo.clip_c == 0 and dapo.kl_coef == 0
    assert rl("--eps-high", "0.28").eps_high == 0.28                         # DAPO_dc
    luffy = rl("--algo", "luffy")
    assert (luffy.temperature, luffy.entropy_coef, luffy.norm_adv_by_std, luffy.prompts_per_round) == \
        (1.0, 0.001, "false", 64)
    assert rl("--algo", "upt").lr == 5e-6 and rl("--algo", "upt", "--lr", "1e-3").lr == 1e-3
    with pytest.raises(SystemExit):
        rl("--algo", "ppo")


def test_lr_schedule_warmup_then_cosine():
    assert T.lr_at(0, 100, 1.0, 10) == 0.0
    assert T.lr_at(5, 100, 1.0, 10) == 0.5
    assert T.lr_at(10, 100, 1.0, 10) == 1.0
    assert math.isclose(T.lr_at(55, 100, 1.0, 10), 0.5)                    # half-way through the cosine
    assert math.isclose(T.lr_at(100, 100, 1.0, 10, min_lr_ratio=0.1), 0.1)
    assert T.lr_at(50, 100, 2.0, 0, schedule="constant") == 2.0


def test_pass_at_k_matches_enumeration():
    for n, c in [(4, 0), (4, 1), (5, 2), (6, 6), (8, 3)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            naive = sum(any(s) for s in subsets) / len(subsets)
            assert math.isclose(retu.pass_at_k(n, c, k), naive, abs_tol=1e-12)
    assert retu.pass_at_k(16, 4, 1) == 0.25
    with pytest.raises(ValueError):
        retu.pass_at_k(2, 1, 3)


def test_parquet_reads_like_jsonl_or_says_what_is_missing(tmp_path, tok):
    path = tmp_path / "s.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(D.DataError, match="reading Parquet needs pyarrow"):
            D.load_sft(str(path), tok, max_seq_len=512)
        return
    pq.write_table(pa.table({"prompt": ["apple", "q"], "response": ["banana", ""]}), path)
    with pytest.raises(D.DataError, match=r"s.parquet:row 2: field 'response' is empty"):
        D.load_sft(str(path), tok, max_seq_len=512)


def test_missing_inputs_are_named(tmp_path, capsys):
    rc = retu.main(["eval", "--checkpoints", str(tmp_path / "nope"), "--benchmarks", "b.jsonl", "--run-dir",
                    str(tmp_path / "r"), "--device", "cpu"])
    assert rc == 2 and f"{tmp_path / 'nope'}: not a checkpoint, an HF model directory, or a run directory" in \
        capsys.readouterr().err
    ck = build_checkpoint(tmp_path / "base")
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}] * 4)
    rc = retu.main(["sft", "--model", str(ck), "--train", str(train), "--run-dir", str(tmp_path / "r"), "--device",
                    "cpu", "--resume", str(tmp_path / "nockpt"), "--max-seq-len", "128",
                    "--tokens-per-microbatch", "256", "--sequences-per-step", "2"])
    assert rc == 2 and "not a complete retu checkpoint (no trainer.json)" in capsys.readouterr().err
