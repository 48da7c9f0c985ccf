"""verify.py: the math answer verifier (RL reward and evaluation metric).

    score("... so the answer is $\\boxed{\\frac12}$.", "0.5")  -> 1.0
    grade(completion, gold)                  -> Verdict(correct, reason, answer); reasons separate parse failures
    score_batch(completions, golds, workers=4) -> [1.0, 0.0, ...]   # worker processes, hard per-item limit
    python verify.py graded.jsonl --workers 4 --show 20           # {completion, gold} lines -> accuracy

Three modules, imported one way (no cycles): verify.py (this file: which answer counts, when two values are
equal, the public API, batches, the command line) -> mathparse.py (answer text -> typed value, by our own parser;
it also holds VerifyConfig and parse_value, re-exported here) -> mathvalue.py (the typed values, reading them as
sets of reals, our own numeric evaluator, the per-call deadline). verify.py also imports mathvalue.py directly.

The grading policy is ../shared/reference/verifier.md. How we implement it, and the choices it leaves open:
  1. Which answer: the last balanced \\boxed{} / \\fbox{}; boxes side by side in the final statement form one
     multi-part answer, and "or" / "if" between them makes it a hedge. Without a box: the last explicit marker
     ("final answer is", "the answer is", "Answer:", "####", <answer>..</answer>). An unterminated last box gives
     no answer. Choice: a completion with neither is graded only when the whole of it is a bare formula ("72",
     "$\\frac12$"); we never guess a "final statement", so a cut-off text earns nothing for the last number in it.
  2. Parse (mathparse.py): normalise, then read a typed value: Num, Rel (equation / inequality), Tup, RealSet
     (interval, union, one-variable linear or quadratic inequality, set-builder), FSet (set / list / hedge), Mat,
     Text, Choice. Only compatible types compare.
  3. Numbers: rationals compare exactly (10^100 vs 10^100+1 is false); an exact rational difference decides;
     other exact values compare at 30 then 100 significant digits with a *relative* tolerance (1/2004! vs 1/2006!
     is false). Decimal prediction vs exact non-terminating gold: passes with >= 6 significant digits within one
     unit of its last digit (choice: 4-5 digits fail; a reward must not teach rounding). Decimal gold vs decimal
     prediction: exact value (2.65 == 2.650, not 2.654); vs an exact irrational prediction: rounding, if the gold
     has >= 3 significant digits. Symbols: random probe points (mixed signs, fixed seed, 30 digits); equations
     match up to a nonzero factor, inequalities up to a positive one. "50%" reads as 50 or 0.5 (two percents
     compare like with like); a bare number is never rescaled.
Known limits: inequalities beyond linear and quadratic ones are compared as relations, not solution sets;
ratios "3:4" do not parse (both fail closed, to 0.0, unless written exactly as the gold); two distinct exact
values closer than 1e-92 relative (without an exact rational difference) compare equal; sets of dozens of
symbolic elements may run out of budget.

Security: the completion is untrusted. Nothing in the three modules calls eval, exec, sympify or parse_expr:
sympy objects are built by the parser from tokens, and numbers are evaluated by our own magnitude-checked mpmath
walker (mathvalue.py), never by sympy's evalf. Every expensive step is bounded (answer length, nesting depth,
integer bits, exponent, root and factorial sizes, function argument magnitudes, union pieces). Time is bounded
three ways, none of which needs signal.alarm or the main thread: a cooperative deadline checked by the parser and
comparisons (cfg.time_budget_s), a watchdog thread that raises an exception asynchronously inside a call still
running at cfg.hard_limit_s (it stops loops inside sympy; one long C-level operation would finish first, which
the size caps keep short), and in `score_batch` worker processes that are killed at cfg.batch_timeout_s or when
they crash (that item scores 0.0 and the batch goes on). Hostile-grammar fuzzing (12,000 cases) found no call
over 1.5 s.

Deviation from the paper and the authors' code: the paper rewards with Math-Verify; the authors wrap it in a
cascade ending in a Levenshtein ratio > 0.6 fallback (algorithms.md section 10). We implement verifier.md
instead and offer no fuzzy-string option: it is a reward a policy can learn to game.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import multiprocessing as mp
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait

import sympy as sp

from mathparse import CFG, ParseError, VerifyConfig, match_brace, normalize, parse_value
from mathvalue import (
    FLIP,
    LOCAL,
    Choice,
    FSet,
    Mat,
    Num,
    RealSet,
    Rel,
    Text,
    Timeout,
    Tup,
    as_realset,
    mp_ctx,
    mp_number,
    probe_value,
    tick,
)


@dataclass
class Verdict:
    correct: bool
    reason: str            # correct | wrong | no_answer | unparsable | bad_gold | timeout | error | worker_*
    answer: str | None     # the extracted answer text of the completion

    @property
    def score(self) -> float:
        return 1.0 if self.correct else 0.0


# --------------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKER_RE = re.compile(r"final\s+answer\s*(?:is|:|=)|the\s+answer\s+is|answer\s*:|####", re.I)
_SPECIAL_TOKENS_RE = re.compile(r"(?:<\|im_end\|>|<\|endoftext\|>|</s>|<\|eot_id\|>)\s*$")
_SURROGATES_RE = re.compile("[\ud800-\udfff]")


def _clean_input(text: object, cfg: VerifyConfig) -> str:
    text = text if isinstance(text, str) else str(text)
    text = text[-cfg.max_scan_chars:]                    # the answer is at the end; the head cannot matter
    text = _SURROGATES_RE.sub("", text)                  # lone surrogates (invalid UTF-8 decoded leniently)
    return _SPECIAL_TOKENS_RE.sub("", text.replace("\x00", "")).rstrip()


def _between_kind(s: str) -> str | None:
    """How two adjacent boxes relate: 'and' (one multi-part answer), 'or' (a hedge), None (unrelated)."""
    if len(s) > 80 or "\n\n" in s:
        return None
    low = s.lower()
    if re.search(r"\b(if|when|otherwise|else)\b", low):
        return "or"                                      # "\boxed{7} if n is odd, \boxed{8} if even"
    rest = re.sub(r"\\text\s*\{([^{}]*)\}", r" \1 ", low)
    rest = re.sub(r"\\\(|\\\)|\\\[|\\\]|\\q?quad|\\,|\\\\|[$,;&.:]|\band\b|\bor\b|\balso\b|"
                  r"(?<![a-z])[a-z](?:_\{?\w+\}?)?\s*=", " ", rest)
    if rest.strip():
        return None
    return "or" if re.search(r"\bor\b", low) else "and"


def _boxed_answer(text: str) -> tuple[bool, str | None]:
    """(found a box, answer). The last box decides; text that ends inside a box gives (True, None)."""
    starts = list(_BOX_RE.finditer(text))
    if not starts:
        return False, None
    boxes = []                                           # (start, end, content), last box first
    for m in reversed(starts[-8:]):
        end = match_brace(text, m.end())
        if end is None:
            return True, None                            # truncated inside a box
        if boxes and end > boxes[-1][0]:
            break                                        # nested: the outer box is not a separate part
        boxes.append((m.start(), end, text[m.end():end]))
    group, kinds = [boxes[0]], []
    for prev in boxes[1:]:
        kind = _between_kind(text[prev[1] + 1:group[-1][0]])
        if kind is None:
            break
        group.append(prev)
        kinds.append(kind)
    tail = text[boxes[0][1] + 1:boxes[0][1] + 61].split("\n")[0].lower()
    if len(group) > 1 and re.search(r"\b(if|when|otherwise)\b", tail):
        kinds.append("or")
    parts: list[str] = []
    for _, _, content in reversed(group):
        if not parts or content.strip() != parts[-1]:   # "\boxed{840} \boxed{840}" is one answer
            parts.append(content.strip())
    if not any(parts):
        return True, None
    joiner = " or " if "or" in kinds else " , "
    return True, joiner.join(f"{{{p}}}" if len(parts) > 1 else p for p in parts)


def _marker_answer(text: str) -> str | None:
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    if end >= 0 and start >= 0:
        return text[start + len("<answer>"):end].strip() or None
    last = None
    for m in _MARKER_RE.finditer(text, max(0, len(text) - 20000)):
        last = m
    if last is None:
        return None
    rest = text[last.end():last.end() + 400].lstrip(" \t*:")
    m = re.match(r"(\$\$|\$|\\\(|\\\[)(.*?)(\$\$|\$|\\\)|\\\])", rest, re.S)
    if m:
        return m.group(2).strip() or None
    rest = rest.split("\n")[0]
    rest = re.split(r"\.(?=\s|$)|\s+(?:because|since|as|which|so|where|when|I hope)\b", rest)[0]
    rest = rest.replace("*", "").strip()
    return rest or None


def _bare_formula(text: str) -> str | None:
    """The whole completion, if it is a short formula with no prose (our 'final statement' rule)."""
    s = text.strip()
    s = re.sub(r"^(\$\$|\$|\\\(|\\\[)(.*)(\$\$|\$|\\\)|\\\])$", r"\2", s, flags=re.S).strip()
    if not s or len(s) > 200 or "\n" in s:
        return None
    if re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", " ", s)):
        return None
    return s


def extract_answer(completion: str, cfg: VerifyConfig = CFG) -> str | None:
    """The final answer text of a completion per the policy (module docstring), or None."""
    try:
        text = _clean_input(completion, cfg)
        found, ans = _boxed_answer(text)
        if not found:
            ans = _marker_answer(text)
            if ans is None:
                ans = _bare_formula(text)
        if ans is not None and len(ans) > cfg.max_answer_chars:
            return None
        return ans
    except Exception:
        return None


def _gold_answer(gold: object, cfg: VerifyConfig) -> str | None:
    """Gold as it comes in MATH (LaTeX or a boxed solution), GSM8K ("... #### 72"), AIME (int)."""
    text = _clean_input(gold, cfg)
    found, ans = _boxed_answer(text)
    if found:
        return ans
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    return text.strip() or None


# --------------------------------------------------------------------------------------------------------
# Comparison

_P1, _P2 = 30, 100           # digits of the two-stage numeric check for exact non-rational values


def _terminating(e: sp.Expr) -> bool:
    if not e.is_Rational:
        return False
    q = int(e.q)
    for p in (2, 5):
        while q % p == 0:
            q //= p
    return q == 1


def _dist_le(a: sp.Expr, b: sp.Expr, tol_exp10: int, digits: int) -> bool:
    """|a - b| <= 10^tol_exp10 for constants, at `digits` significant digits."""
    va, vb = mp_number(a, digits), mp_number(b, digits)
    return va is not None and vb is not None and abs(va - vb) <= mp_ctx(digits).mpf(10) ** tol_exp10


def _mp_close(a, b, digits: int, ctx) -> bool:
    scale = max(abs(a), abs(b))
    return scale == 0 or abs(a - b) <= scale * ctx.mpf(10) ** (-digits)


def _probe_eq(a: sp.Expr, b: sp.Expr, cfg: VerifyConfig, ratio: bool = False, positive: bool = False) -> bool:
    """a == b (or a == c*b for a constant c != 0 when ratio) at random points, mixed signs, 30 digits."""
    syms = sorted(a.free_symbols | b.free_symbols, key=str)
    rng, ctx = random.Random(20251126), mp_ctx(_P1)
    good, c0 = 0, None
    for _ in range(3 * cfg.n_probes):
        if good >= cfg.n_probes:
            break
        env = {s: ctx.mpf(rng.choice((-1, 1)) * rng.uniform(0.3, 2.3)) for s in syms}
        va, vb = probe_value(a, env, ctx), probe_value(b, env, ctx)
        if va is None and vb is None:
            continue
        if va is None or vb is None:
            return False
        if ratio:
            if _mp_close(vb, 0, 20, ctx):
                continue
            c = va / vb
            if c0 is None:
                if _mp_close(c, 0, 20, ctx) or (positive and not (ctx.im(c) == 0 and ctx.re(c) > 0)):
                    return False
                c0 = c
            elif not _mp_close(c, c0, 18, ctx):
                return False
        elif not _mp_close(va, vb, 18, ctx):
            return False
        good += 1
    return good >= 2


def _scalar_eq(ge: sp.Expr, gdec, pe: sp.Expr, pdec, cfg: VerifyConfig) -> bool:
    if ge.has(sp.nan, sp.zoo) or pe.has(sp.nan, sp.zoo):
        return False
    if ge == pe:
        return True
    if ge.free_symbols or pe.free_symbols:
        if (ge - pe).is_Rational:                        # differ by a constant that probes may round away
            return False
        return _probe_eq(ge, pe, cfg)
    if ge.has(sp.oo, -sp.oo) or pe.has(sp.oo, -sp.oo):
        return False
    if gdec and pdec:
        return False                                     # decimal vs decimal: exact value only (2.65 == 2.650)
    if pdec:                                             # decimal prediction, exact gold
        if _terminating(ge):
            return False
        return pdec[0] >= cfg.min_sig_digits and _dist_le(pe, ge, -pdec[1], pdec[0] + 15)
    if gdec:                                             # decimal gold, exact prediction
        if _terminating(pe):
            return False
        return gdec[0] >= cfg.gold_round_min_sig and _dist_le(2 * pe, 2 * ge, -gdec[1], gdec[0] + 15)
    if ge.is_Rational and pe.is_Rational:
        return False
    diff = ge - pe                                       # sympy cancels common terms: pi/3 + 10^-95 - pi/3
    if diff.is_Rational:
        return diff == 0
    for prec in (_P1, _P2):                              # relative, never absolute: 1/2004! != 1/2006!
        va, vb = mp_number(ge, prec), mp_number(pe, prec)
        if va is None or vb is None or not _mp_close(va, vb, prec - 8, mp_ctx(prec)):
            return False
    return True


def _num_eq(g: Num, p: Num, cfg: VerifyConfig) -> bool:
    if g.alt is not None and p.alt is not None:           # 50% vs 5000%: compare like with like
        return _scalar_eq(g.expr, None, p.expr, None, cfg)
    gc = [(g.expr, g.dec)] + ([(g.alt, None)] if g.alt is not None else [])
    pc = [(p.expr, p.dec)] + ([(p.alt, None)] if p.alt is not None else [])
    return any(_scalar_eq(ge, gd, pe, pd, cfg) for ge, gd in gc for pe, pd in pc)


def _rel_value(r: Rel, gold: bool) -> Num | None:
    """The value stated by an equation: "x = 5" -> 5; a prediction chain "a+b = ... = 101" -> 101."""
    if any(p is None for p in r.parts) or set(r.ops) != {"="}:
        return None
    lhs, last = r.parts[0].expr, r.parts[-1]
    if isinstance(lhs, sp.Symbol) and lhs not in last.expr.free_symbols:
        return last
    if not gold and not last.expr.free_symbols:
        return last
    return None


def _canon(r: Rel) -> tuple[str, sp.Expr]:
    op, a, b = r.ops[0], r.parts[0].expr, r.parts[1].expr
    if op in (">", ">="):
        op, a, b = FLIP[op], b, a
    return op, a - b


def _rel_eq(g: Rel, p: Rel, cfg: VerifyConfig) -> bool:
    if any(x is None for x in g.parts + p.parts):
        return False
    if not ({"=", "!="} >= set(g.ops) and {"=", "!="} >= set(p.ops)) or len(g.parts) > 2:
        gs, ps = as_realset(g), as_realset(p)
        if gs is not None and ps is not None:
            return _set_eq(gs, ps, cfg)
    if len(g.parts) == 2 == len(p.parts):
        (og, fg), (op, fp) = _canon(g), _canon(p)
        if og != op or not (fg.free_symbols or fp.free_symbols):
            return False
        return fg == fp or _probe_eq(fg, fp, cfg, ratio=True, positive=og in ("<", "<="))
    return g.ops == p.ops and all(_num_eq(a, b, cfg) for a, b in zip(g.parts, p.parts))


def _set_pieces(s: sp.Set) -> list[sp.Set]:
    return list(s.args) if isinstance(s, sp.Union) else [s]


def _set_eq(a: sp.Set, b: sp.Set, cfg: VerifyConfig) -> bool:
    if a == b:
        return True
    pa, pb = _set_pieces(a), _set_pieces(b)
    if len(pa) != len(pb):
        return False
    for x, y in zip(pa, pb):
        tick()
        if isinstance(x, sp.Interval) and isinstance(y, sp.Interval):
            if (x.left_open, x.right_open) != (y.left_open, y.right_open):
                return False
            if not (_scalar_eq(x.start, None, y.start, None, cfg) and _scalar_eq(x.end, None, y.end, None, cfg)):
                return False
        elif isinstance(x, sp.FiniteSet) and isinstance(y, sp.FiniteSet):
            if not _unordered_eq([Num(e) for e in x.args], [Num(e) for e in y.args], cfg):
                return False
        else:
            return False
    return True


def _dedupe(items: list, cfg: VerifyConfig) -> list:
    out = []
    for v in items:
        if not any(_equal(u, v, cfg) for u in out):
            out.append(v)
    return out


def _unordered_eq(g: list, p: list, cfg: VerifyConfig) -> bool:
    g, p = _dedupe(g, cfg), _dedupe(p, cfg)
    if len(g) != len(p):
        return False
    used = [False] * len(p)
    for x in g:
        for j, y in enumerate(p):
            if not used[j] and _equal(x, y, cfg):
                used[j] = True
                break
        else:
            return False
    return True


def _ordered_eq(g: list, p: list, cfg: VerifyConfig) -> bool:
    return len(g) == len(p) and all(_equal(x, y, cfg) for x, y in zip(g, p))


def _equal(g, p, cfg: VerifyConfig) -> bool:
    """Is prediction value p equivalent to gold value g? Only compatible types compare."""
    tick()
    if isinstance(p, FSet) and p.kind != "hedge" and len(p.items) == 1:
        p = p.items[0]                                   # "\{3\}" or "3, 3" against a single value
    if isinstance(g, FSet) and g.kind != "hedge" and len(g.items) == 1:
        g = g.items[0]
    if isinstance(g, Num):
        if isinstance(p, Rel):
            p = _rel_value(p, gold=False)
        return isinstance(p, Num) and _num_eq(g, p, cfg)
    if isinstance(g, Rel):
        if isinstance(p, Rel):
            return _rel_eq(g, p, cfg)
        if isinstance(p, Num):
            gv = _rel_value(g, gold=True)
            return gv is not None and _num_eq(gv, p, cfg)
        if isinstance(p, (RealSet, Tup)):                 # x^2 < 4 vs (-2, 2)
            gs, ps = as_realset(g), as_realset(p)
            return gs is not None and ps is not None and _set_eq(gs, ps, cfg)
        return False
    if isinstance(g, RealSet):
        if isinstance(g.set, sp.FiniteSet) and isinstance(p, (Num, FSet)) and getattr(p, "kind", "") != "hedge":
            return _unordered_eq([Num(e) for e in g.set.args], p.items if isinstance(p, FSet) else [p], cfg)
        ps = as_realset(p) if isinstance(p, (Rel, RealSet, Tup)) else None
        return ps is not None and _set_eq(g.set, ps, cfg)
    if isinstance(g, Tup):
        if isinstance(p, Tup) or (isinstance(p, FSet) and p.kind == "list"):
            return _ordered_eq(g.items, p.items, cfg)
        if isinstance(p, (RealSet, Rel)) and g.paren and len(g.items) == 2:
            gs, ps = as_realset(g), as_realset(p)          # (-2, 3) read as an open interval
            return gs is not None and ps is not None and _set_eq(gs, ps, cfg)
        return False
    if isinstance(g, FSet):
        if isinstance(p, FSet):
            if g.kind == "hedge" and p.kind != "hedge":
                return False                             # a hedged gold needs the same hedge
            return _unordered_eq(g.items, p.items, cfg)
        if isinstance(p, Tup) and g.kind == "list":
            return _ordered_eq(g.items, p.items, cfg)
        if isinstance(p, RealSet) and isinstance(p.set, sp.FiniteSet):
            return _unordered_eq(g.items, [Num(e) for e in p.set.args], cfg)
        return False
    if isinstance(g, Mat):
        return (isinstance(p, Mat) and len(g.rows) == len(p.rows) and len(g.rows[0]) == len(p.rows[0])
                and all(_num_eq(a, b, cfg) for ra, rb in zip(g.rows, p.rows) for a, b in zip(ra, rb)))
    if isinstance(g, (Text, Choice)):
        return type(p) is type(g) and g == p
    return False


# --------------------------------------------------------------------------------------------------------
# Public API

_GOLD_CACHE: dict[tuple[str, VerifyConfig], object] = {}
_INT_RE = re.compile(r"-?\d{1,300}")


class _HardTimeout(BaseException):
    """Raised inside a grading thread by the watchdog. A BaseException, so `except Exception` (ours or sympy's)
    cannot swallow it."""


class _Watchdog:
    """One daemon thread that interrupts a grade() call running past cfg.hard_limit_s, in whatever thread it
    runs. The cooperative deadline cannot stop a sympy call that loops inside sympy (the fuzz tests found
    several); CPython's PyThreadState_SetAsyncExc raises _HardTimeout in that thread at its next bytecode, so
    pure-Python loops stop. A single long C call (one huge bigint operation) finishes first; the size caps keep
    those short."""

    def __init__(self):
        self.wake = threading.Condition()
        self.calls: dict[int, tuple[float, int]] = {}    # token -> (deadline, thread id)
        self.tokens = 0
        self.pid = None                                  # the thread is started on first use

    def register(self, seconds: float) -> int:
        with self.wake:
            if self.pid != os.getpid():
                self.pid, self.calls = os.getpid(), {}
                threading.Thread(target=self._run, daemon=True, name="verify-watchdog").start()
            self.tokens += 1
            self.calls[self.tokens] = (time.perf_counter() + seconds, threading.get_ident())
            self.wake.notify()
            return self.tokens

    def unregister(self, token: int) -> None:
        with self.wake:
            self.calls.pop(token, None)

    def _run(self) -> None:
        with self.wake:
            while True:
                now = time.perf_counter()
                for token, (deadline, tid) in list(self.calls.items()):
                    if now >= deadline:                  # once per call; the cooperative deadline backs it up
                        del self.calls[token]
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid),
                                                                   ctypes.py_object(_HardTimeout))
                nearest = min((d for d, _ in self.calls.values()), default=now + 60.0)
                self.wake.wait(timeout=max(nearest - now, 0.001))


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.__init__)   # fresh lock and thread in a forked child


def grade(completion: str, gold: str, cfg: VerifyConfig = CFG) -> Verdict:
    """Score one completion with the reason (parse failures are counted apart from wrong answers)."""
    state: dict[str, str | None] = {"answer": None}
    try:
        token = _WATCHDOG.register(cfg.hard_limit_s)
        try:
            return _grade(completion, gold, cfg, state)
        finally:
            _WATCHDOG.unregister(token)                  # a _HardTimeout already sent lands in this try
    except _HardTimeout:
        return Verdict(False, "timeout", state["answer"])


def _grade(completion: str, gold: str, cfg: VerifyConfig, state: dict) -> Verdict:
    answer = None
    LOCAL.deadline = time.perf_counter() + cfg.time_budget_s
    try:
        g_text = _gold_answer(gold, cfg)
        if g_text is None or len(g_text) > cfg.max_answer_chars:
            return Verdict(False, "bad_gold", None)
        answer = state["answer"] = extract_answer(completion, cfg)
        if answer is None:
            return Verdict(False, "no_answer", None)
        try:
            g_norm = normalize(g_text)
        except ParseError:
            return Verdict(False, "bad_gold", answer)
        try:
            p_norm = normalize(answer)
        except ParseError:
            return Verdict(False, "unparsable", answer)
        if g_norm == p_norm and g_norm:
            return Verdict(True, "correct", answer)
        if _INT_RE.fullmatch(g_norm) and _INT_RE.fullmatch(p_norm):   # the common case, no sympy
            return Verdict(int(g_norm) == int(p_norm), "correct" if int(g_norm) == int(p_norm) else "wrong",
                           answer)
        g_val = _GOLD_CACHE.get((g_text, cfg))
        if g_val is None:
            try:
                g_val = parse_value(g_text, cfg)
            except ParseError:
                return Verdict(False, "bad_gold", answer)
            if len(_GOLD_CACHE) > 4096:
                _GOLD_CACHE.clear()
            _GOLD_CACHE[(g_text, cfg)] = g_val
        try:
            p_val = parse_value(answer, cfg)
        except ParseError:
            return Verdict(False, "unparsable", answer)
        ok = _equal(g_val, p_val, cfg)
        return Verdict(ok, "correct" if ok else "wrong", answer)
    except Timeout:
        return Verdict(False, "timeout", answer)
    except Exception:                                    # RecursionError, MemoryError, sympy internals
        return Verdict(False, "error", answer)
    finally:
        LOCAL.deadline = float("inf")


def score(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer is mathematically equivalent to the gold, else 0.0."""
    return grade(completion, gold).score


# -- batches: persistent worker processes with a hard per-item wall-clock limit

def _worker_main(conn) -> None:
    conn.send("ready")                                   # imports are done: the clock may start now
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, completion, gold, cfg = msg
        v = grade(completion, gold, cfg)
        conn.send((idx, v.correct, v.reason, v.answer))


@dataclass
class _Worker:
    proc: mp.Process
    conn: object
    ready: bool = False
    item: int | None = None            # index of the item it is grading
    started: float = 0.0


class _Pool:
    def __init__(self, workers: int):
        self.ctx = mp.get_context("spawn")               # fork is unsafe once torch threads exist
        self.failed_starts = 0
        self.workers = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child,), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _replace(self, k: int) -> None:
        w = self.workers[k]
        w.proc.kill()                                    # only our own worker, by its handle
        w.proc.join(5)
        w.conn.close()
        self.workers[k] = self._spawn()

    def run(self, items: list[tuple[str, str]], cfg: VerifyConfig) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(items)
        todo = list(range(len(items)))[::-1]
        while todo or any(w.item is not None for w in self.workers):
            for k, w in enumerate(self.workers):
                if w.ready and w.item is None and todo:
                    w.item, w.started = todo.pop(), time.perf_counter()
                    try:
                        w.conn.send((w.item, *items[w.item], cfg))
                    except (OSError, ValueError):
                        out[w.item] = Verdict(False, "worker_crash", None)
                        self._replace(k)
            conns = {w.conn: k for k, w in enumerate(self.workers) if not w.ready or w.item is not None}
            for conn in mp_wait(list(conns), timeout=0.05):
                k = conns[conn]
                w = self.workers[k]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    if w.item is not None:
                        out[w.item] = Verdict(False, "worker_crash", None)
                    elif not w.ready:                    # died while starting: do not respawn forever
                        self.failed_starts += 1
                        if self.failed_starts > 3 * len(self.workers):
                            raise RuntimeError("verify: workers die on start (can they import verify?)") from None
                    self._replace(k)
                    continue
                if msg == "ready":
                    w.ready = True
                else:
                    out[w.item] = Verdict(msg[1], msg[2], msg[3])
                    w.item = None
            now = time.perf_counter()
            for k, w in enumerate(self.workers):
                if w.item is not None and now - w.started > cfg.batch_timeout_s:
                    out[w.item] = Verdict(False, "worker_timeout", None)
                    self._replace(k)
        return out

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
            w.proc.join(1)
            if w.proc.is_alive():
                w.proc.kill()
        self.workers = []


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _close_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


atexit.register(_close_pool)


def grade_batch(completions: list[str], golds: list[str], workers: int = 2,
                cfg: VerifyConfig = CFG) -> list[Verdict]:
    """Grade many items. workers=0 grades in this process (cooperative budget only); workers>0 uses
    persistent worker processes with a hard per-item limit cfg.batch_timeout_s (overrun or crash -> 0.0)."""
    if len(completions) != len(golds):
        raise ValueError(f"grade_batch: {len(completions)} completions but {len(golds)} golds")
    if workers <= 0:
        return [grade(c, g, cfg) for c, g in zip(completions, golds)]
    global _POOL
    with _POOL_LOCK:                                     # one batch at a time uses the shared workers
        if _POOL is None or len(_POOL.workers) != workers:
            _close_pool()
            _POOL = _Pool(workers)
        return _POOL.run(list(zip(map(str, completions), map(str, golds))), cfg)


def score_batch(completions: list[str], golds: list[str], workers: int = 2) -> list[float]:
    """score() for a batch, in worker processes; a crashed or overtime item scores 0.0 and the batch goes on."""
    return [v.score for v in grade_batch(completions, golds, workers)]


# --------------------------------------------------------------------------------------------------------
# CLI: grade a JSONL file of {"completion": ..., "gold": ...} lines

def _read_jsonl(path: str) -> tuple[list[str], list[str]]:
    completions, golds = [], []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            for key in ("completion", "gold"):
                if not isinstance(rec, dict) or key not in rec:
                    raise SystemExit(f"{path}:{lineno}: missing key {key!r}")
            completions.append(str(rec["completion"]))
            golds.append(str(rec["gold"]))
    return completions, golds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Grade a JSONL file of {completion, gold} lines.")
    ap.add_argument("path")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    ap.add_argument("--show", type=int, default=0, help="print this many failures with their reasons")
    args = ap.parse_args(argv)
    completions, golds = _read_jsonl(args.path)
    t0 = time.perf_counter()
    verdicts = grade_batch(completions, golds, workers=args.workers)
    dt = time.perf_counter() - t0
    n = len(verdicts)
    summary = {"n": n, "accuracy": sum(v.correct for v in verdicts) / max(n, 1),
               "reasons": dict(Counter(v.reason for v in verdicts)), "seconds": round(dt, 3)}
    shown = 0
    for i, v in enumerate(verdicts):
        if not v.correct and shown < args.show:
            print(f"item {i}: {v.reason}: answer={v.answer!r} gold={golds[i][:80]!r}", file=sys.stderr)
            shown += 1
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
