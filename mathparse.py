"""mathparse.py: answer text -> typed value, with our own parser (the verifier's front end; see verify.py).

    parse_value(r"\\frac{1}{2}")     -> Num(expr=1/2)
    parse_value("2.50")              -> Num(expr=5/2, dec=(3, 2))        # a decimal keeps its precision
    parse_value("50\\%")             -> Num(expr=1/2, alt=50)            # percent: both readings
    parse_value(r"(-\\infty, 2]")    -> RealSet(Interval(-oo, 2))
    parse_value(r"1 \\pm \\sqrt2")    -> FSet([1 + sqrt(2), 1 - sqrt(2)], "set")
    parse_value("3 or 4")            -> FSet([3, 4], "hedge")
    normalize(r"\\$1{,}000 \\text{ dollars}.")  -> "1000"

Two steps. normalize (string -> string): unicode, full-width digits, \\dfrac, \\left, spacing, thousands
separators incl. 10,\\!000, currency, trailing unit words, degree signs, \\text, repeating decimals, trailing
punctuation. Then a recursive-descent parser over our own tokens builds sympy objects and wraps them in a typed
value: Num, Rel (equation / inequality), Tup, RealSet (interval, union, one-variable linear or quadratic
inequality, set-builder), FSet (set / list / hedge), Mat, Text, Choice. Precedence, loosest first: the list
separators , ; and or, then \\cup / \\cap, relations, + -, * / and juxtaposition, unary signs, ^, postfix ! and %.
Conventions: e is Euler's number, i the imaginary unit, \\log the natural log, \\sin 2x is sin(2x),
\\sqrt[3]{-8} = -2, 2\\frac12 = 5/2, \\pm expands to a set.
Known limits: inequalities beyond linear and quadratic ones stay relations (as_realset gives None); ratios "3:4"
do not parse (ParseError; the verifier fails closed unless the texts are identical).

Security: the text is untrusted. Nothing here calls eval, exec, sympify or parse_expr: sympy objects are built
from tokens. Every expensive construction is bounded before sympy sees it, by VerifyConfig (answer length,
nesting depth, integer bits, exponent, factorial size, function argument magnitudes, items) and by fixed caps
(400-digit numerals, root index 1000, 16 union pieces, 3 \\pm signs); constants are sized with mathvalue's
evaluator rather than sympy's evalf, and the tokenizer and parser check the per-call deadline. A bound hit, or a
sympy error on hostile input, raises ParseError. VerifyConfig lives here, below verify.py, because most of its
bounds are enforced here.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

import sympy as sp

from mathvalue import (
    Choice,
    FSet,
    Mat,
    Num,
    RealSet,
    Rel,
    Seq,
    Text,
    Timeout,
    Tup,
    as_realset,
    finish,
    mp_ctx,
    mp_number,
    tick,
)

# --------------------------------------------------------------------------------------------------------
# The verifier's bounds, errors and brace matching (shared with verify.py)

@dataclass(frozen=True)
class VerifyConfig:
    """Every bound and time budget of the verifier, parse and compare alike (verify.py re-exports it). Frozen,
    so it can key the gold cache; it travels to batch worker processes with each item."""
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


class ParseError(ValueError):
    """Text we cannot or will not read: malformed, unsupported, or over a bound."""


def match_brace(text: str, i: int) -> int | None:
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
        end = match_brace(s, m.end())
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


def normalize(s: str) -> str:
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
        tick()
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
                v = mp_number(e, 15)
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
        ctx = mp_ctx(50)
        v = mp_number(x, 50)
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
            return finish(items[0])
        sets = [as_realset(v) for v in items] if all(isinstance(v, Rel) for v in items) else None
        if "or" in seps:
            if sets and all(s is not None for s in sets) and set(seps) == {"or"}:
                return RealSet(sp.Union(*sets))          # "x < -1 or x > 2"
            return FSet([finish(v) for v in items], "hedge")
        inequalities = all(isinstance(v, Rel) and "=" not in v.ops for v in items)
        if sets and all(s is not None for s in sets) and set(seps) == {"and"} and inequalities:
            return RealSet(sp.Intersection(*sets))        # "x > -2 and x < 3"
        return FSet([finish(v) for v in items], "list")

    def item(self):
        """A \\cup / \\cap chain of sets (\\cap binds tighter); one sympy Union at the end, as it is slow."""
        v = self.rel()
        if self.peek()[1] not in ("\\cup", "\\cap"):
            return v
        union = [as_realset(v)]
        while (op := self.accept("\\cup", "\\cap")) is not None:
            s = as_realset(self.rel())
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
        return FSet([finish(v) for v in items], "set")

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
        return Seq(open_, close, items)

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
            return Tup([finish(v) for v in items], paren=False)
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
            sets = [as_realset(v, var) for v in items]
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
        return FSet([finish(v) for v in items], "set")

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
    """Parse an answer string into a typed value (raises ParseError or Timeout)."""
    if len(answer) > cfg.max_answer_chars:
        raise ParseError("answer too long")
    s = normalize(answer)
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
    except (ParseError, Timeout):
        raise
    except (ValueError, TypeError, ArithmeticError, AttributeError, NotImplementedError, RecursionError) as e:
        raise ParseError(f"sympy rejected the expression ({type(e).__name__})") from None   # hostile input
