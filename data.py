"""Data for the retu driver: read records, validate them, format prompts, tokenise, pack micro-batches.

Record formats (JSONL, one object per line; or Parquet with the same columns when pyarrow is installed):

    sft    {"prompt": str, "response": str}
           or {"messages": [{"role": ..., "content": ...}, ...]}   (the last turn must be the assistant's;
           only that turn is trained, everything before it is the prompt)
    rl     {"prompt": str, "answer": str | number}   (+ "response": str, the expert trajectory, for the
           Syn-SFT-RL algorithms LUFFY / SRFT / UPT)
    bench  {"prompt" or "problem": str, "answer": str | number}, one file per benchmark

Every record is checked before any training starts; a bad line stops the run with `file:line: what is wrong`
(a `DataError`), never with a traceback from deep inside the training loop.

Prompts go through the tokenizer's chat template as one user turn. By default the paper's math instruction
(step-by-step reasoning, final answer in \\boxed{}) is appended to the user turn after a newline; the paper does
not print its prompt, so the exact wording is the common Qwen-math one and is configurable (empty = no
instruction). `{"messages": ...}` records are used as they are: they already carry their own prompt text.

Tokenisation follows the authors' SFT code (algorithms.md §9): prompt ids = encode(chat-templated prompt),
response ids = encode(response) + [eos]. Prompt and response are encoded separately so the boundary is exact.
The loss covers the response tokens *including the EOS* and nothing of the prompt.

Over-long examples are never silently lost: each loader counts them and applies an explicit policy
("drop", "truncate" (right, as the authors' SFT; the EOS is then cut too) or "error").

Packing is padding-free: the documents of a micro-batch are concatenated into one (1, N) row and described by
`cu_seqlens`; attention is block-diagonal so nothing leaks between documents.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
OVERLONG_POLICIES = ("drop", "truncate", "error")


class DataError(ValueError):
    """A problem with the user's data, reported as `file:line: message`."""


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating records


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """All records of a .jsonl (or .parquet) file as (location "file:line", record) pairs, in file order."""
    records = list(iter_records(path))
    if not records:
        raise DataError(f"{path}: the file has no records")
    return records


def iter_records(path: str | os.PathLike):
    """read_records one record at a time (a JSONL file is never held in memory whole; an empty file yields
    nothing): for files too large to load, e.g. the training sets that `retu.py data decontaminate` streams."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert to JSONL") from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i + 1}", row
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no record
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def _text(rec: dict, key: str, where: str, *, allow_number: bool = False) -> str:
    """The non-empty string field `key` of a record (numbers accepted for answers)."""
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    v = rec[key]
    if allow_number and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return v


def _messages(rec: dict, where: str) -> list[dict]:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(f"{where}: field 'messages' must be a list of at least 2 turns")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: field 'messages[{i}].content' must be a string")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages': the last turn must have role 'assistant' (it is trained)")
    if not msgs[-1]["content"].strip():
        raise DataError(f"{where}: field 'messages[{len(msgs) - 1}].content' (the trained response) is empty")
    return msgs


# ----------------------------------------------------------------------------------------------------------------
# Prompt formatting and tokenisation


def format_prompt(tokenizer, prompt: str, instruction: str = PAPER_INSTRUCTION) -> str:
    """One user turn through the chat template, ready for the assistant's answer."""
    content = f"{prompt}\n{instruction}" if instruction else prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def eos_id(tokenizer) -> int:
    """The token appended to every trained response: the tokenizer's eos_token (tokenizer_config.json), as the
    authors' SFT appends tokenizer.eos_token (for a Qwen2.5 base model <|endoftext|>, for instruct <|im_end|>).
    Generation stops at any of tokenizer.eos_token_ids, which also include the chat format's end of turn."""
    return int(tokenizer.eos_token_ids[0])


@dataclass
class OverlongReport:
    """How many examples of a file were too long and what was done with them."""
    path: str
    total: int
    overlong: int
    policy: str

    def message(self) -> str:
        return f"{self.path}: {self.overlong} of {self.total} examples over-long ({self.policy})"


@dataclass
class TokenizedSFT:
    """Tokenised SFT examples stored flat: example i is tokens[offsets[i]:offsets[i+1]], its first
    n_prompt[i] tokens are the prompt (not trained), the rest the response ending in EOS (trained)."""
    tokens: np.ndarray      # (total_tokens,) int32
    offsets: np.ndarray     # (n + 1,) int64
    n_prompt: np.ndarray    # (n,) int64
    where: list[str]        # "file:line" of each example, for messages about it
    report: OverlongReport

    def __len__(self) -> int:
        return len(self.n_prompt)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]], int(self.n_prompt[i])

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


def _apply_overlong(prompt: list[int], response: list[int], max_len: int, policy: str, where: str):
    """(prompt, response) cut to max_len tokens per the policy, or None to drop the example."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    if policy == "error":
        raise DataError(f"{where}: example has {len(prompt) + len(response)} tokens > max_seq_len {max_len} "
                        "(use --overlong drop|truncate to handle over-long examples)")
    if policy == "drop" or len(prompt) >= max_len:
        return None  # a prompt that alone fills the window leaves nothing to train on
    return prompt, response[: max_len - len(prompt)]


def load_sft(path: str, tokenizer, *, max_seq_len: int, overlong: str = "drop",
             instruction: str = PAPER_INSTRUCTION) -> TokenizedSFT:
    """Read, validate and tokenise an SFT file (all of it, before training starts)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong policy must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    records = read_records(path)
    eos = eos_id(tokenizer)
    chunks, n_prompt, wheres, offsets, n_over = [], [], [], [0], 0
    for where, rec in records:
        if "messages" in rec:
            msgs = _messages(rec, where)
            prompt_text = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
            response_text = msgs[-1]["content"]
        else:
            prompt_text = format_prompt(tokenizer, _text(rec, "prompt", where), instruction)
            response_text = _text(rec, "response", where)
        prompt_ids, response_ids = tokenizer.encode(prompt_text), tokenizer.encode(response_text) + [eos]
        n_over += len(prompt_ids) + len(response_ids) > max_seq_len
        pair = _apply_overlong(prompt_ids, response_ids, max_seq_len, overlong, where)
        if pair is None:
            continue
        p, r = pair
        chunks.append(np.asarray(p + r, dtype=np.int32))
        n_prompt.append(len(p))
        wheres.append(where)
        offsets.append(offsets[-1] + len(p) + len(r))
    report = OverlongReport(path, len(records), n_over, overlong)
    if not chunks:
        raise DataError(f"{path}: no example fits max_seq_len {max_seq_len} ({report.message()})")
    return TokenizedSFT(np.concatenate(chunks), np.asarray(offsets, dtype=np.int64),
                        np.asarray(n_prompt, dtype=np.int64), wheres, report)


@dataclass
class RLPrompt:
    """One RL / benchmark problem: the tokenised prompt, the gold answer, optionally an expert trajectory."""
    prompt_ids: list[int]
    answer: str
    where: str
    expert_ids: list[int] | None = None   # response tokens + EOS (Syn-SFT-RL only)
    problem: str = ""                     # the raw problem text (for logs / eval dumps)


def load_prompts(path: str, tokenizer, *, max_prompt_len: int, need_expert: bool = False,
                 max_response_len: int | None = None, overlong: str = "drop",
                 instruction: str = PAPER_INSTRUCTION, benchmark: bool = False,
                 ) -> tuple[list[RLPrompt], OverlongReport]:
    """Read, validate and tokenise an RL prompt file (or a benchmark file when benchmark=True, which also accepts
    "problem" for the prompt). Over-long prompts, or expert trajectories longer than max_response_len, follow
    `overlong` ("truncate" cuts the expert trajectory only; a prompt is never truncated)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong policy must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    records = read_records(path)
    eos = eos_id(tokenizer)
    out, n_over = [], 0
    for where, rec in records:
        key = "problem" if benchmark and "prompt" not in rec and "problem" in rec else "prompt"
        problem = _text(rec, key, where)
        answer = _text(rec, "answer", where, allow_number=True)
        ids = tokenizer.encode(format_prompt(tokenizer, problem, instruction))
        expert = tokenizer.encode(_text(rec, "response", where)) + [eos] if need_expert else None
        too_long = len(ids) > max_prompt_len or (expert is not None and max_response_len is not None
                                                 and len(expert) > max_response_len)
        if too_long:
            n_over += 1
            if overlong == "error":
                raise DataError(f"{where}: prompt has {len(ids)} tokens (max_prompt_len {max_prompt_len})"
                                + (f", expert response {len(expert)} (max_response_len {max_response_len})"
                                   if expert is not None else "")
                                + "; use --overlong drop to skip such examples")
            if overlong == "drop" or len(ids) > max_prompt_len:
                continue
            expert = expert[:max_response_len]
        out.append(RLPrompt(ids, answer, where, expert, problem))
    report = OverlongReport(path, len(records), n_over, overlong)
    if not out:
        raise DataError(f"{path}: no usable example ({report.message()})")
    return out, report


# ----------------------------------------------------------------------------------------------------------------
# Splitting a global batch across ranks and packing micro-batches


def balance_across_ranks(weights: list[int], world_size: int) -> list[list[int]]:
    """Indices of items per rank, balancing the summed weight (longest first onto the lightest rank, ties to the
    lowest rank), each rank's list in ascending index order. Deterministic: every rank computes the same split."""
    loads = [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += weights[i]
    return [sorted(p) for p in parts]


def pack_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group item indices into micro-batches of at most max_tokens tokens (first-fit decreasing)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_tokens:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit tokens_per_microbatch {max_tokens}")
        for b in range(len(bins)):
            if room[b] >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


@dataclass
class Packed:
    """One padding-free micro-batch: documents concatenated into a single row."""
    input_ids: torch.Tensor    # (1, N) long
    targets: torch.Tensor      # (1, N) long, the next token of each position (0 where unused)
    loss_mask: torch.Tensor    # (1, N) float, 1 where the target is a trained token
    cu_seqlens: torch.Tensor   # (n_docs + 1,) int32

    def to(self, device) -> Packed:
        return Packed(*(t.to(device) for t in (self.input_ids, self.targets, self.loss_mask, self.cu_seqlens)))


def pack_sequences(seqs: list[tuple[np.ndarray | list[int], int]]) -> Packed:
    """Pack (tokens, n_prompt) documents. Each document of L tokens contributes its first L-1 tokens as inputs
    with the next token as target; position t is trained iff the target tokens[t+1] is a response token
    (t + 1 >= n_prompt), so the whole response, EOS included, is trained and no prompt token is."""
    ids, tgt, mask, cu = [], [], [], [0]
    for tokens, n_prompt in seqs:
        tokens = np.asarray(tokens, dtype=np.int64)
        L = len(tokens)
        if L < 2:
            raise ValueError("a document needs at least 2 tokens to have a target")
        ids.append(tokens[:-1])
        tgt.append(tokens[1:])
        mask.append((np.arange(1, L) >= n_prompt).astype(np.float32))
        cu.append(cu[-1] + L - 1)
    return Packed(torch.from_numpy(np.concatenate(ids))[None],
                  torch.from_numpy(np.concatenate(tgt))[None],
                  torch.from_numpy(np.concatenate(mask))[None],
                  torch.tensor(cu, dtype=torch.int32))
