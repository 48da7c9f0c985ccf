"""verify.py: the math answer verifier (RL reward and evaluation metric).

    score("... so the answer is $\\boxed{\\frac12}$.", "0.5")  -> 1.0
    grade(completion, gold)                  -> Verdict(correct, reason, answer); reasons separate parse failures
    score_batch(completions, golds, workers=4) -> [1.0, 0.0, ...]   # worker processes, hard per-item limit
    python verify.py graded.jsonl --workers 4 --show 20           # {completion, gold} lines -> accuracy

The grading policy is ../shared/reference/verifier.md. How we implement it, and the choices it leaves open:
  1. Which answer: the last balanced \\boxed{} / \\fbox{}; boxes side by side in the final statement form one
     multi-part answer, and "or" / "if" between them makes it a hedge. Without a box: the last explicit marker
     ("final answer is", "the answer is", "Answer:", "####", <answer>..</answer>). An unterminated last box gives
     no answer. Choice: a completion with neither is graded only when the whole of it is a bare formula ("72",
     "$\\frac12$"); we never guess a "final statement", so a cut-off text earns nothing for the last number in it.
  2. Normalise (unicode, full-width digits, \\dfrac, \\left, spacing, thousands separators incl. 10,\\!000,
     currency, trailing unit words, degree signs, \\text, trailing punctuation) and parse with our own
     recursive-descent parser into a typed value: Num, Rel (equation / inequality), Tup, RealSet (interval, union,
     one-variable linear or quadratic inequality, set-builder), FSet (set / list / hedge), Mat, Text, Choice.
     Only compatible types compare. Conventions: e is Euler's number, i the imaginary unit, \\log the natural
     log, \\sin 2x is sin(2x), \\sqrt[3]{-8} = -2, 2\\frac12 = 5/2, \\pm expands to a set.
  3. Numbers: rationals compare exactly (10^100 vs 10^100+1 is false); an exact rational difference decides;
     other exact values compare at 30 then 100 significant digits with a *relative* tolerance (1/2004! vs 1/2006!
     is false). Decimal prediction vs exact non-terminating gold: passes with >= 6 significant digits within one
     unit of its last digit (choice: 4-5 digits fail; a reward must not teach rounding). Decimal gold vs decimal
     prediction: exact value (2.65 == 2.650, not 2.654); vs an exact irrational prediction: rounding, if the gold
     has >= 3 significant digits. Symbols: random probe points (mixed signs, fixed seed, 30 digits); equations
     match up to a nonzero factor, inequalities up to a positive one. "50%" reads as 50 or 0.5 (two percents
     compare like with like); a bare number is never rescaled.
Known limits: inequalities beyond linear and quadratic ones are compared as relations, not solution sets;
ratios "3:4" do not parse (both fail closed, to 0.0); two distinct exact values closer than 1e-92 relative
(without an exact rational difference) compare equal; sets of dozens of symbolic elements may run out of budget.

Security: the completion is untrusted. Nothing here calls eval, exec, sympify or parse_expr: sympy objects are
built by the parser from tokens, and numbers are evaluated by our own magnitude-checked mpmath walker, never
by sympy's evalf. Every expensive step is bounded (answer length, nesting depth, integer bits, exponent, root
and factorial sizes, function argument magnitudes, union pieces). Time is bounded three ways, none of which
needs signal.alarm or the main thread: a cooperative deadline checked by the parser and comparisons
(cfg.time_budget_s), a watchdog thread that raises an exception asynchronously inside a call still running at
cfg.hard_limit_s (it stops loops inside sympy; one long C-level operation would finish first, which the size
caps keep short), and in `score_batch` worker processes that are killed at cfg.batch_timeout_s or when they
crash (that item scores 0.0 and the batch goes on). Hostile-grammar fuzzing (12,000 cases) found no call
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
import unicodedata
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import wait as mp_wait

import mpmath
import sympy as sp
from sympy.solvers.inequalities import solve_univariate_inequality


@dataclass(frozen=True)
class VerifyConfig:
    time_budget_s: float = 1.0        # cooperative budget per score() call (parse + compare), any thread
    hard_limit_s: float = 1.5         # the watchdog interrupts a call still running after this long
    batch_timeout_s: float = 5.0      # hard wall-clock limit per item in score_batch (worker is killed)
    max_scan_chars: int = 4_000_000   # only the tail of a longer completion is scanned for the answer
    max_answer_chars: int = 2000      # a longer extracted answer fails closed
    max_depth: int = 60               # bracket / function nesting
    max_int_bits: int = 1 << 17       # any exact rational beyond this many bits fails closed (2006! has ~19k)
    max_exponent: int = 100_000       # |numeric exponent|
    max_factorial: int = 10_000
    max_func_arg: float = 1e6         # |numeric argument| of exp/trig functions
    max_items: int = 64               # elements of a tuple / set / matrix
    min_sig_digits: int = 6           # decimal prediction vs exact irrational gold
    gold_round_min_sig: int = 3       # decimal gold vs exact irrational prediction
    n_probes: int = 5                 # random points for symbolic equality


CFG = VerifyConfig()


@dataclass
class Verdict:
    correct: bool
    reason: str            # correct | wrong | no_answer | unparsable | bad_gold | timeout | error | worker_*
    answer: str | None     # the extracted answer text of the completion

    @property
    def score(self) -> float:
        return 1.0 if self.correct else 0.0


class ParseError(ValueError):
    pass


class _Timeout(Exception):
    pass


# --------------------------------------------------------------------------------------------------------
# Deadline: thread-local, checked inside the tokenizer, parser and comparisons.

_LOCAL = threading.local()


def _tick() -> None:
    if time.perf_counter() > getattr(_LOCAL, "deadline", float("inf")):
        raise _Timeout


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


def _match_brace(text: str, i: int) -> int | None:
    """Index of the '}' closing the group whose content starts at text[i], or None if unterminated."""
    depth = 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2                                       # \{ and \} do not count
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


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
        end = _match_brace(text, m.end())
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
# Normalisation (string -> string)

_UNICODE = {
    "√": "\\sqrt", "π": "\\pi ", "°": "^\\circ", "×": "\\times ", "÷": "\\div ", "−": "-", "–": "-", "—": "-",
    "·": "\\cdot ", "⋅": "\\cdot ", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "∞": "\\infty ", "±": "\\pm ",
    "∓": "\\mp ", "∪": "\\cup ", "∩": "\\cap ", "∅": "\\emptyset ", "∈": "\\in ", "ℝ": "\\mathbb{R}",
    "²": "^2", "³": "^3", "¹": "^1", "½": "\\frac12", "⅓": "\\frac13", "⅔": "\\frac23", "¼": "\\frac14",
    "¾": "\\frac34", "…": "\\dots ", "∣": "\\mid ", "⟨": "\\langle ", "⟩": "\\rangle ",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_TEXT_CMDS_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|mathsf|"
                           r"operatorname|boldsymbol|bm|hbox)\s*\{")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
               "log", "ln", "exp", "sqrt", "pi", "inf", "infty", "infinity", "and", "or"}
_SUBS = [  # (pattern, replacement), applied in order
    (r"\\[dtc]frac", r"\\frac"), (r"\\[dt]binom", r"\\binom"),
    (r"\\(?:left|right)\s*\.", ""),
    (r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])", ""),
    (r"\\displaystyle|\\limits|\\nolimits", ""),
    (r"(\d)\s*(?:\{,\}|,\s*\\!|\\[,!;: ]|~)\s*(?=\d{3}(?!\d))", r"\1"),  # 1\,000 1{,}000 10,\!000
    (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", ""),
    (r"\\%|\\percent|\bpercent\b", "%"),
    (r"\\\$|\$|\\euro|€|£|¥|\bUSD\b", " "),
    (r"(?<!\\)\\[,!;: ]|\\q?quad(?![A-Za-z])|~|\\enspace|\\thinspace", " "),
    (r"\binfinity\b", r"\\infty "),
    (r"\\(?:le|leq|leqslant)(?![A-Za-z])", "<="), (r"\\(?:ge|geq|geqslant)(?![A-Za-z])", ">="),
    (r"\\(?:ne|neq)(?![A-Za-z])", "!="), (r"\\lt(?![A-Za-z])", "<"), (r"\\gt(?![A-Za-z])", ">"),
    (r"\\(?:lvert|rvert|vert)(?![A-Za-z])", "|"),
]
_SUBS = [(re.compile(p), r) for p, r in _SUBS]
_HEDGE_WORDS = ("pi|or|and|inf|infty|at|least|most|more|less|fewer|than|not|about|approximately|roughly|around|"
                "nearly|almost|over|under|if|when|unless|otherwise")
# trailing unit words after a number ("8 ways", "12 cm^2"), but never words that change the meaning ("or more")
_UNIT_WORD_RE = re.compile(rf"(?!(?:{_HEDGE_WORDS})\b)[A-Za-z]{{2,}}\.?(?:\^\{{?\d\}}?)?|\^\{{?\d\}}?")


def _strip_units(s: str) -> str:
    """Drop trailing unit words after a number ("8 ways", "12 cm ^2"); linear time, unlike a regex."""
    words = s.split(" ")
    k = len(words)
    while k > 1 and _UNIT_WORD_RE.fullmatch(words[k - 1]):
        k -= 1
    head = " ".join(words[:k])
    return head if k < len(words) and head[-1:] in set("0123456789}).") else s


def _rstrip_punct(s: str) -> str:
    while True:
        t = s.rstrip(" .,;:?")
        t = t[:-2] if t.endswith("\\\\") else t
        if t == s:
            return s
        s = t


def _unwrap_text(s: str) -> str:
    for _ in range(64):
        m = _TEXT_CMDS_RE.search(s)
        if not m:
            return s
        end = _match_brace(s, m.end())
        if end is None:
            raise ParseError("unbalanced \\text{")
        s = s[:m.start()] + " " + s[m.end():end] + " " + s[end + 1:]
    raise ParseError("too many \\text{} groups")


def _thousands(m: re.Match) -> str:
    before = m.string[:m.start()].rstrip()
    if before.endswith(("(", "[", "\\{", ",")):          # (2,500) stays a pair
        return m.group(0)
    return m.group(0).replace(",", "").replace(" ", "")


def _repeating(m: re.Match) -> str:
    a, b, c = m.group(1) or "0", m.group(2), m.group(3)
    num = int(b + c) - int(b or "0")
    den = 10 ** len(b) * (10 ** len(c) - 1)
    return f"({a}+\\frac{{{num}}}{{{den}}})"


def _normalize(s: str) -> str:
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = unicodedata.normalize("NFKC", s).replace("⁄", "/")
    s = s.replace("\\mathbb{R}", "\\Reals ").replace("\\mathbb R", "\\Reals ")
    s = _unwrap_text(s)
    for pat, rep in _SUBS:
        s = pat.sub(rep, s)
    s = re.sub(r"(\d{0,50})\.(\d{0,50})\\(?:overline|bar)\s*\{(\d{1,50})\}", _repeating, s)
    s = re.sub(r"(?<![\d.])[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?(?![\d.])", _thousands, s)
    s = re.sub(r"(?<![\d.])[1-9]\d{0,2}(?: \d{3})+(?![\d.])", _thousands, s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"^[A-Za-z]\s*\\in\s+", "", s)                # "x \in [1,2]"
    s = re.sub(r"^[A-Za-z]\s*\(\s*[A-Za-z]\s*\)\s*=\s*", "", s)  # "f(x) = x^2"
    s = re.sub(r"^all real numbers$", r"\\Reals", s, flags=re.I)
    s = re.sub(r"\s*\((?:since|because|as|for|when|where|assuming)\b[^()]*\)?\s*$", "", s, flags=re.I)
    s = _rstrip_punct(s)                                     # trailing punctuation and \\ (not 5!)
    s = _rstrip_punct(_strip_units(s)).strip()               # "8 ways", "12 cm^2", "60 miles per hour"
    return _NUMBER_WORDS.get(s.lower(), s)


# --------------------------------------------------------------------------------------------------------
# Typed values

@dataclass
class Num:
    expr: sp.Expr
    dec: tuple[int, int] | None = None     # (significant digits, decimal places) of a lone decimal literal
    alt: sp.Expr | None = None             # percent: the unit-stripped reading (50 for 50%)


@dataclass
class Rel:
    ops: list[str]                         # '=', '<', '<=', '>', '>=', '!='
    parts: list[Num | None]                # None: missing left side (a bare bound such as ">= 10")


@dataclass
class Tup:
    items: list
    paren: bool                            # written (a, b): may also be read as an open interval


@dataclass
class RealSet:
    set: sp.Set


@dataclass
class FSet:
    items: list
    kind: str                              # 'set' | 'list' (unordered) | 'hedge' ("3 or 4")


@dataclass
class Mat:
    rows: list[list[Num]]


@dataclass
class Text:
    text: str


@dataclass
class Choice:
    letter: str


@dataclass
class _Seq:                                # bracketed comma list before we know what it is
    open: str
    close: str
    items: list


# --------------------------------------------------------------------------------------------------------
# Tokenizer and recursive-descent parser (tokens -> sympy objects; no eval anywhere)

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,4}(?![\d.]))?)"
    r"|(?P<cmd>\\(?:[A-Za-z]+|[^A-Za-z]))"
    r"|(?P<word>[A-Za-z]+)"
    r"|(?P<op><=|>=|!=|=<|=>|\*\*|[-+*/^_=<>!|,;:()\[\]{}%&])"
    r"|(?P<uni>[^\W\d_]))")
_RELOPS = {"=": "=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "!=": "!=", "=<": "<=", "=>": ">="}
_FUNCS = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc,
          "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "sinh": sp.sinh, "cosh": sp.cosh,
          "tanh": sp.tanh, "ln": sp.log, "log": sp.log, "exp": sp.exp}
_INVERSE = {"sin": sp.asin, "cos": sp.acos, "tan": sp.atan}
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho "
             "sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split())
_CONSTS = {"pi": sp.pi, "infty": sp.oo, "inf": sp.oo, "e": sp.E, "i": sp.I, "imath": sp.I}
_ATOM_CMDS = set(_FUNCS) | _GREEK | {"frac", "sqrt", "binom", "pi", "infty", "lfloor", "lceil", "imath"}


def _tokenize(s: str) -> list[tuple[str, str]]:
    toks, pos = [], 0
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            if s[pos:].strip() == "":
                break
            raise ParseError(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        toks.append((kind, m.group(kind)))
    return toks


def _dec_info(text: str) -> tuple[int, int] | None:
    """(significant digits, decimal places) if text is a lone decimal literal, maybe in scientific notation."""
    m = re.fullmatch(r"[-+]?(\d*)\.?(\d*)(?:[eE]([-+]?\d+))?", text)
    if m and ("." in text or m.group(3)):
        ip, fp, ex = m.group(1), m.group(2), int(m.group(3) or 0)
    else:
        m = re.fullmatch(r"[-+]?(\d*)\.?(\d*)(?:\\times|\\cdot|\*)10\^\{?([-+]?\d+)\}?", text)
        if not m:
            return None
        ip, fp, ex = m.group(1), m.group(2), int(m.group(3))
    digits = (ip + fp).lstrip("0")
    return (max(len(digits), 1), len(fp) - ex)


class _Parser:
    def __init__(self, toks: list[tuple[str, str]], cfg: VerifyConfig):
        self.t, self.i, self.cfg = toks, 0, cfg
        self.depth = 0
        self.abs_depth = 0

    # -- token helpers
    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.t[j] if j < len(self.t) else ("end", "")

    def take(self) -> tuple[str, str]:
        _tick()
        tok = self.peek()
        if tok[0] == "end":
            raise ParseError("unexpected end")
        self.i += 1
        return tok

    def accept(self, *texts: str) -> str | None:
        tok = self.peek()
        if tok[0] != "end" and tok[1] in texts:
            self.i += 1
            return tok[1]
        return None

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise ParseError(f"expected {text!r}, got {self.peek()[1]!r}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > self.cfg.max_depth:
            raise ParseError("nesting too deep")

    # -- guarded constructors
    def guard(self, e: sp.Expr) -> sp.Expr:
        if e.is_Rational and max(abs(e.p).bit_length(), e.q.bit_length()) > self.cfg.max_int_bits:
            raise ParseError("number too large")
        return e

    def check_mag(self, e: sp.Expr, bound: float) -> None:
        if e.is_number:
            if e.is_Integer:
                ok = abs(int(e)) <= bound
            else:
                v = _mp_number(e, 15)
                ok = v is not None and abs(v) <= bound
            if not ok:
                raise ParseError("argument too large")

    def pow(self, b: sp.Expr, e: sp.Expr) -> sp.Expr:
        b, e = _expr(b), _expr(e)
        self.check_mag(e, self.cfg.max_exponent)
        if e.is_Rational and e.q > 1000:                 # sympy's integer_nthroot(., q) tries 2**q
            raise ParseError("root index too large")
        if e.is_Rational and b.is_Rational and abs(b) not in (0, 1):
            bits = max(abs(b.p).bit_length(), b.q.bit_length())
            if bits * abs(e.p) > self.cfg.max_int_bits:
                raise ParseError("power too large")
            if e.q != 1 and bits > 1024:
                raise ParseError("root of a huge number")  # sympy factors the base (isprime on the cofactor)
        return self.guard(sp.Pow(b, e))

    def floor(self, x: sp.Expr, down: bool) -> sp.Expr:
        """sympy's floor of a constant may call simplify (seen to run for minutes): we round our own value."""
        if x.free_symbols:
            return sp.floor(x, evaluate=False) if down else sp.ceiling(x, evaluate=False)
        if x.is_Rational:
            return sp.floor(x) if down else sp.ceiling(x)
        ctx = _mp_ctx(50)
        v = _mp_number(x, 50)
        if v is None or ctx.im(v) != 0 or abs(v) > 1e15 or abs(v - ctx.nint(v)) < ctx.mpf(10) ** -30:
            raise ParseError("floor of a value we cannot round safely")
        return sp.Integer(int(ctx.floor(v) if down else ctx.ceil(v)))

    def func(self, name: str, arg: sp.Expr, base: sp.Expr | None = None) -> sp.Expr:
        arg = _expr(arg)
        if name not in ("ln", "log"):
            self.check_mag(arg, self.cfg.max_func_arg)
        if base is not None:
            return sp.log(arg, base)
        return _FUNCS[name](arg)

    def factorial(self, n: sp.Expr, double: bool) -> sp.Expr:
        n = _expr(n)
        if n.is_number:
            if not (n.is_Integer and 0 <= n <= self.cfg.max_factorial):
                raise ParseError("factorial argument must be a small non-negative integer")
        return self.guard(sp.factorial2(n) if double else sp.factorial(n))

    # -- grammar
    def top(self):
        items, seps = [self.item()], []
        while self.peek()[1] in (",", ";", "and", "or"):
            seps.append(self.take()[1])
            items.append(self.item())
            if len(items) > self.cfg.max_items:
                raise ParseError("too many items")
        if self.peek()[0] != "end":
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        if len(items) == 1:
            return _finish(items[0])
        sets = [_as_realset(v) for v in items] if all(isinstance(v, Rel) for v in items) else None
        if "or" in seps:
            if sets and all(s is not None for s in sets) and set(seps) == {"or"}:
                return RealSet(sp.Union(*sets))          # "x < -1 or x > 2"
            return FSet([_finish(v) for v in items], "hedge")
        inequalities = all(isinstance(v, Rel) and "=" not in v.ops for v in items)
        if sets and all(s is not None for s in sets) and set(seps) == {"and"} and inequalities:
            return RealSet(sp.Intersection(*sets))        # "x > -2 and x < 3"
        return FSet([_finish(v) for v in items], "list")

    def item(self):
        """A \\cup / \\cap chain of sets (\\cap binds tighter); one sympy Union at the end, as it is slow."""
        v = self.rel()
        if self.peek()[1] not in ("\\cup", "\\cap"):
            return v
        union = [_as_realset(v)]
        while (op := self.accept("\\cup", "\\cap")) is not None:
            s = _as_realset(self.rel())
            if s is None or union[-1] is None or len(union) >= 16:
                raise ParseError("bad or too long union")
            if op == "\\cup":
                union.append(s)
            else:
                union[-1] = sp.Intersection(union[-1], s)
        if union[0] is None:
            raise ParseError("union of non-sets")
        return RealSet(sp.Union(*union))

    def rel(self):
        if self.peek()[1] in _RELOPS:                    # a bare bound such as ">= 10"
            ops, parts = [_RELOPS[self.take()[1]]], [None, self.slot()]
        else:
            first = self.slot()
            if self.accept("\\in"):
                return self.item()
            ops, parts = [], [first]
        while self.peek()[1] in _RELOPS:
            ops.append(_RELOPS[self.take()[1]])
            parts.append(self.slot())
        if not ops:
            return parts[0]
        if any(p is not None and not isinstance(p, Num) for p in parts):
            raise ParseError("relation between non-numbers")
        return Rel(ops, parts)

    def slot(self):
        start = self.i
        e = self.sum()
        if not isinstance(e, sp.Basic):
            return e
        text = "".join(tok for _, tok in self.t[start:self.i])
        return Num(e, _dec_info(text))

    def sum(self):
        left = self.term()
        while self.peek()[1] in ("+", "-"):
            sign = self.take()[1]
            right = self.term()
            left = self.guard(_expr(left) + _expr(right) if sign == "+" else _expr(left) - _expr(right))
        return left

    def _mixed_number(self):
        """2\\frac12 = 5/2: an integer followed by a proper numeric fraction."""
        kind, text = self.peek()
        if kind != "num" or not text.isdigit() or self.peek(1) != ("cmd", "\\frac"):
            return None
        save = self.i
        self.i += 2
        try:
            num, den = self.arg(), self.arg()
        except ParseError:
            num = den = None
        if (num is not None and num.is_Integer and den.is_Integer and 0 < num < den
                and self.peek()[1] not in ("^", "!")):
            return sp.Integer(text) + num / den
        self.i = save
        return None

    def term(self):
        left = self.factor()
        while True:
            kind, text = self.peek()
            if text in ("*", "\\cdot", "\\times", "\\ast", "/", "\\div"):
                self.take()
                right = self.factor()
                left = _expr(left) * _expr(right) if text not in ("/", "\\div") else _expr(left) / _expr(right)
            elif self._starts_atom(kind, text):
                if kind == "num" and self.t[self.i - 1][0] == "num":
                    raise ParseError("two numbers side by side")
                left = _expr(left) * _expr(self.power())
            else:
                return left
            left = self.guard(left)

    def _starts_atom(self, kind: str, text: str) -> bool:
        if kind in ("num", "word", "uni"):
            return text not in ("or", "and")
        if kind == "cmd":
            return text[1:] in _ATOM_CMDS
        return text in ("(", "{") or (text == "|" and self.abs_depth == 0)

    def _plain_factor(self) -> bool:
        kind, text = self.peek()
        if kind == "num":
            return self.t[self.i - 1][0] != "num"
        return (kind in ("word", "uni") and text not in ("or", "and")) or (kind == "cmd" and text[1:] in _GREEK)

    def factor(self):
        mixed = self._mixed_number()
        if mixed is not None:
            return mixed
        if self.accept("-"):
            return self.guard(-_expr(self.factor()))
        if self.accept("+"):
            return _expr(self.factor())
        return self.power()

    def power(self):
        base = self.postfix()
        if self.accept("^", "**"):
            return self.pow(base, self.exponent())
        return base

    def exponent(self):
        if self.peek()[1] == "{":
            return self.group()
        if self.accept("-"):
            return -_expr(self.exponent())
        return self.power()

    def postfix(self):
        a = self.atom()
        while True:
            if self.accept("!"):
                double = bool(self.accept("!"))
                a = self.factorial(a, double)
            elif self.accept("%"):
                a = _expr(a) / 100
            else:
                return a

    def group(self):
        """{ ... } in LaTeX: a plain group; with commas inside it is a set."""
        self.expect("{")
        self.enter()
        items = [self.item()]
        while self.accept(","):
            items.append(self.item())
        self.expect("}")
        self.depth -= 1
        if len(items) == 1:
            return items[0].expr if isinstance(items[0], Num) else items[0]
        return FSet([_finish(v) for v in items], "set")

    def arg(self):
        """A \\frac / \\sqrt / \\binom argument: a {group} or a single token (\\frac12 is 1/2)."""
        kind, text = self.peek()
        if text == "{":
            return _expr(self.group())
        if kind == "num" and len(text) > 1 and text[0].isdigit():   # split the first digit off
            self.t[self.i:self.i + 1] = [("num", text[0]), ("num", text[1:])]
        return _expr(self.atom())

    def raw_group(self) -> str:
        self.expect("{")
        out = []
        while not self.accept("}"):
            out.append(self.take()[1])
        return "".join(out)

    def subscript(self) -> str:
        if self.peek()[1] == "{":
            return self.raw_group()
        return self.take()[1]

    def atom(self):
        self.enter()
        try:
            return self._atom()
        finally:
            self.depth -= 1

    def _atom(self):
        kind, text = self.take()
        if kind == "num":
            if len(text) > 400:
                raise ParseError("numeral too long")
            try:
                f = Fraction(text)
            except ValueError:
                raise ParseError(f"bad number {text!r}") from None
            return self.guard(sp.Rational(f.numerator, f.denominator))
        if kind == "word" and len(text) > 1:
            low = text.lower()
            if low in _FUNCS or low == "sqrt":
                return self.call(low)
            if low in ("pi", "inf", "infty"):
                return _CONSTS[low]
            self.i -= 1
            self.t[self.i:self.i + 1] = [("word", c) for c in text]   # "ab" is a*b
            kind, text = self.take()
        if kind in ("word", "uni"):
            if text in ("e", "i") and self.peek()[1] != "_":
                return _CONSTS[text]
            name = text
            if self.accept("_"):
                name += "_" + self.subscript()
            return sp.Symbol(name)
        if text in ("(", "["):
            return self.seq(text)
        if text == "{":
            self.i -= 1
            return self.group()
        if text == "|":
            self.abs_depth += 1
            inner = _expr(self.sum())
            self.expect("|")
            self.abs_depth -= 1
            # sympy rewrites |f| of complex-looking f into re/im towers (seconds): evaluate only plain numbers
            plain = not inner.free_symbols and not any(isinstance(a, sp.Function) for a in sp.preorder_traversal(inner))
            return sp.Abs(inner, evaluate=plain)
        if kind == "cmd":
            return self.command(text[1:])
        raise ParseError(f"unexpected {text!r}")

    def seq(self, open_: str):
        items = [self.item()]
        while self.accept(","):
            items.append(self.item())
            if len(items) > self.cfg.max_items:
                raise ParseError("too many items")
        close = self.accept(")", "]")
        if close is None:
            raise ParseError("unclosed bracket")
        if len(items) == 1 and isinstance(items[0], Num) and (open_ + close) in ("()", "[]"):
            return items[0].expr
        if len(items) == 1 and (open_ + close) == "()":
            return items[0]
        return _Seq(open_, close, items)

    def call(self, name: str):
        if name == "sqrt":
            return self.sqrt()
        base = inv = None
        if self.accept("_"):
            base = _expr(self.group()) if self.peek()[1] == "{" else _expr(self.atom())
        power = None
        if self.accept("^"):
            power = _expr(self.group()) if self.peek()[1] == "{" else _expr(self.atom())
            if power == -1 and name in _INVERSE:
                inv, power = _INVERSE[name], None
        if self.peek()[1] == "(":
            self.take()
            self.enter()
            arg = _expr(self.sum())
            self.expect(")")
            self.depth -= 1
        else:                                            # \sin 2x = sin(2x), but \sin x \cos x = sin(x) cos(x)
            arg = _expr(self.power())
            while self._plain_factor():
                arg = self.guard(arg * _expr(self.power()))
        if inv is not None:
            self.check_mag(arg, self.cfg.max_func_arg)
            out = inv(arg)
        else:
            out = self.func(name, arg, base if name == "log" else None)
        return self.pow(out, power) if power is not None else out

    def sqrt(self):
        n = sp.Integer(2)
        if self.accept("["):
            n = _expr(self.sum())
            self.expect("]")
        if self.peek()[1] == "(":
            self.take()
            x = _expr(self.sum())
            self.expect(")")
        else:
            x = self.arg()
        if not (n.is_Integer and 2 <= n <= 1000):
            raise ParseError("bad root index")
        if n % 2 == 1 and x.is_number and x.is_negative:    # the real root: \sqrt[3]{-8} = -2
            return -self.pow(-x, 1 / n)
        return self.pow(x, 1 / n)

    def command(self, name: str):
        if name in _FUNCS:
            return self.call(name)
        if name == "sqrt":
            return self.sqrt()
        if name in _CONSTS:
            return _CONSTS[name]
        if name in _GREEK:
            return sp.Symbol(name)
        if name == "frac":
            num, den = self.arg(), self.arg()
            return self.guard(num / den)
        if name == "binom":
            n, k = self.arg(), self.arg()
            k_max = self.cfg.max_factorial if n.is_number else 1000   # sympy loops k times
            if (n.is_number and not (n.is_Integer and abs(n) <= self.cfg.max_factorial)) or \
                    (k.is_number and not (k.is_Integer and abs(k) <= k_max)):
                raise ParseError("binomial needs small integer arguments")
            return self.guard(sp.binomial(n, k))
        if name in ("lfloor", "lceil"):
            inner = _expr(self.sum())
            self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
            return self.floor(inner, name == "lfloor")
        if name in ("emptyset", "varnothing"):
            return RealSet(sp.S.EmptySet)
        if name == "Reals":
            return RealSet(sp.S.Reals)
        if name == "{":
            return self.brace_set()
        if name == "langle":
            items = [self.item()]
            while self.accept(","):
                items.append(self.item())
            self.expect("\\rangle")
            return Tup([_finish(v) for v in items], paren=False)
        if name == "begin":
            return self.matrix()
        raise ParseError(f"unsupported command \\{name}")

    def brace_set(self):
        k0, k1 = self.peek(), self.peek(1)
        if k0[0] in ("word", "uni") and len(k0[1]) == 1 and k1[1] in ("|", ":", "\\mid"):
            var = sp.Symbol(self.take()[1])               # set-builder {x | condition}
            self.take()
            items, seps = [self.rel()], []
            while self.peek()[1] in (",", "and", "or"):
                seps.append(self.take()[1])
                items.append(self.rel())
            self.expect("\\}")
            sets = [_as_realset(v, var) for v in items]
            if any(s is None for s in sets):
                raise ParseError("unsupported set-builder condition")
            return RealSet(sp.Union(*sets) if "or" in seps else sp.Intersection(*sets))
        if self.accept("\\}"):
            return RealSet(sp.S.EmptySet)
        items = [self.item()]
        while self.accept(","):
            items.append(self.item())
            if len(items) > self.cfg.max_items:
                raise ParseError("too many items")
        self.expect("\\}")
        return FSet([_finish(v) for v in items], "set")

    def matrix(self):
        env = self.raw_group()
        if env not in ("pmatrix", "bmatrix", "matrix", "Bmatrix", "smallmatrix"):
            raise ParseError(f"unsupported environment {env}")
        rows, row = [], [self.slot()]
        while True:
            if self.accept("&"):
                row.append(self.slot())
            elif self.accept("\\\\"):
                rows.append(row)
                if self.peek()[1] == "\\end":
                    row = None
                    break
                row = [self.slot()]
            else:
                break
            if sum(map(len, rows)) + len(row) > self.cfg.max_items:
                raise ParseError("matrix too large")
        if row is not None:
            rows.append(row)
        self.expect("\\end")
        self.raw_group()
        if len({len(r) for r in rows}) != 1 or not all(isinstance(c, Num) for r in rows for c in r):
            raise ParseError("ragged matrix")
        return Mat(rows)


def _expr(v) -> sp.Expr:
    """Unwrap to a sympy expression; compound values (tuples, sets) cannot take part in arithmetic."""
    if isinstance(v, Num):
        return v.expr
    if isinstance(v, sp.Expr):
        return v
    raise ParseError("a tuple, set or relation inside arithmetic")


def _finish(v):
    """Turn parser intermediates into final typed values."""
    if isinstance(v, sp.Expr):
        return Num(v)
    if isinstance(v, _Seq):
        items = [_finish(x) for x in v.items]
        if len(items) == 2 and (v.open + v.close) != "()":
            s = _interval(items, v.open == "(", v.close == ")")
            if s is not None:
                return RealSet(s)
        return Tup(items, paren=(v.open + v.close) == "()")
    return v


def _interval(items, left_open: bool, right_open: bool) -> sp.Set | None:
    if not all(isinstance(x, Num) for x in items):
        return None
    try:
        return sp.Interval(items[0].expr, items[1].expr, left_open, right_open)
    except (TypeError, ValueError):
        return None


_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}


def _as_realset(v, var: sp.Symbol | None = None) -> sp.Set | None:
    """A value read as a set of reals: intervals, finite sets, one-variable linear or quadratic
    relations."""
    v = _finish(v) if isinstance(v, (_Seq, sp.Expr)) else v
    if isinstance(v, RealSet):
        return v.set
    if isinstance(v, Tup) and v.paren and len(v.items) == 2:
        return _interval(v.items, True, True)
    if isinstance(v, FSet) and v.kind == "set" and all(isinstance(x, Num) for x in v.items):
        return sp.FiniteSet(*[x.expr for x in v.items])
    if not isinstance(v, Rel) or any(p is None for p in v.parts):
        return None
    syms = set().union(*[p.expr.free_symbols for p in v.parts])
    if len(syms) != 1 or (var is not None and syms != {var}):
        return None
    x = syms.pop()
    out = sp.S.Reals
    for op, a, b in zip(v.ops, v.parts, v.parts[1:]):
        d = a.expr - b.expr                              # a op b  <=>  d op 0, d = k x + c
        k = sp.diff(d, x)
        if k.free_symbols:                               # not linear: a small polynomial inequality?
            piece = _poly_solution_set(d, x, op)
            if piece is None:
                return None
            out = sp.Intersection(out, piece)
            continue
        if not k.is_number or k == 0 or not k.is_real:
            return None
        c = -(d - k * x) / k
        if c.free_symbols or not c.is_real:
            return None
        op = op if k > 0 else _FLIP[op]                  # x op c
        piece = {"<": sp.Interval.open(-sp.oo, c), "<=": sp.Interval(-sp.oo, c), ">": sp.Interval.open(c, sp.oo),
                 ">=": sp.Interval(c, sp.oo), "=": sp.FiniteSet(c),
                 "!=": sp.Union(sp.Interval.open(-sp.oo, c), sp.Interval.open(c, sp.oo))}[op]
        out = sp.Intersection(out, piece)
    return out


def _poly_solution_set(d: sp.Expr, x: sp.Symbol, op: str) -> sp.Set | None:
    """Solution set of d op 0 for a quadratic d with small rational coefficients (x^2 < 4). Higher degrees are
    left out on purpose: sympy can take minutes on a quartic with large coefficients, uninterruptibly."""
    if op not in ("<", "<=", ">", ">="):
        return None
    try:
        poly = sp.Poly(d, x)
    except sp.PolynomialError:
        return None
    coeffs = poly.all_coeffs()
    if poly.degree() > 2 or not all(c.is_Rational and max(abs(c.p), c.q).bit_length() <= 32 for c in coeffs):
        return None
    rel = {"<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge}[op](poly.as_expr(), 0)
    try:
        return solve_univariate_inequality(rel, x, relational=False)
    except (NotImplementedError, ValueError, TypeError):
        return None


def _classify_special(s: str) -> Choice | Text | None:
    m = re.fullmatch(r"\(([A-J])\)(?:\s(.*))?|([A-J])\)?", s)
    if m and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", m.group(2) or "")):
        return Choice(m.group(1) or m.group(3))          # "(B)", "B", "(B) 12"; not "(B) or (C)"
    probe = re.sub(r"\\(?:begin|end)\{[A-Za-z*]+\}|\\[A-Za-z]+", " ", s)
    words = re.findall(r"[A-Za-z]{3,}", probe)
    if any(w.lower() not in _MATH_WORDS for w in words):
        text = re.sub(r"[^a-z0-9 ]", " ", s.lower())
        text = re.sub(r"^(?:the|a|an)\s+", "", re.sub(r"\s+", " ", text).strip())
        return Text(text)
    return None


def parse_value(answer: str, cfg: VerifyConfig = CFG):
    """Parse an answer string into a typed value (raises ParseError or _Timeout)."""
    if len(answer) > cfg.max_answer_chars:
        raise ParseError("answer too long")
    s = _normalize(answer)
    if not s:
        raise ParseError("empty answer")
    word = re.fullmatch(r"\s*\\(?:text|textbf|textrm|mathrm|mbox)\s*\{\s*([A-Za-z][A-Za-z ]*[A-Za-z])\s*\}\W*", answer)
    if (word and "\\" not in s) or s.lower() in ("no", "yes"):              # \text{no} is a word, not n*o
        return Text(re.sub(r"\s+", " ", (word.group(1) if word else s).lower()).strip())
    special = _classify_special(s)
    if special is not None:
        return special
    n_pm = len(re.findall(r"\\(?:pm|mp)(?![A-Za-z])", s))
    if n_pm:                                             # 1 \pm \sqrt2 -> the set of both values
        if n_pm > 3:
            raise ParseError("too many \\pm")
        variants = [s]
        for _ in range(n_pm):
            variants = [re.sub(r"\\(?:pm|mp)(?![A-Za-z])", sign, v, count=1) for v in variants for sign in "+-"]
        items = []
        for v in variants:
            val = _parse_plain(v, cfg)
            items.extend(val.items if isinstance(val, FSet) and val.kind != "hedge" else [val])
        return FSet(items, "set")
    if s.endswith("%"):                                  # 50% reads as 0.5 or as 50
        val = _parse_plain(s[:-1], cfg)
        if isinstance(val, Num):
            return Num(val.expr / 100, None, val.expr)
    return _parse_plain(s, cfg)


def _parse_plain(s: str, cfg: VerifyConfig):
    try:
        return _Parser(_tokenize(s), cfg).top()
    except (ParseError, _Timeout):
        raise
    except (ValueError, TypeError, ArithmeticError, AttributeError, NotImplementedError, RecursionError) as e:
        raise ParseError(f"sympy rejected the expression ({type(e).__name__})") from None   # hostile input


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
    va, vb = _mp_number(a, digits), _mp_number(b, digits)
    return va is not None and vb is not None and abs(va - vb) <= _mp_ctx(digits).mpf(10) ** tol_exp10


class _Inconclusive(Exception):
    pass


_MP_FUNCS = {sp.sin: "sin", sp.cos: "cos", sp.tan: "tan", sp.cot: "cot", sp.sec: "sec", sp.csc: "csc",
             sp.asin: "asin", sp.acos: "acos", sp.atan: "atan", sp.sinh: "sinh", sp.cosh: "cosh", sp.tanh: "tanh",
             sp.exp: "exp", sp.log: "log", sp.Abs: "fabs", sp.floor: "floor", sp.ceiling: "ceil",
             sp.factorial: "factorial", sp.factorial2: "fac2", sp.binomial: "binomial", sp.gamma: "gamma"}


def _mp_ctx(dps: int = _P1) -> mpmath.ctx_mp.MPContext:
    """A thread-local mpmath context with `dps` digits (mpmath.mp itself is process-global)."""
    cache = getattr(_LOCAL, "mp", None)
    if cache is None:
        cache = _LOCAL.mp = {}
    if dps not in cache:
        cache[dps] = mpmath.MPContext()
        cache[dps].dps = dps
    return cache[dps]


def _mp_eval(e: sp.Basic, env: dict, ctx):
    """Evaluate a sympy tree at a point with our own walker: every function argument and exponent is
    magnitude-checked first, so no probe can hang inside mpmath (sympy's evalf computed gamma(2^12345))."""
    _tick()
    if e.is_Symbol:
        return env[e]
    if e.is_Rational:
        return ctx.mpf(int(e.p)) / int(e.q)
    if e.is_Float:
        return ctx.mpf(e._mpf_)
    if e is sp.pi:
        return ctx.pi
    if e is sp.E:
        return ctx.e
    if e is sp.I:
        return ctx.mpc(0, 1)
    args = [_mp_eval(a, env, ctx) for a in e.args]
    if isinstance(e, sp.Add):
        return ctx.fsum(args)
    if isinstance(e, sp.Mul):
        return ctx.fprod(args)
    if isinstance(e, sp.Pow):
        if ctx.mag(args[1]) > 20 or (args[0] == 0 and ctx.re(args[1]) <= 0):
            raise _Inconclusive                          # |exponent| > ~1e6, or 0^-1
        return ctx.power(args[0], args[1])
    name = _MP_FUNCS.get(type(e))
    if name is None or (len(args) > 1 and name != "binomial"):
        raise _Inconclusive                              # e.g. log with a base is log(x)/log(b) already
    if name != "log" and any(ctx.mag(a) > 20 for a in args):
        raise _Inconclusive
    return getattr(ctx, name)(*args)


def _probe_value(e: sp.Expr, env: dict, ctx):
    try:
        v = _mp_eval(e, env, ctx)
    except (_Inconclusive, ZeroDivisionError, ValueError, OverflowError, TypeError):
        return None
    return v if ctx.isfinite(v) else None


def _mp_number(e: sp.Expr, dps: int):
    """The value of a constant expression at `dps` digits, or None (we never call sympy's evalf: on some
    constants it runs for minutes, see _mp_eval)."""
    if e.free_symbols:
        return None
    return _probe_value(e, {}, _mp_ctx(dps))


def _mp_close(a, b, digits: int, ctx) -> bool:
    scale = max(abs(a), abs(b))
    return scale == 0 or abs(a - b) <= scale * ctx.mpf(10) ** (-digits)


def _probe_eq(a: sp.Expr, b: sp.Expr, cfg: VerifyConfig, ratio: bool = False, positive: bool = False) -> bool:
    """a == b (or a == c*b for a constant c != 0 when ratio) at random points, mixed signs, 30 digits."""
    syms = sorted(a.free_symbols | b.free_symbols, key=str)
    rng, ctx = random.Random(20251126), _mp_ctx()
    good, c0 = 0, None
    for _ in range(3 * cfg.n_probes):
        if good >= cfg.n_probes:
            break
        env = {s: ctx.mpf(rng.choice((-1, 1)) * rng.uniform(0.3, 2.3)) for s in syms}
        va, vb = _probe_value(a, env, ctx), _probe_value(b, env, ctx)
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
        va, vb = _mp_number(ge, prec), _mp_number(pe, prec)
        if va is None or vb is None or not _mp_close(va, vb, prec - 8, _mp_ctx(prec)):
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
        op, a, b = _FLIP[op], b, a
    return op, a - b


def _rel_eq(g: Rel, p: Rel, cfg: VerifyConfig) -> bool:
    if any(x is None for x in g.parts + p.parts):
        return False
    if not ({"=", "!="} >= set(g.ops) and {"=", "!="} >= set(p.ops)) or len(g.parts) > 2:
        gs, ps = _as_realset(g), _as_realset(p)
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
        _tick()
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
    _tick()
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
            gs, ps = _as_realset(g), _as_realset(p)
            return gs is not None and ps is not None and _set_eq(gs, ps, cfg)
        return False
    if isinstance(g, RealSet):
        if isinstance(g.set, sp.FiniteSet) and isinstance(p, (Num, FSet)) and getattr(p, "kind", "") != "hedge":
            return _unordered_eq([Num(e) for e in g.set.args], p.items if isinstance(p, FSet) else [p], cfg)
        ps = _as_realset(p) if isinstance(p, (Rel, RealSet, Tup)) else None
        return ps is not None and _set_eq(g.set, ps, cfg)
    if isinstance(g, Tup):
        if isinstance(p, Tup) or (isinstance(p, FSet) and p.kind == "list"):
            return _ordered_eq(g.items, p.items, cfg)
        if isinstance(p, (RealSet, Rel)) and g.paren and len(g.items) == 2:
            gs, ps = _as_realset(g), _as_realset(p)        # (-2, 3) read as an open interval
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
    _LOCAL.deadline = time.perf_counter() + cfg.time_budget_s
    try:
        g_text = _gold_answer(gold, cfg)
        if g_text is None or len(g_text) > cfg.max_answer_chars:
            return Verdict(False, "bad_gold", None)
        answer = state["answer"] = extract_answer(completion, cfg)
        if answer is None:
            return Verdict(False, "no_answer", None)
        try:
            g_norm = _normalize(g_text)
        except ParseError:
            return Verdict(False, "bad_gold", answer)
        try:
            p_norm = _normalize(answer)
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
    except _Timeout:
        return Verdict(False, "timeout", answer)
    except Exception:                                    # RecursionError, MemoryError, sympy internals
        return Verdict(False, "error", answer)
    finally:
        _LOCAL.deadline = float("inf")


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
