"""curate.py -- the paper's data pipeline (App. E, Sec. 5.1) as `retu.py data <command>`.

    python retu.py data dedup      --inputs a.jsonl b.jsonl --out-dir dedup/          # prompt-level deduplication
    python retu.py data winrate    --input pool.jsonl --model R1-Distill-1.5B --out pool_wr.jsonl   # WR = S/N
    python retu.py data split-difficulty --input pool_wr.jsonl --out-dir splits/      # easy / uniform / hard
    python retu.py data mix        --prompts rl62k.jsonl --trajectories sft889k.jsonl --tokenizer M --out mix37k.jsonl
    python retu.py data filter     --input in.jsonl --out out.jsonl --drop-chinese --require-fields prompt answer
    python retu.py data decontaminate --benchmarks gsm8k.jsonl math500.jsonl --train sft889k.jsonl rl62k.jsonl \\
                                      --model Qwen3-Embedding-8B --out-dir clean/     # or --method ngram

Every command reads JSONL (or Parquet) through data.py, so a malformed line stops it with `file:line: ...`;
writes JSONL atomically (a temporary file renamed over the target: a crash never leaves half a file); prints
progress to stderr and a summary of counts to stdout. Every command is idempotent: run on its own output with
the same flags it changes nothing. Outputs keep each record's fields and order.

The prompt of a record is its "prompt" field, else "problem" (benchmarks), else the first user turn of
"messages" (`--prompt-field` picks another field). Prompts match after normalisation (`normalize_prompt`:
Unicode NFKC, case folding, runs of whitespace -> one space), or exactly with --no-normalize.

Token lengths are counted the way the driver counts them, so a filtered file never trips `retu.py rl`'s limits:
a prompt is the chat-templated prompt with the instruction; a response (expert trajectory) is its tokens + EOS.

Decontamination (`decontaminate --method embedding`, the paper's): benchmark items and training prompts are
embedded with a local HF-format Qwen3-Embedding checkpoint (model.embed: last-token pooling, L2 norm). The text
is the same on both sides, because both are problems rather than a query and a document: the plain prompt, or
`Instruct: {instruction}\\nQuery:{prompt}` when --instruction is given, then the EOS <|endoftext|>. A benchmark
item is removed when its maximum cosine similarity to any training prompt exceeds --threshold (paper: 0.8).
Benchmark embeddings (B, H) stay resident; training prompts stream through in chunks, one (B, chunk) matrix
product per chunk updates a running maximum, on the GPU when there is one. `--method ngram` is a cheap second
opinion: the fraction of an item's word n-grams that occur in some training prompt.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

import cli
import data as D
import model as M
import rollout
import verify
from cli import opt

# ----------------------------------------------------------------------------------------------------------------
# Configs (one per command); flags are generated from the fields


@dataclass(kw_only=True)
class _Common:
    prompt_field: str = opt("prompt", "field holding the prompt (prompt: falls back to problem, then messages)")
    progress_every_s: float = opt(10.0, "seconds between progress lines on stderr")


@dataclass(kw_only=True)
class DedupConfig(_Common):
    """prompt-level deduplication within and across files"""

    inputs: list[str] = opt(help="files to deduplicate together (.jsonl/.parquet)")
    out_dir: str = opt(help="one deduplicated <name>.jsonl per input is written here")
    normalize: bool = opt(True, "match normalised prompts (NFKC, case, whitespace); --no-normalize: exact text")
    keep: str = opt("first", "which record of a duplicate group survives: first | last (files in the given order, "
                             "lines in file order) | longest-response | shortest-response (in characters; ties: the "
                             "first)")

    def __post_init__(self):
        if self.keep not in ("first", "last", "longest-response", "shortest-response"):
            raise ValueError("--keep must be first | last | longest-response | shortest-response")


@dataclass(kw_only=True)
class WinrateConfig(_Common):
    """win rate WR = S/N of each prompt: N sampled attempts of a model, scored by verify.py"""

    input: str = opt(help="prompts with gold answers: {prompt|problem, answer, ...}")
    model: str = opt(help="HF checkpoint directory that attempts the prompts (paper: DeepSeek-R1-Distill-1.5B)")
    out: str = opt(help="output .jsonl: each record + win_rate, n_correct, n_attempts")
    samples_per_prompt: int = opt(4, "attempts N per prompt (paper: 4)")
    temperature: float = opt(0.7, "sampling temperature (the paper states none for WR; its evaluation uses 0.7)")
    top_p: float = opt(1.0, "nucleus sampling")
    max_new_tokens: int = opt(8192, "generation budget per attempt")
    max_prompt_len: int = opt(4096, "longer (chat-templated) prompts are counted and skipped")
    instruction: str = opt(D.PAPER_INSTRUCTION, "appended to each prompt ('' for none)")
    answer_field: str = opt("answer", "field holding the gold answer")
    prompts_per_batch: int = opt(256, "prompts per generation call (bounds memory; progress is per batch)")
    samples_out: str = opt("", "also write every attempt {where, sample, completion, score} here")
    seed: int = opt(0, "sampling seed (batch b uses seed + b): the same seed gives the same win rates")
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda")
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")

    def __post_init__(self):
        if self.samples_per_prompt < 1 or self.prompts_per_batch < 1:
            raise ValueError("--samples-per-prompt and --prompts-per-batch must be >= 1")


@dataclass(kw_only=True)
class SplitConfig(_Common):
    """Easy (WR = 1), Uniform (a uniform sample of all) and Hard (WR <= 0.25) subsets of a win-rate file"""

    input: str = opt(help="records with a win_rate field (the output of `data winrate`)")
    out_dir: str = opt(help="easy.jsonl, uniform.jsonl and hard.jsonl are written here")
    records_per_split: int = opt(102400, "target size of each subset (paper: 102.4K); a smaller pool is taken whole")
    easy_min_win_rate: float = opt(1.0, "Easy: win_rate >= this (paper: 1.0)")
    hard_max_win_rate: float = opt(0.25, "Hard: win_rate <= this (paper: 0 or 0.25 with N = 4)")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self):
        if self.records_per_split < 1:
            raise ValueError("--records-per-split must be >= 1")


@dataclass(kw_only=True)
class MixConfig(_Common):
    """join RL prompts with expert trajectories by prompt, dropping trajectories over a token limit (MIX37K)"""

    prompts: str = opt(help="RL prompts {prompt, answer, ...} (paper: RL62K)")
    trajectories: str = opt(help="expert trajectories {prompt, response} or {messages} (paper: SFT889K)")
    tokenizer: str = opt(help="directory with the policy model's tokenizer (lengths are counted with it)")
    out: str = opt(help="output .jsonl: each matched prompt record + response (the first fitting trajectory)")
    max_response_tokens: int = opt(8192, "drop trajectories longer than this, EOS included (paper: 8192)")
    normalize: bool = opt(True, "match normalised prompts; --no-normalize: exact text")


@dataclass(kw_only=True)
class FilterConfig(_Common):
    """keep records by token length, language and field presence"""

    input: str = opt(help="input file")
    out: str = opt(help="output .jsonl")
    tokenizer: str = opt("", "tokenizer directory (needed for the token limits)")
    max_prompt_tokens: int = opt(0, "drop prompts longer than this, chat template and instruction included (0: off)")
    max_response_tokens: int = opt(0, "drop responses longer than this, EOS included (0: off)")
    instruction: str = opt(D.PAPER_INSTRUCTION, "instruction counted in the prompt length ('' for none)")
    drop_chinese: bool = opt(False, "drop prompts containing Chinese (Han) characters (paper: RL62K)")
    require_fields: list[str] = opt([], "drop records missing any of these fields (absent, null or empty)")

    def __post_init__(self):
        if (self.max_prompt_tokens or self.max_response_tokens) and not self.tokenizer:
            raise ValueError("--max-prompt-tokens / --max-response-tokens need --tokenizer")


@dataclass(kw_only=True)
class DecontamConfig(_Common):
    """remove benchmark items similar to training prompts (embedding cosine > 0.8, or n-gram overlap)"""

    benchmarks: list[str] = opt(help="benchmark files, one per benchmark (its name is the file name)")
    train: list[str] = opt(help="training files (streamed, any size)")
    out_dir: str = opt(help="cleaned <bench>.jsonl files and removed.json are written here")
    method: str = opt("embedding", "embedding | ngram")
    threshold: float = opt(0.8, "remove an item whose score exceeds this: max cosine (paper: 0.8) or n-gram fraction")
    model: str = opt("", "embedding model directory (HF format, Qwen3-Embedding; paper: Qwen3-Embedding-8B)")
    instruction: str = opt("", "Qwen3-Embedding task instruction; set: both sides are 'Instruct: ...\\nQuery:...'")
    eos_token: str = opt("<|endoftext|>", "token appended to every embedded text (Qwen3-Embedding's)")
    max_embed_tokens: int = opt(2048, "longer texts are truncated (counted) before the EOS")
    tokens_per_batch: int = opt(16384, "padded tokens per embedding forward")
    train_prompts_per_chunk: int = opt(8192, "training prompts embedded and compared per chunk")
    ngram: int = opt(8, "n of the word n-grams (--method ngram); shorter items use all their words as one gram")
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda")
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")

    def __post_init__(self):
        if self.method not in ("embedding", "ngram"):
            raise ValueError("--method must be embedding | ngram")
        if not 0 <= self.threshold <= 1:
            raise ValueError("--threshold must be in [0, 1]")
        if self.method == "embedding" and not self.model:
            raise ValueError("--method embedding needs --model (an embedding model directory)")
        if min(self.ngram, self.max_embed_tokens - 1, self.tokens_per_batch, self.train_prompts_per_chunk) < 1:
            raise ValueError("--ngram, --tokens-per-batch, --train-prompts-per-chunk must be >= 1, "
                             "--max-embed-tokens >= 2")


COMMANDS = {"dedup": DedupConfig, "winrate": WinrateConfig, "split-difficulty": SplitConfig, "mix": MixConfig,
            "filter": FilterConfig, "decontaminate": DecontamConfig}


# ----------------------------------------------------------------------------------------------------------------
# Records: prompts, normalisation, progress, atomic output


def normalize_prompt(text: str) -> str:
    """The key prompts are matched by: NFKC (full-width forms, ligatures), case folded, whitespace runs -> ' '."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _field(rec: dict, key: str, where: str, *, allow_number: bool = False) -> str:
    v = rec.get(key)
    if v is None:
        raise D.DataError(f"{where}: missing field '{key}'")
    if allow_number and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise D.DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise D.DataError(f"{where}: field '{key}' is empty")
    return v


def _turn(rec: dict, where: str, role: str, last: bool) -> str:
    msgs = rec["messages"]
    turns = [m for m in msgs if isinstance(m, dict) and m.get("role") == role] if isinstance(msgs, list) else []
    if not turns or not isinstance(turns[-1 if last else 0].get("content"), str):
        raise D.DataError(f"{where}: field 'messages' has no {role} turn with a string content")
    return turns[-1 if last else 0]["content"]


def prompt_of(rec: dict, where: str, key: str = "prompt") -> str:
    """The prompt text of a record (see the module docstring)."""
    if key == "prompt" and "prompt" not in rec:
        if "problem" in rec:
            key = "problem"
        elif "messages" in rec:
            return _turn(rec, where, "user", last=False)
    return _field(rec, key, where)


def response_of(rec: dict, where: str) -> str:
    """The response (expert trajectory) of a record: "response", else the last assistant turn of "messages"."""
    if "response" not in rec and "messages" in rec:
        return _turn(rec, where, "assistant", last=True)
    return _field(rec, "response", where)


_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def has_chinese(text: str) -> bool:
    """True if the text contains a CJK unified / compatibility ideograph (Han characters, so Japanese kanji too)."""
    return _HAN.search(text) is not None


class Progress:
    """`label: done[/total] unit (rate/s)` on stderr, at most every `every_s` seconds, and once by close()."""

    def __init__(self, label: str, unit: str, total: int | None = None, every_s: float = 10.0):
        self.label, self.unit, self.total, self.every_s = label, unit, total, every_s
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.every_s:
            self._print()

    def _print(self) -> None:
        self.last = time.monotonic()
        total = f"/{self.total}" if self.total is not None else ""
        rate = self.done / max(self.last - self.start, 1e-9)
        print(f"{self.label}: {self.done}{total} {self.unit} ({rate:.1f}/s)", file=sys.stderr, flush=True)

    def close(self) -> float:
        """Print the final line; returns the throughput (units per second)."""
        self._print()
        return self.done / max(self.last - self.start, 1e-9)


class JSONLWriter:
    """Writes records to a temporary file next to `path` and renames it over `path` on success only."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(self.path))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)        # mkstemp makes it 0600; the output is shared like any file
        self.f = os.fdopen(fd, "w", encoding="utf-8")
        self.n = 0

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.n += 1

    def __enter__(self) -> JSONLWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


def write_jsonl(path: str, records) -> int:
    with JSONLWriter(path) as w:
        for rec in records:
            w.write(rec)
    return w.n


def _out_names(paths: list[str], out_dir: str) -> list[str]:
    """out_dir/<stem>.jsonl for each input; two inputs with one stem would overwrite each other."""
    outs = [os.path.join(out_dir, os.path.splitext(os.path.basename(p))[0] + ".jsonl") for p in paths]
    for i, o in enumerate(outs):
        if o in outs[:i]:
            raise D.DataError(f"{paths[i]}: another input has the same name; its output {o} would be overwritten")
    return outs


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
          "bfloat16": torch.bfloat16}
    if dtype not in dt:
        raise D.DataError(f"--dtype must be one of {sorted(dt)}, got {dtype!r}")
    return dev, dt[dtype]


# ----------------------------------------------------------------------------------------------------------------
# dedup


def run_dedup(cfg: DedupConfig) -> dict:
    """Records whose prompts match (normalised or exact) form a group; one record per group survives."""
    outs = _out_names(cfg.inputs, cfg.out_dir)
    files = [D.read_records(p) for p in cfg.inputs]
    prog = Progress("dedup", "records", sum(map(len, files)), cfg.progress_every_s)
    best: dict[str, tuple[int, int, float]] = {}        # key -> (file, index, response length) of the survivor
    members: dict[str, int] = {}
    for fi, recs in enumerate(files):
        for ri, (where, rec) in enumerate(recs):
            p = prompt_of(rec, where, cfg.prompt_field)
            key = normalize_prompt(p) if cfg.normalize else p
            n = len(response_of(rec, where)) if cfg.keep.endswith("-response") else 0
            members[key] = members.get(key, 0) + 1
            old = best.get(key)
            if (old is None or cfg.keep == "last" or (cfg.keep == "longest-response" and n > old[2])
                    or (cfg.keep == "shortest-response" and n < old[2])):
                best[key] = (fi, ri, n)
            prog.update()
    prog.close()
    kept = {(fi, ri) for fi, ri, _ in best.values()}
    summary = {"files": {}, "duplicate_groups": sum(c > 1 for c in members.values()),
               "records": sum(map(len, files)), "kept": len(kept)}
    for fi, (path, out) in enumerate(zip(cfg.inputs, outs)):
        n = write_jsonl(out, (rec for ri, (_, rec) in enumerate(files[fi]) if (fi, ri) in kept))
        summary["files"][path] = {"original": len(files[fi]), "kept": n, "out": out}
    return summary


# ----------------------------------------------------------------------------------------------------------------
# winrate and split-difficulty


def run_winrate(cfg: WinrateConfig) -> dict:
    """WR = S/N with S the attempts verify.score grades correct. The prompt is chat-templated with the instruction
    exactly as `retu.py rl` / `eval` do, and the stop tokens are the tokenizer's and the model's EOS ids."""
    tok = M.load_tokenizer(cfg.model)
    records = D.read_records(cfg.input)
    items, skipped = [], 0
    for where, rec in records:
        ids = tok.encode(D.format_prompt(tok, prompt_of(rec, where, cfg.prompt_field), cfg.instruction))
        answer = _field(rec, cfg.answer_field, where, allow_number=True)
        if len(ids) > cfg.max_prompt_len:
            skipped += 1
            continue
        items.append((where, rec, ids, answer))
    if not items:
        raise D.DataError(f"{cfg.input}: every prompt is longer than --max-prompt-len {cfg.max_prompt_len}")
    dev, dtype = _device_dtype(cfg.device, cfg.dtype)
    model = M.from_pretrained(cfg.model, dtype=dtype, device=dev).eval()
    stop = set(tok.eos_token_ids) | set(model.config.eos_token_ids)
    prog = Progress("winrate", "prompts", len(items), cfg.progress_every_s)
    hist = np.zeros(cfg.samples_per_prompt + 1, dtype=np.int64)         # prompts with S = 0 .. N correct
    with JSONLWriter(cfg.out) as w, (JSONLWriter(cfg.samples_out) if cfg.samples_out else nullcontext()) as samples:
        for b, s in enumerate(range(0, len(items), cfg.prompts_per_batch)):
            batch = items[s:s + cfg.prompts_per_batch]
            outs = rollout.generate(model, [ids for _, _, ids, _ in batch], n=cfg.samples_per_prompt,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, stop_token_ids=sorted(stop), seed=cfg.seed + b)
            correct = [0] * len(batch)
            for o in outs:                  # ordered by (prompt, sample)
                ids = o.token_ids[:-1] if o.token_ids and o.token_ids[-1] in stop else o.token_ids
                text = tok.decode(ids)
                score = float(verify.score(text, batch[o.prompt_index][3]))
                correct[o.prompt_index] += score == 1.0
                if samples:
                    samples.write({"where": batch[o.prompt_index][0], "sample": o.sample_index, "completion": text,
                                   "score": score})
            for (_, rec, _, _), c in zip(batch, correct):
                w.write({**rec, "win_rate": c / cfg.samples_per_prompt, "n_correct": c,
                         "n_attempts": cfg.samples_per_prompt})
                hist[c] += 1
            prog.update(len(batch))
    return {"records": len(records), "scored": len(items), "skipped_long_prompts": skipped,
            "prompts_per_s": prog.close(), "out": cfg.out,
            "win_rate_histogram": {f"{k}/{cfg.samples_per_prompt}": int(v) for k, v in enumerate(hist)}}


def run_split(cfg: SplitConfig) -> dict:
    """Easy / Uniform / Hard102K: each a uniform random sample (seeded, per split) of its pool, kept in file
    order. Uniform samples all records, as the paper's Uniform102K samples all of amthink-40m."""
    records = D.read_records(cfg.input)
    wr = []
    for where, rec in records:
        v = rec.get("win_rate")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise D.DataError(f"{where}: field 'win_rate' must be a number in [0, 1], got {v!r} "
                              "(run `retu.py data winrate` first)")
        wr.append(float(v))
    wr = np.asarray(wr)
    pools = {"easy": np.flatnonzero(wr >= cfg.easy_min_win_rate), "uniform": np.arange(len(wr)),
             "hard": np.flatnonzero(wr <= cfg.hard_max_win_rate)}
    summary = {"records": len(records), "splits": {}}
    for k, (name, pool) in enumerate(pools.items()):
        rng = np.random.default_rng([cfg.seed, k])
        take = pool if len(pool) <= cfg.records_per_split else np.sort(
            rng.choice(pool, cfg.records_per_split, replace=False))
        out = os.path.join(cfg.out_dir, f"{name}.jsonl")
        write_jsonl(out, (records[i][1] for i in take))
        summary["splits"][name] = {"pool": len(pool), "written": len(take), "requested": cfg.records_per_split,
                                   "mean_win_rate": float(wr[take].mean()) if len(take) else None, "out": out}
    return summary


# ----------------------------------------------------------------------------------------------------------------
# mix and filter


def run_mix(cfg: MixConfig) -> dict:
    """Each RL prompt gets the first trajectory (file order) with the same prompt that fits the token limit;
    prompts without one are dropped. The trajectories file is streamed: only matching ones are tokenised."""
    tok = M.load_tokenizer(cfg.tokenizer)
    prompts = D.read_records(cfg.prompts)
    keys = []
    for where, rec in prompts:
        p = prompt_of(rec, where, cfg.prompt_field)
        keys.append(normalize_prompt(p) if cfg.normalize else p)
    wanted, found = set(keys), {}
    n_traj = n_match = n_long = 0
    prog = Progress("mix", "trajectories", None, cfg.progress_every_s)
    for where, rec in D.iter_records(cfg.trajectories):
        n_traj += 1
        prog.update()
        p = prompt_of(rec, where, cfg.prompt_field)
        key = normalize_prompt(p) if cfg.normalize else p
        if key not in wanted or key in found:
            continue
        n_match += 1
        response = response_of(rec, where)
        if len(tok.encode(response)) + 1 > cfg.max_response_tokens:    # + the EOS the driver appends
            n_long += 1
            continue
        found[key] = response
    prog.close()
    if n_traj == 0:
        raise D.DataError(f"{cfg.trajectories}: the file has no records")
    n = write_jsonl(cfg.out, ({**rec, "response": found[k]} for (_, rec), k in zip(prompts, keys) if k in found))
    return {"prompts": len(prompts), "trajectories": n_traj, "matching_trajectories": n_match,
            "over_long_trajectories": n_long, "written": n, "unmatched_prompts": len(prompts) - n, "out": cfg.out}


def run_filter(cfg: FilterConfig) -> dict:
    """Streams the input; a record is dropped for the first failing check (fields, Chinese, prompt, response)."""
    tok = M.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    eos = [D.eos_id(tok)] if tok else []
    dropped = {f"missing {f}": 0 for f in cfg.require_fields}
    dropped.update({"chinese": 0, "long prompt": 0, "long response": 0})
    total = 0
    prog = Progress("filter", "records", None, cfg.progress_every_s)
    with JSONLWriter(cfg.out) as w:
        for where, rec in D.iter_records(cfg.input):
            total += 1
            prog.update()
            missing = [f for f in cfg.require_fields if rec.get(f) is None or rec.get(f) in ("", [], {})]
            if missing:
                dropped[f"missing {missing[0]}"] += 1
                continue
            prompt = prompt_of(rec, where, cfg.prompt_field) if cfg.drop_chinese or cfg.max_prompt_tokens else ""
            if cfg.drop_chinese and has_chinese(prompt):
                dropped["chinese"] += 1
            elif cfg.max_prompt_tokens and len(tok.encode(D.format_prompt(tok, prompt, cfg.instruction))) > \
                    cfg.max_prompt_tokens:
                dropped["long prompt"] += 1
            elif cfg.max_response_tokens and len(tok.encode(response_of(rec, where)) + eos) > cfg.max_response_tokens:
                dropped["long response"] += 1
            else:
                w.write(rec)
    prog.close()
    if total == 0:
        raise D.DataError(f"{cfg.input}: the file has no records")
    return {"records": total, "kept": w.n, "dropped": dropped, "out": cfg.out}


# ----------------------------------------------------------------------------------------------------------------
# decontaminate


def embed_texts(model, tok, texts: list[str], cfg: DecontamConfig) -> tuple[torch.Tensor, int]:
    """(N, H) unit vectors of texts in the Qwen3-Embedding input format; also the number truncated."""
    eos = tok.encode(cfg.eos_token)
    if len(eos) != 1:
        raise D.DataError(f"--eos-token {cfg.eos_token!r} is not a single token of the embedding tokenizer")
    ids, cut = [], 0
    for t in texts:
        t = f"Instruct: {cfg.instruction}\nQuery:{t}" if cfg.instruction else t
        x = tok.encode(t)
        cut += len(x) > cfg.max_embed_tokens - 1
        ids.append(x[:cfg.max_embed_tokens - 1] + eos)
    return M.embed(model, ids, cfg.tokens_per_batch), cut


def _train_chunks(cfg: DecontamConfig, prog: Progress):
    """(wheres, prompts) of the training files, train_prompts_per_chunk at a time, streamed."""
    wheres, texts = [], []
    for path in cfg.train:
        for where, rec in D.iter_records(path):
            wheres.append(where)
            texts.append(prompt_of(rec, where, cfg.prompt_field))
            if len(texts) == cfg.train_prompts_per_chunk:
                yield wheres, texts
                prog.update(len(texts))
                wheres, texts = [], []
    if texts:
        yield wheres, texts
        prog.update(len(texts))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", normalize_prompt(text))


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def ngram_scores(bench: list[str], chunks, n: int) -> tuple[np.ndarray, list]:
    """score[i] = fraction of item i's word n-grams (all its words as one gram if it has fewer than n) that occur
    in some training prompt, and the training prompt (where, text) sharing most grams with it (None if none)."""
    item_grams = []
    for t in bench:
        w = _words(t)
        item_grams.append(_grams(w, min(n, len(w))) if w else set())
    index: dict[tuple, list[int]] = {}
    for i, gs in enumerate(item_grams):
        for g in gs:
            index.setdefault(g, []).append(i)
    lengths = sorted({len(g) for g in index})
    found: set[tuple] = set()
    best = np.zeros(len(bench), dtype=np.int64)
    nearest: list = [None] * len(bench)
    for wheres, texts in chunks:
        for where, text in zip(wheres, texts):
            w = _words(text)
            hits = [g for k in lengths for g in _grams(w, k) if g in index]
            if not hits:
                continue
            found.update(hits)
            counts: dict[int, int] = {}
            for g in hits:
                for i in index[g]:
                    counts[i] = counts.get(i, 0) + 1
            for i, c in counts.items():
                if c > best[i]:
                    best[i], nearest[i] = c, (where, text)
    scores = np.array([len(gs & found) / len(gs) if gs else 0.0 for gs in item_grams])
    return scores, nearest


def embedding_scores(bench: list[str], chunks, cfg: DecontamConfig) -> tuple[np.ndarray, list, dict]:
    """Maximum cosine of each benchmark item over all training prompts and the arg-max prompt: one (B, chunk)
    matrix product per chunk of training prompts, never a loop over pairs."""
    dev, dtype = _device_dtype(cfg.device, cfg.dtype)
    tok = M.load_tokenizer(cfg.model)
    model = M.from_pretrained(cfg.model, dtype=dtype, device=dev, headless=True).eval()
    b, cut = embed_texts(model, tok, bench, cfg)                       # (B, H), resident
    best = torch.full((len(bench),), -2.0, device=dev)
    nearest: list = [None] * len(bench)
    for wheres, texts in chunks:
        e, c = embed_texts(model, tok, texts, cfg)                      # (C, H)
        cut += c
        top, arg = (b @ e.T).max(dim=1)                                 # (B,) best match within the chunk
        better = (top > best).nonzero()[:, 0].tolist()                  # usually few items: copy only their text
        best = torch.maximum(best, top)
        for i, j in zip(better, arg[better].tolist()):
            nearest[i] = (wheres[j], texts[j])
    return best.cpu().double().numpy(), nearest, {"truncated_texts": cut}


def run_decontaminate(cfg: DecontamConfig) -> dict:
    outs = _out_names(cfg.benchmarks, cfg.out_dir)
    benches = [D.read_records(p) for p in cfg.benchmarks]
    items = [(bi, where, rec) for bi, recs in enumerate(benches) for where, rec in recs]
    texts = [prompt_of(rec, where, cfg.prompt_field) for _, where, rec in items]
    prog = Progress("decontaminate", "training prompts", None, cfg.progress_every_s)
    chunks = _train_chunks(cfg, prog)
    if cfg.method == "embedding":
        scores, nearest, extra = embedding_scores(texts, chunks, cfg)
    else:
        scores, nearest = ngram_scores(texts, chunks, cfg.ngram)
        extra = {}
    extra["train_prompts_per_s"] = prog.close()
    extra["train_prompts"] = prog.done
    if prog.done == 0:
        raise D.DataError(f"{' '.join(cfg.train)}: the training files have no records")
    removed = scores > cfg.threshold
    report = {"method": cfg.method, "threshold": cfg.threshold, "benchmarks": {}}
    for bi, (path, out) in enumerate(zip(cfg.benchmarks, outs)):
        mine = [k for k, it in enumerate(items) if it[0] == bi]
        n = write_jsonl(out, (items[k][2] for k in mine if not removed[k]))
        report["benchmarks"][os.path.splitext(os.path.basename(path))[0]] = {
            "original": len(mine), "cleaned": n, "out": out,
            "removed": [{"where": items[k][1], "prompt": texts[k], "score": float(scores[k]),
                         "nearest_train": {"where": nearest[k][0], "prompt": nearest[k][1]}}
                        for k in mine if removed[k]]}
    removed_json = os.path.join(cfg.out_dir, "removed.json")
    with open(removed_json + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
    os.replace(removed_json + ".tmp", removed_json)
    return {"benchmarks": {k: f"{v['original']} -> {v['cleaned']}" for k, v in report["benchmarks"].items()},
            "removed_json": removed_json, **extra}


# ----------------------------------------------------------------------------------------------------------------
# Command line (`retu.py data <command> ...`)


RUNNERS = {"dedup": run_dedup, "winrate": run_winrate, "split-difficulty": run_split, "mix": run_mix,
           "filter": run_filter, "decontaminate": run_decontaminate}


def parse_args(argv: list[str]) -> tuple[str, object]:
    return cli.parse("retu.py data", "the paper's data curation commands", COMMANDS, argv)


def main(argv: list[str]) -> int:
    """`retu.py data <command> --flags`: 0 on success; a problem with the user's input prints
    `retu data: error: ...` and returns 2 (argparse exits with 2 itself for bad flags)."""
    cmd, cfg = parse_args(argv)
    try:
        summary = RUNNERS[cmd](cfg)
    except (D.DataError, FileNotFoundError) as e:
        print(f"retu data: error: {e}", file=sys.stderr)
        return 2
    print(f"retu data {cmd}: " + json.dumps(summary, indent=1, ensure_ascii=False), flush=True)
    return 0
