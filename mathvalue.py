"""mathvalue.py: the typed values that mathparse.py builds and verify.py compares, and how to read them as
numbers and as sets of reals -- all under a per-call deadline.

    Num(sp.Rational(5, 2), dec=(3, 2))              # "2.50": the value and the precision it was written with
    as_realset(mathparse.parse_value("x^2 < 4"))    # -> Interval.open(-2, 2); None for what is not a set of reals
    mp_number(sp.sqrt(2) / 3, 30)                   # -> mpf('0.4714...'); None when it cannot be evaluated safely
    probe_value(x**2 + 1, {x: ctx.mpf(2)}, ctx)     # -> mpf('5.0') (ctx = mp_ctx(30)), for equality probes
    LOCAL.deadline = time.perf_counter() + 1.0      # verify.grade sets it; tick() raises Timeout once it passes

The deadline is thread-local and cooperative: the tokenizer, the parser, the evaluator below and the comparisons
call tick(), so it works in any thread (signal.alarm works only on the main one); verify.py adds the hard limits.

Sets of reals: intervals, unions, finite sets, and one-variable relations -- linear ones solved directly,
quadratics with small rational coefficients by sympy (higher degrees are left out: sympy can hang on them).

Numbers come from our own walker over the sympy tree on mpmath, never from sympy's evalf: evalf ran for minutes
on constants that fuzzing found (gamma(2^12345)), and evalf with chop is why Math-Verify equates 1/2004! and
1/2006!. Every exponent and every function argument except log's is magnitude-checked (below about 1e6) before
mpmath sees it; a value that fails a check, or a function we do not know, is inconclusive: None, and the caller
fails closed.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import mpmath
import sympy as sp
from sympy.solvers.inequalities import solve_univariate_inequality

# --------------------------------------------------------------------------------------------------------
# Deadline: thread-local, checked inside the tokenizer, parser, evaluator and comparisons.

LOCAL = threading.local()       # .deadline (perf_counter seconds; set by verify.grade), .mp (mpmath contexts)


class Timeout(Exception):
    pass


def tick() -> None:
    if time.perf_counter() > getattr(LOCAL, "deadline", float("inf")):
        raise Timeout


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
class Seq:                                 # bracketed comma list before we know what it is
    open: str
    close: str
    items: list


def finish(v):
    """Turn parser intermediates into final typed values."""
    if isinstance(v, sp.Expr):
        return Num(v)
    if isinstance(v, Seq):
        items = [finish(x) for x in v.items]
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


# --------------------------------------------------------------------------------------------------------
# Values as sets of reals

FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}


def as_realset(v, var: sp.Symbol | None = None) -> sp.Set | None:
    """A value read as a set of reals: intervals, finite sets, one-variable linear or quadratic
    relations."""
    v = finish(v) if isinstance(v, (Seq, sp.Expr)) else v
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
        op = op if k > 0 else FLIP[op]                   # x op c
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


# --------------------------------------------------------------------------------------------------------
# Numbers: our own walker on mpmath (never sympy's evalf)

class _Inconclusive(Exception):
    pass


_MP_FUNCS = {sp.sin: "sin", sp.cos: "cos", sp.tan: "tan", sp.cot: "cot", sp.sec: "sec", sp.csc: "csc",
             sp.asin: "asin", sp.acos: "acos", sp.atan: "atan", sp.sinh: "sinh", sp.cosh: "cosh", sp.tanh: "tanh",
             sp.exp: "exp", sp.log: "log", sp.Abs: "fabs", sp.floor: "floor", sp.ceiling: "ceil",
             sp.factorial: "factorial", sp.factorial2: "fac2", sp.binomial: "binomial", sp.gamma: "gamma"}


def mp_ctx(dps: int) -> mpmath.ctx_mp.MPContext:
    """A thread-local mpmath context with `dps` digits (mpmath.mp itself is process-global)."""
    cache = getattr(LOCAL, "mp", None)
    if cache is None:
        cache = LOCAL.mp = {}
    if dps not in cache:
        cache[dps] = mpmath.MPContext()
        cache[dps].dps = dps
    return cache[dps]


def _mp_eval(e: sp.Basic, env: dict, ctx):
    """Evaluate a sympy tree at a point with our own walker: every function argument and exponent is
    magnitude-checked first, so no probe can hang inside mpmath (sympy's evalf computed gamma(2^12345))."""
    tick()
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


def probe_value(e: sp.Expr, env: dict, ctx):
    try:
        v = _mp_eval(e, env, ctx)
    except (_Inconclusive, ZeroDivisionError, ValueError, OverflowError, TypeError):
        return None
    return v if ctx.isfinite(v) else None


def mp_number(e: sp.Expr, dps: int):
    """The value of a constant expression at `dps` digits, or None (we never call sympy's evalf: on some
    constants it runs for minutes, see _mp_eval)."""
    if e.free_symbols:
        return None
    return probe_value(e, {}, mp_ctx(dps))
