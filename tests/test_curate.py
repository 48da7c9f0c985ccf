"""`retu.py data ...` (curate.py) on small synthetic files: what each command keeps and counts, file:line errors,
idempotence, the embedding (model.embed) against a naive per-prompt float64 computation, decontamination finding
exactly the planted duplicates, the n-gram mode on hand-counted cases, and win rates against an independent count."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import SPECIAL_TOKENS, build_checkpoint, build_tokenizer, write_jsonl
from safetensors.torch import load_file, save_file

import curate as C
import model as M
import retu
import rollout


def run(capsys, *argv) -> dict:
    """retu.py data <argv> in-process; the summary it prints, parsed."""
    assert retu.main(["data", *map(str, argv)]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def fails(capsys, *argv) -> str:
    assert retu.main(["data", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retu data: error: ")
    return err


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory, tok_dir):
    """A tiny random Qwen3 embedding checkpoint stored as Qwen ships Qwen3-Embedding-8B: tensors without the
    "model." prefix and no lm_head although the config says untied."""
    out = tmp_path_factory.mktemp("emb") / "emb"
    n_vocab = M.load_tokenizer(tok_dir).vocab_size
    cfg = M.ModelConfig.tiny("Qwen3ForCausalLM", vocab_size=n_vocab, tie_word_embeddings=False,
                             max_position_embeddings=512)
    torch.manual_seed(0)
    net = M.Transformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    M.save_pretrained(net, out, tokenizer_dir=tok_dir)
    sd = load_file(out / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# records


def test_prompt_normalisation_and_fields():
    assert C.normalize_prompt("  What  IS\t\uff11+\uff11?\n") == "what is 1+1?"      # full-width digits, case, spaces
    assert C.prompt_of({"problem": "p"}, "f:1") == "p"
    assert C.prompt_of({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": "a"}]}, "f:1") == "u"
    assert C.response_of({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
                         "f:1") == "a"
    assert C.has_chinese("求 x 的值") and C.has_chinese("\U00020001") and not C.has_chinese("Café, naïve, ½, ∑")
    with pytest.raises(C.D.DataError, match="f:3: missing field 'prompt'"):
        C.prompt_of({"answer": 1}, "f:3")
    with pytest.raises(C.D.DataError, match="f:1: field 'messages' has no user turn"):
        C.prompt_of({"messages": [{"role": "assistant", "content": "a"}]}, "f:1")


# ---------------------------------------------------------------------------------------------------------------
# dedup


def test_dedup_within_and_across_files_keeps_the_chosen_record(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Find x.", "response": "r1", "id": 0},
                                           {"prompt": "Add 2 and 3", "response": "longer r2", "id": 1},
                                           {"prompt": "  find  X. ", "response": "longest r3", "id": 2},
                                           {"prompt": "Other", "response": "r", "id": 3}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"problem": "ADD 2 and 3", "response": "r", "id": 4},
                                           {"prompt": "New", "response": "r", "id": 5}])

    def ids(keep, *extra):
        out = tmp_path / (keep + "".join(extra))
        s = run(capsys, "dedup", "--inputs", a, b, "--out-dir", out, "--keep", keep, *extra)
        return [r["id"] for r in lines(out / "a.jsonl")], [r["id"] for r in lines(out / "b.jsonl")], s
    a_ids, b_ids, s = ids("first")
    assert (a_ids, b_ids) == ([0, 1, 3], [5])
    assert (s["records"], s["kept"], s["duplicate_groups"]) == (6, 4, 2)
    assert s["files"][str(a)] == {"original": 4, "kept": 3, "out": str(tmp_path / "first" / "a.jsonl")}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "first" / "a.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask     # not mkstemp's 0600
    assert ids("last")[:2] == ([2, 3], [4, 5])
    assert ids("longest-response")[:2] == ([1, 2, 3], [5])
    assert ids("shortest-response")[:2] == ([0, 3], [4, 5])       # ties ("r", "r") keep the first
    assert ids("first", "--no-normalize")[:2] == ([0, 1, 2, 3], [4, 5])
    # idempotent: deduplicating the output again changes nothing
    first = tmp_path / "first"
    s2 = run(capsys, "dedup", "--inputs", first / "a.jsonl", first / "b.jsonl", "--out-dir", tmp_path / "again")
    assert s2["kept"] == s2["records"] == 4 and s2["duplicate_groups"] == 0
    for f in ("a.jsonl", "b.jsonl"):
        assert (tmp_path / "again" / f).read_bytes() == (first / f).read_bytes()


def test_dedup_errors_name_file_and_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, '{"prompt": "b",'])
    assert f"{bad}:2: not valid JSON" in fails(capsys, "dedup", "--inputs", bad, "--out-dir", tmp_path / "o")
    nop = write_jsonl(tmp_path / "nop.jsonl", [{"prompt": "a"}, {"question": "b"}])
    assert f"{nop}:2: missing field 'prompt'" in fails(capsys, "dedup", "--inputs", nop, "--out-dir", tmp_path / "o")
    noresp = write_jsonl(tmp_path / "noresp.jsonl", [{"prompt": "a"}])
    assert f"{noresp}:1: missing field 'response'" in fails(capsys, "dedup", "--inputs", noresp, "--out-dir",
                                                            tmp_path / "o", "--keep", "longest-response")
    (tmp_path / "sub").mkdir()
    same = write_jsonl(tmp_path / "sub" / "nop.jsonl", [{"prompt": "c"}])
    assert "same name" in fails(capsys, "dedup", "--inputs", nop, same, "--out-dir", tmp_path / "o")
    assert "no such file" in fails(capsys, "dedup", "--inputs", tmp_path / "missing.jsonl", "--out-dir", tmp_path)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())   # nothing half-written
    with pytest.raises(SystemExit) as e:
        retu.main(["data", "dedup", "--inputs", str(nop), "--out-dir", "o", "--keep", "best"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# split-difficulty


def test_split_difficulty_pools_sizes_order_and_seed(tmp_path, capsys):
    rng = random.Random(0)
    recs = [{"prompt": f"p{i}", "win_rate": rng.choice([0, 0.25, 0.5, 0.75, 1.0]), "i": i} for i in range(200)]
    src = write_jsonl(tmp_path / "wr.jsonl", recs)
    s = run(capsys, "split-difficulty", "--input", src, "--out-dir", tmp_path / "s", "--records-per-split", 30)
    easy, uni, hard = (lines(tmp_path / "s" / f"{k}.jsonl") for k in ("easy", "uniform", "hard"))
    n_easy = sum(r["win_rate"] == 1 for r in recs)
    assert s["splits"]["easy"]["pool"] == n_easy and s["splits"]["hard"]["pool"] == sum(
        r["win_rate"] <= 0.25 for r in recs) and s["splits"]["uniform"]["pool"] == 200
    assert len(easy) == len(uni) == len(hard) == 30
    assert all(r["win_rate"] == 1.0 for r in easy) and all(r["win_rate"] in (0, 0.25) for r in hard)
    for split in (easy, uni, hard):
        assert [r["i"] for r in split] == sorted({r["i"] for r in split})           # distinct, in file order
    assert len({r["win_rate"] for r in uni}) > 2                                    # uniform spans the range
    assert s["splits"]["easy"]["mean_win_rate"] == 1.0
    # same seed: same bytes (idempotent); another seed: another sample; a small pool is taken whole
    run(capsys, "split-difficulty", "--input", src, "--out-dir", tmp_path / "t", "--records-per-split", 30)
    assert all((tmp_path / "t" / f).read_bytes() == (tmp_path / "s" / f).read_bytes()
               for f in ("easy.jsonl", "uniform.jsonl", "hard.jsonl"))
    run(capsys, "split-difficulty", "--input", src, "--out-dir", tmp_path / "u", "--records-per-split", 30,
        "--seed", 1)
    assert lines(tmp_path / "u" / "uniform.jsonl") != uni
    s = run(capsys, "split-difficulty", "--input", src, "--out-dir", tmp_path / "v", "--records-per-split", 1000)
    assert s["splits"]["easy"]["written"] == n_easy and len(lines(tmp_path / "v" / "uniform.jsonl")) == 200
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "win_rate": 1}, {"prompt": "b", "win_rate": "x"}])
    assert f"{bad}:2: field 'win_rate' must be a number" in fails(capsys, "split-difficulty", "--input", bad,
                                                                  "--out-dir", tmp_path / "w")


# ---------------------------------------------------------------------------------------------------------------
# mix and filter


def test_mix_joins_by_prompt_and_drops_overlong_trajectories(tmp_path, capsys, tok_dir):
    tok = M.load_tokenizer(tok_dir)
    short, long_ = "The answer is \\boxed{19}.", "apple banana cherry " * 10
    limit = max(len(tok.encode(short)), len(tok.encode(short + " "))) + 1   # the longer of them + EOS fits exactly
    assert len(tok.encode(long_)) + 1 > limit
    prompts = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "Q one", "answer": "1"}, {"prompt": "Q two", "answer": 2},
                                                  {"prompt": "Q three", "answer": "3"}])
    traj = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "q  ONE", "response": short}, {"prompt": "Q two", "response": long_},
        {"messages": [{"role": "user", "content": "Q two"}, {"role": "assistant", "content": short + " "}]},
        {"prompt": "Q one", "response": "a later one"}, {"prompt": "unrelated", "response": long_}])
    out = tmp_path / "mix.jsonl"
    s = run(capsys, "mix", "--prompts", prompts, "--trajectories", traj, "--tokenizer", tok_dir, "--out", out,
            "--max-response-tokens", limit)
    assert lines(out) == [{"prompt": "Q one", "answer": "1", "response": short},
                          {"prompt": "Q two", "answer": 2, "response": short + " "}]
    assert (s["prompts"], s["trajectories"], s["matching_trajectories"], s["over_long_trajectories"],
            s["written"], s["unmatched_prompts"]) == (3, 5, 3, 1, 2, 1)
    run(capsys, "mix", "--prompts", out, "--trajectories", traj, "--tokenizer", tok_dir, "--out", tmp_path / "m2.jsonl",
        "--max-response-tokens", limit)
    assert (tmp_path / "m2.jsonl").read_bytes() == out.read_bytes()                # idempotent
    bad = write_jsonl(tmp_path / "badtraj.jsonl", [{"prompt": "Q one", "response": short}, {"prompt": "Q two"}])
    assert f"{bad}:2: missing field 'response'" in fails(capsys, "mix", "--prompts", prompts, "--trajectories", bad,
                                                         "--tokenizer", tok_dir, "--out", tmp_path / "x.jsonl")


def test_filter_by_fields_language_and_token_length(tmp_path, capsys, tok_dir):
    tok = M.load_tokenizer(tok_dir)
    n_prompt = len(tok.encode(C.D.format_prompt(tok, "What is 12 plus 7?")))
    n_resp = len(tok.encode("The answer is \\boxed{19}.")) + 1
    recs = [{"prompt": "What is 12 plus 7?", "answer": "19", "response": "The answer is \\boxed{19}.", "i": 0},
            {"prompt": "What is 12 plus 7?", "answer": "", "response": "r", "i": 1},           # empty answer
            {"prompt": "求 12 加 7", "answer": "19", "response": "r", "i": 2},                  # Chinese
            {"prompt": "What is 12 plus 7? apple", "answer": "19", "response": "r", "i": 3},   # prompt too long
            {"prompt": "What is 12 plus 7?", "answer": "19", "response": "The answer is \\boxed{19}. x", "i": 4}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"
    flags = ["--drop-chinese", "--require-fields", "answer", "response", "--tokenizer", tok_dir,
             "--max-prompt-tokens", n_prompt, "--max-response-tokens", n_resp]
    s = run(capsys, "filter", "--input", src, "--out", out, *flags)
    assert [r["i"] for r in lines(out)] == [0]
    assert s["dropped"] == {"missing answer": 1, "missing response": 0, "chinese": 1, "long prompt": 1,
                            "long response": 1} and (s["records"], s["kept"]) == (5, 1)
    s = run(capsys, "filter", "--input", src, "--out", tmp_path / "o2.jsonl", "--tokenizer", tok_dir,
            "--max-prompt-tokens", n_prompt - 1)                  # one token less: every prompt is too long
    assert s["kept"] == 0 and s["dropped"]["long prompt"] == 5
    run(capsys, "filter", "--input", out, "--out", tmp_path / "o3.jsonl", *flags)
    assert (tmp_path / "o3.jsonl").read_bytes() == out.read_bytes()                # idempotent
    bad = write_jsonl(tmp_path / "bad.jsonl", [recs[0], "[1, 2]"])
    assert f"{bad}:2: expected a JSON object" in fails(capsys, "filter", "--input", bad, "--out", tmp_path / "b.jsonl")
    assert not (tmp_path / "b.jsonl").exists()                                     # no half-written output
    with pytest.raises(SystemExit):
        retu.main(["data", "filter", "--input", str(src), "--out", "x", "--max-prompt-tokens", "5"])


# ---------------------------------------------------------------------------------------------------------------
# embeddings and decontamination


@torch.no_grad()
def naive_embedding(model64, ids: list[int]) -> torch.Tensor:
    """One prompt at a time, no padding, float64: the last token's final hidden state, normalised by hand."""
    h = model64(torch.tensor([ids]), hidden_only=True)[0, -1]
    return h / h.pow(2).sum().sqrt()


def test_embed_equals_naive_per_prompt_float64(tmp_path, emb_dir):
    with pytest.raises(ValueError, match="unexpected tensor .embed_tokens.weight."):   # not a causal LM ...
        M.from_pretrained(emb_dir)
    model = M.from_pretrained(emb_dir, headless=True).eval()                # ... but as an embedding model
    assert model.lm_head is None
    model64 = M.from_pretrained(emb_dir, dtype=torch.float64, headless=True).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 40, (23,), generator=g)]
    got = M.embed(model, seqs, tokens_per_batch=64)           # several padded batches, one sequence alone
    want = torch.stack([naive_embedding(model64, s) for s in seqs]).float()
    assert got.shape == (23, model.config.hidden_size)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(23))
    torch.testing.assert_close(M.embed(model, seqs, tokens_per_batch=10**6), got, atol=2e-6, rtol=0)
    # the usual HF layout ("model." prefix, an lm_head) loads headless to the same embedder
    shutil.copytree(emb_dir, tmp_path / "hf")
    sd = {"model." + k: v for k, v in load_file(emb_dir / "model.safetensors").items()}
    sd["lm_head.weight"] = torch.randn(model.config.vocab_size, model.config.hidden_size)
    save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(M.embed(M.from_pretrained(tmp_path / "hf", headless=True), seqs), got)


def test_embedded_text_format_and_truncation(emb_dir):
    tok, model = M.load_tokenizer(emb_dir), M.from_pretrained(emb_dir, headless=True).eval()
    cfg = C.DecontamConfig(benchmarks=[], train=[], out_dir="", model=str(emb_dir), max_embed_tokens=6)
    texts = ["apple banana cherry copy the word apple", "copy"]
    got, cut = C.embed_texts(model, tok, texts, cfg)
    eos = tok.encode("<|endoftext|>")
    ids = [tok.encode(t)[:5] + eos for t in texts]                     # 5 text tokens + EOS = 6
    assert cut == 1 and len(tok.encode(texts[0])) > 5 >= len(tok.encode(texts[1]))
    torch.testing.assert_close(got, M.embed(model, ids))
    with pytest.raises(C.D.DataError, match="not a single token"):
        C.embed_texts(model, tok, texts, C.DecontamConfig(benchmarks=[], train=[], out_dir="", model="m",
                                                          eos_token="apple banana"))


def _bench_and_train(tmp_path):
    rng = random.Random(1)
    words = ["apple", "banana", "cherry", "copy", "the", "word", "answer", "is", "step", "plus", "what", "final"]

    def prompt():
        return " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + f" {rng.randint(0, 99)}?"
    b1 = [{"problem": prompt(), "answer": str(i)} for i in range(6)]
    b2 = [{"prompt": prompt(), "answer": str(i)} for i in range(5)]
    train = [{"prompt": prompt(), "response": "r"} for _ in range(40)]
    train.insert(17, {"prompt": b1[2]["problem"], "response": "r"})          # planted copies
    train.insert(31, {"prompt": b2[4]["prompt"], "response": "r"})
    paths = (write_jsonl(tmp_path / "bench1.jsonl", b1), write_jsonl(tmp_path / "bench2.jsonl", b2),
             write_jsonl(tmp_path / "train.jsonl", train))
    return paths, b1, b2, train


def test_decontaminate_finds_exactly_the_planted_duplicates(tmp_path, capsys, emb_dir):
    (p1, p2, pt), b1, b2, train = _bench_and_train(tmp_path)
    cfg = C.DecontamConfig(benchmarks=[str(p1), str(p2)], train=[str(pt)], out_dir=str(tmp_path), model=str(emb_dir),
                           train_prompts_per_chunk=7, tokens_per_batch=64, instruction="Find similar problems")
    bench_texts = [r["problem"] for r in b1] + [r["prompt"] for r in b2]
    prog = C.Progress("t", "prompts")
    scores, nearest, extra = C.embedding_scores(bench_texts, C._train_chunks(cfg, prog), cfg)
    assert extra == {"truncated_texts": 0} and prog.done == 42
    # the running max over chunks equals the max over all pairs of naive per-prompt float64 embeddings
    tok = M.load_tokenizer(emb_dir)
    model64 = M.from_pretrained(emb_dir, dtype=torch.float64, headless=True).eval()
    eos = tok.encode("<|endoftext|>")
    assert eos == [M.load_tokenizer(emb_dir).vocab_size - len(SPECIAL_TOKENS)]
    emb = [naive_embedding(model64, tok.encode(f"Instruct: Find similar problems\nQuery:{t}") + eos)
           for t in bench_texts + [r["prompt"] for r in train]]
    sims = torch.stack(emb[:11]) @ torch.stack(emb[11:]).T                  # (11, 42) float64
    torch.testing.assert_close(torch.from_numpy(scores), sims.max(dim=1).values, atol=2e-6, rtol=0)
    assert [n[0] for n in nearest] == [f"{pt}:{j + 1}" for j in sims.argmax(dim=1).tolist()]
    planted = sims.max(dim=1).values > 1 - 1e-6
    assert planted.nonzero()[:, 0].tolist() == [2, 10]
    threshold = float(sims.max(dim=1).values[~planted].max()) + 1e-4     # random tiny model: unrelated texts sit high
    assert threshold < 0.99
    # the command: cleaned files, removed.json with the nearest training prompt, the paper-style counts
    s = run(capsys, "decontaminate", "--benchmarks", p1, p2, "--train", pt, "--model", emb_dir, "--out-dir",
            tmp_path / "clean", "--threshold", threshold, "--train-prompts-per-chunk", 5)
    assert s["benchmarks"] == {"bench1": "6 -> 5", "bench2": "5 -> 4"} and s["train_prompts"] == 42
    assert lines(tmp_path / "clean" / "bench1.jsonl") == b1[:2] + b1[3:]
    assert lines(tmp_path / "clean" / "bench2.jsonl") == b2[:4]
    rep = json.loads((tmp_path / "clean" / "removed.json").read_text())
    (gone,) = rep["benchmarks"]["bench1"]["removed"]
    assert gone["where"] == f"{p1}:3" and gone["nearest_train"] == {"where": f"{pt}:18", "prompt": b1[2]["problem"]}
    assert gone["score"] == pytest.approx(1.0, abs=1e-5)
    assert rep["benchmarks"]["bench2"]["removed"][0]["nearest_train"]["where"] == f"{pt}:32"
    # idempotent: the cleaned benchmarks are clean
    s = run(capsys, "decontaminate", "--benchmarks", tmp_path / "clean" / "bench1.jsonl",
            tmp_path / "clean" / "bench2.jsonl", "--train", pt, "--model", emb_dir, "--out-dir", tmp_path / "again",
            "--threshold", threshold)
    assert s["benchmarks"] == {"bench1": "5 -> 5", "bench2": "4 -> 4"}
    bad = write_jsonl(tmp_path / "badtrain.jsonl", [{"prompt": "a"}, {"prompt": None}])
    assert f"{bad}:2: missing field 'prompt'" in fails(capsys, "decontaminate", "--benchmarks", p1, "--train", bad,
                                                       "--model", emb_dir, "--out-dir", tmp_path / "x")


def test_ngram_overlap_on_hand_counted_cases(tmp_path, capsys):
    bench = ["a b c d e f", "p q r", "Nothing in common here at all", "P, Q: R!"]
    train = ["x A  B c d e y", "z p q r", "p q z r", "c d e f g"]
    chunks = [([f"t:{i + 1}" for i in range(2)], train[:2]), ([f"t:{i + 3}" for i in range(2)], train[2:])]
    scores, nearest = C.ngram_scores(bench, chunks, 4)
    # item 0 has the 4-grams abcd, bcde, cdef: "x a b c d e y" holds the first two, "c d e f g" the third
    # item 1 has 3 words < 4: one 3-gram, found contiguous in "z p q r" only; item 3's punctuation are words
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert nearest[0] == ("t:1", train[0]) and nearest[1] == ("t:2", train[1]) and nearest[2] is None
    scores, _ = C.ngram_scores(bench[:1], chunks[:1], 4)
    assert scores.tolist() == [2 / 3]
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": t, "answer": "1"} for t in bench])
    t = write_jsonl(tmp_path / "t.jsonl", [{"prompt": x} for x in train[:3]])
    s = run(capsys, "decontaminate", "--method", "ngram", "--ngram", 4, "--threshold", 0.5, "--benchmarks", b,
            "--train", t, "--out-dir", tmp_path / "o")
    assert s["benchmarks"] == {"b": "4 -> 2"}                                # 2/3 and 1.0 exceed 0.5
    assert [r["prompt"] for r in lines(tmp_path / "o" / "b.jsonl")] == bench[2:]


# ---------------------------------------------------------------------------------------------------------------
# winrate


def test_winrate_counts_the_scored_samples_and_is_seed_reproducible(tmp_path, capsys, monkeypatch):
    ck = build_checkpoint(tmp_path / "policy")
    # a random tiny model never solves a problem, so the grade here is a deterministic function of the text
    # (verify.score itself is tested in test_verify.py); what is tested is the sampling, counting and plumbing
    monkeypatch.setattr(C.verify, "score", lambda text, gold: float(sum(map(ord, text)) % 2 == 0))
    recs = [{"prompt": f"What is {i} plus 7?", "answer": i + 7, "i": i} for i in range(6)]
    src = write_jsonl(tmp_path / "p.jsonl", recs)
    args = ["winrate", "--input", src, "--model", ck, "--max-new-tokens", 6, "--temperature", 1.0,
            "--prompts-per-batch", 4, "--samples-per-prompt", 4]
    s = run(capsys, *args, "--out", tmp_path / "wr.jsonl", "--samples-out", tmp_path / "samples.jsonl")
    out, samples = lines(tmp_path / "wr.jsonl"), lines(tmp_path / "samples.jsonl")
    assert [{k: r[k] for k in ("prompt", "answer", "i")} for r in out] == recs
    assert all(r["win_rate"] in (0, 0.25, 0.5, 0.75, 1.0) and r["n_attempts"] == 4 for r in out)
    # an independent count from the same samples, regenerated here with the driver's prompt and seeds
    tok, model = M.load_tokenizer(ck), M.from_pretrained(ck).eval()
    stop = sorted(set(tok.eos_token_ids) | set(model.config.eos_token_ids))
    texts = []
    for b in range(2):
        ids = [tok.encode(C.D.format_prompt(tok, r["prompt"])) for r in recs[4 * b:4 * b + 4]]
        for o in rollout.generate(model, ids, n=4, max_new_tokens=6, temperature=1.0, stop_token_ids=stop, seed=b):
            texts.append(tok.decode(o.token_ids[:-1] if o.token_ids[-1] in stop else o.token_ids))
    assert [x["completion"] for x in samples] == texts
    wins = [sum(sum(map(ord, t)) % 2 == 0 for t in texts[4 * i:4 * i + 4]) for i in range(6)]
    assert [r["n_correct"] for r in out] == wins and [r["win_rate"] for r in out] == [w / 4 for w in wins]
    assert len(set(wins)) > 1
    assert sum(s["win_rate_histogram"].values()) == 6 and s["win_rate_histogram"]["0/4"] == wins.count(0)
    run(capsys, *args, "--out", tmp_path / "wr2.jsonl")
    assert (tmp_path / "wr2.jsonl").read_bytes() == (tmp_path / "wr.jsonl").read_bytes()   # same seed, same file
    run(capsys, *args, "--out", tmp_path / "wr3.jsonl", "--seed", 5, "--samples-out", tmp_path / "s3.jsonl")
    assert [x["completion"] for x in lines(tmp_path / "s3.jsonl")] != texts
    bad = write_jsonl(tmp_path / "bad.jsonl", [recs[0], {"prompt": "no answer"}])
    assert f"{bad}:2: missing field 'answer'" in fails(capsys, "winrate", "--input", bad, "--model", ck, "--out",
                                                       tmp_path / "x.jsonl")
