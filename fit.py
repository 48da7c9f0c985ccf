"""The Plasticity-Ceiling analysis: robust sigmoid fits of performance against compute.

The paper (RETU, arXiv 2512.11470, Sec. 4 and App. D) models post-training performance against compute x with a
sigmoidal power law (Eq. 11)

    P(x) = P_start + (A - P_start) / (1 + (x / C_mid)^(-B)),

reads the ceiling A off the fit, and decomposes an SFT-then-RL pipeline as A_post = P_sft + PL_rl (Eq. 10-12): an
RL branch started from an SFT checkpoint starts at P_start = P_sft and PL_rl = A_post - P_sft is its plasticity.
This module fits those curves, labels SFT sub-phases from the validation loss (Sec. 6.2.1, Eq. 13-17), builds the
decomposition table with bootstrap uncertainty; fit_table4.py reproduces the paper's Table 4 with it.

The fit (`fit_curve`) follows App. D:
  * train/validation split by index (first points fit, later points validate);
  * stage 1: iterative modified z-score rejection, M_i = 0.6745 (r_i - median r) / MAD, drop |M_i| > tau, refit,
    until the inlier set stops changing (Eq. 28-29; every round re-scores all training points, see zscore_reject);
  * stage 2 (optional): Least Trimmed Squares, h = floor(N_fit * alpha) with N_fit the stage-1 inliers, C-steps
    (fit the h best points, re-select, refit) until the subset stops changing (Eq. 30). As in App. D the C-steps
    start from the current (stage-1) estimate, which is deterministic. The trimmed objective is multi-modal on
    real curves, so the start decides the fixed point. Options (FitConfig): `lts_starts` random h-subset starts;
    `lts_guess_start` also starts from the initial-guess curve (A = max y, C_mid = median x, B = 1, the start
    values of the authors' curve_fit); `lts_select` keeps the fixed point with the lowest trimmed sum of squares
    ("trimmed", Eq. 30, default) or the lowest validation RMSE ("val"). The authors' internal fitter, as
    reconstructed from its logs, is lts_guess_start=True, lts_select="val": it reproduces the paper's Table 4 on
    26 of 33 curves (fit_table4.py says how this was found and why the other 7 differ).
Every least-squares fit uses variable projection: for fixed (C_mid, B) the model is linear in (P_start, A), so a
log-spaced grid over (C_mid, B) with A solved in closed form finds the basin, and scipy's bounded trust-region
least squares refines (PL = A - P_start, log C_mid, log B) from the best grid points. The fit is deterministic
and does not depend on a hand-picked start.

Deviations from the paper and from the authors' released fitter, all deliberate:
  * The released fitter parses the outlier and LTS settings and never uses them; here both stages run.
  * Plasticity is constrained to PL >= 0 (the curve rises from P_start to A). Without it a collapse at the end of
    a run (s1K step 62) is "fitted" as a falling sigmoid with a ceiling below the start.
  * A fit whose midpoint C_mid lies beyond the last training point, or that ends on a bound, is reported as
    status "not identifiable": the data never bend, so the ceiling is an extrapolation the optimiser's bounds
    decide. The released code reports such fits (A = 100 on the gain axis) as ceilings.
  * The paper reports no uncertainty. `bootstrap_ceiling` resamples residuals (and, optionally, the benchmark
    noise of P_sft) to give percentile CIs for A_post and PL_rl; `analyze` says when two checkpoints' ceilings
    differ by less than that noise. An interval whose upper tail holds replicates that are not identifiable is
    reported open above (inf), not with the runaway value the optimiser's bounds gave them.
  * Sub-phases: the paper's Eq. 15 makes "stable" the *set* T_stable, which can be non-contiguous (several
    minima); we label the whole interval [min T_stable, max T_stable] stable so the phases are time intervals.
  * Table 4 splits: the requested train range is clipped to the points that exist; the released code instead
    falls back to a 70/30 split for s1K step 62.

Table 4 of the paper is reproduced in fit_table4.py (`python fit_table4.py`): 26 of 33 A_post within 0.3 points
with the authors' LTS selection, 21 with Eq. 30; the released code gets 15.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

# Deduplicated benchmark sizes of the paper (Sec. 5.1); "overall" is the problem-weighted mean (2157 problems).
PAPER_BENCH_SIZES = {"gsm8k": 1317, "olympiad_bench": 291, "math": 237, "minerva": 262, "aime": 25, "aime25": 25}
SUBPHASES = ("adaptive", "stable", "mild", "severe")


@dataclass
class FitConfig:
    outlier_threshold: float | None = None  # tau of stage 1; None disables stage 1
    lts_alpha: float | None = None  # alpha of stage 2 (LTS); None disables it
    lts_starts: int = 0  # extra random h-subset starts for LTS (FAST-LTS style) besides the stage-1 fit
    lts_guess_start: bool = False  # also start the C-steps from the initial-guess curve (the authors' fitter)
    lts_select: str = "trimmed"  # among the C-step fixed points: "trimmed" (Eq. 30) or "val" (the authors' fitter)
    free_start: bool = False  # fit P_start too (the paper's epsilon) instead of fixing it
    b_bounds: tuple[float, float] = (0.05, 50.0)  # steepness B
    c_span: float = 100.0  # C_mid may range over [min x>0 / 10, max x * c_span]
    grid: tuple[int, int] = (14, 10)  # variable-projection grid over (log C_mid, log B)
    max_iter: int = 50  # cap on stage-1 rounds and on C-steps
    seed: int = 0  # LTS subset sampling


@dataclass
class FitResult:
    P_start: float
    A: float
    C_mid: float
    B: float
    status: str  # "ok" or "not identifiable"
    reason: str  # why not identifiable ("" when ok)
    r2_train: float  # on the points of the final fit
    rmse_val: float  # on the validation points (nan when there are none)
    inliers: np.ndarray  # (N,) bool: training points used by the final fit
    train: np.ndarray  # (N,) bool
    val: np.ndarray  # (N,) bool
    n_outliers: int  # dropped by stage 1
    n_trimmed: int  # trimmed by stage 2 (LTS)
    config: FitConfig = field(repr=False, default_factory=FitConfig)

    @property
    def PL(self) -> float:
        return self.A - self.P_start

    def predict(self, x) -> np.ndarray:
        return sigmoid_power_law(x, self.P_start, self.A, self.C_mid, self.B)


def sigmoid_power_law(x, P_start: float, A: float, C_mid: float, B: float) -> np.ndarray:
    """Eq. 11: P_start + (A - P_start) / (1 + (x / C_mid)^(-B)); x = 0 gives P_start (its limit for B > 0)."""
    return P_start + (A - P_start) * _gate(np.asarray(x, dtype=np.float64), math.log(C_mid), B)


def _gate(x: np.ndarray, log_c: float, b: float) -> np.ndarray:
    # 1 / (1 + (x/C)^-B) = expit(B (log x - log C)): no overflow for huge (x/C)^-B, exact 0 at x = 0
    out = np.zeros(x.shape)
    pos = x > 0
    out[pos] = expit(b * (np.log(x[pos]) - log_c))
    return out


# ----------------------------------------------------------------------------------------------------------------
# least squares on one point set


@dataclass
class _Box:
    log_c: tuple[float, float]
    log_b: tuple[float, float]


def _box(x: np.ndarray, cfg: FitConfig) -> _Box:
    xp = x[x > 0]
    return _Box((math.log(xp.min() / 10.0), math.log(x.max() * cfg.c_span)), tuple(map(math.log, cfg.b_bounds)))


def _profile(x, y, log_c, b, p_start, free):
    """Best (P_start, A) for fixed (C_mid, B) in closed form, with PL >= 0; returns (s, A, sse)."""
    g = _gate(x, log_c, b)
    if free:
        design = np.stack([1.0 - g, g], axis=1)  # (n, 2)
        (s, a), *_ = np.linalg.lstsq(design, y, rcond=None)
        if a < s:  # PL >= 0 violated: the constrained optimum is the flat line
            s = a = float(y.mean())
    else:
        s = p_start
        gg = float(g @ g)
        a = s + max(float(g @ (y - s)) / gg, 0.0) if gg > 0 else s
    r = y - (s + (a - s) * g)
    return float(s), float(a), float(r @ r)


def _lsq(x, y, p_start, cfg: FitConfig, box: _Box, init: tuple | None = None, n_grid_starts: int = 3):
    """Least squares of Eq. 11 on (x, y): local refinements from `init` and the best `n_grid_starts` grid points;
    returns (s, A, log C, log B, sse)."""
    free = cfg.free_start
    lc_grid = np.linspace(*box.log_c, cfg.grid[0] + 2)[1:-1]  # interior points only
    lb_grid = np.linspace(*box.log_b, cfg.grid[1] + 2)[1:-1]
    scored = []
    for lc in lc_grid:
        for lb in lb_grid:
            s, a, sse = _profile(x, y, lc, math.exp(lb), p_start, free)
            scored.append((sse, s, a, lc, lb))
    scored.sort(key=lambda t: t[0])
    starts = [t[1:] for t in scored[:n_grid_starts]]
    if init is not None:
        starts.insert(0, init)

    def residuals(th):
        s, pl, lc, lb = th if free else (p_start, *th)
        return s + pl * _gate(x, lc, math.exp(lb)) - y

    lo = np.array(([-np.inf] if free else []) + [0.0, box.log_c[0], box.log_b[0]])
    hi = np.array(([np.inf] if free else []) + [np.inf, box.log_c[1], box.log_b[1]])
    best = None
    for s, a, lc, lb in starts:
        th0 = ([s] if free else []) + [a - s, lc, lb]
        th0 = np.clip(th0, lo + 1e-9, hi - 1e-9)  # strictly inside (inf +- 1e-9 stays inf)
        sol = least_squares(residuals, th0, bounds=(lo, hi), x_scale="jac", max_nfev=1000)
        if best is None or sol.cost < best.cost:
            best = sol
    s, pl, lc, lb = best.x if free else (p_start, *best.x)
    return float(s), float(s + pl), float(lc), float(lb), 2.0 * float(best.cost)


def _resid(x, y, th) -> np.ndarray:
    s, a, lc, lb = th[:4]
    return y - (s + (a - s) * _gate(x, lc, math.exp(lb)))


# ----------------------------------------------------------------------------------------------------------------
# the two robust stages


def zscore_reject(x, y, p_start: float, cfg: FitConfig, box: _Box):
    """Stage 1 (Eq. 28-29): returns (keep mask, fit on the kept points).

    Each round scores *every* training point against the current fit, with median and MAD taken over the current
    inliers, and refits on the points with |M| <= tau, until the inlier set stops changing. Re-scoring all points
    (not only the survivors) matters: the first fit is dragged towards the outliers, so good points near it can
    look deviant in round one (with one-sided outliers, even the x = 0 anchor) and must be able to come back.
    """
    keep = np.ones(len(x), dtype=bool)
    th = _lsq(x, y, p_start, cfg, box)
    if cfg.outlier_threshold is None:
        return keep, th
    seen = {keep.tobytes()}
    for _ in range(cfg.max_iter):
        r = _resid(x, y, th)
        med = np.median(r[keep])
        mad = np.median(np.abs(r[keep] - med))
        if mad <= 1e-12 * (1 + np.abs(y).max()):  # (near) exact fit: no scale to judge outliers by
            break
        new = np.abs(0.6745 * (r - med) / mad) <= cfg.outlier_threshold
        if np.array_equal(new, keep) or new.sum() < 4 or new.tobytes() in seen:  # converged, or a cycle
            break
        keep = new
        seen.add(keep.tobytes())
        th = _lsq(x[keep], y[keep], p_start, cfg, box, init=th[:4])
    return keep, th


def lts_fit(x, y, p_start: float, cfg: FitConfig, box: _Box, start: tuple, x_val=None, y_val=None):
    """Stage 2 (Eq. 30): LTS by C-steps from several starts; returns (subset mask, fit).

    Starts: the stage-1 fit `start`; with cfg.lts_guess_start the initial-guess curve (P_start, A = max y,
    C_mid = median x > 0, B = 1; the start values of the authors' curve_fit); cfg.lts_starts random h-subsets. Each
    start runs C-steps to a fixed point. cfg.lts_select picks among the fixed points: "trimmed", the lowest trimmed
    sum of squares (Eq. 30), or "val", the lowest RMSE on (x_val, y_val) -- what the authors' fitter did (see the
    module docstring); without validation points "val" falls back to "trimmed".
    """
    if cfg.lts_select not in ("trimmed", "val"):
        raise ValueError(f"FitConfig.lts_select={cfg.lts_select!r} must be 'trimmed' or 'val'")
    n = len(x)
    h = int(math.floor(n * cfg.lts_alpha))
    if h < 4:
        raise ValueError(f"LTS: h = floor({n} * {cfg.lts_alpha}) = {h} points, need at least 4")
    rng = np.random.default_rng(cfg.seed)
    starts = [start]
    if cfg.lts_guess_start:
        s0 = p_start if not cfg.free_start else float(y.min())
        starts.append((s0, max(float(y.max()), s0), math.log(float(np.median(x[x > 0]))), 0.0))
    for _ in range(cfg.lts_starts):
        sub = np.sort(rng.choice(n, size=h, replace=False))
        starts.append(_lsq(x[sub], y[sub], p_start, cfg, box))
    by_val = cfg.lts_select == "val" and x_val is not None and len(x_val) > 0
    best = None
    for th in starts:
        subset = None
        for _ in range(cfg.max_iter):
            new = np.sort(np.argsort(_resid(x, y, th) ** 2, kind="stable")[:h])  # the h smallest residuals
            if subset is not None and np.array_equal(new, subset):
                break
            subset = new
            th = _lsq(x[subset], y[subset], p_start, cfg, box, init=th[:4])
        if by_val:
            crit = float(np.mean(_resid(x_val, y_val, th) ** 2))
        else:
            crit = float(np.sort(_resid(x, y, th) ** 2)[:h].sum())
        if best is None or crit < best[0] - 1e-12:
            best = (crit, subset, th)
    mask = np.zeros(n, dtype=bool)
    mask[best[1]] = True
    return mask, best[2]


def _index_mask(n: int, rng, default: tuple[int, int], name: str) -> np.ndarray:
    lo, hi = default if rng is None else rng
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))) or lo < 0 or hi < lo:
        raise ValueError(f"fit_curve: {name}={rng!r} must be a (start, end) pair of indices with 0 <= start <= end")
    mask = np.zeros(n, dtype=bool)
    mask[min(lo, n) : min(hi, n)] = True  # clipped to the points that exist
    return mask


def fit_curve(
    x,
    y,
    *,
    p_start: float = 0.0,
    free_start: bool = False,
    train: tuple[int, int] | None = None,
    val: tuple[int, int] | None = None,
    outlier_threshold: float | None = None,
    lts_alpha: float | None = None,
    config: FitConfig | None = None,
) -> FitResult:
    """Robust fit of Eq. 11 to points (x_i, y_i) sorted by compute x (App. D).

    `train` / `val` are half-open index ranges (default: first 85% train, rest validation, as in App. D.1),
    clipped to the data. With free_start=False, P_start is fixed to `p_start` (for an RL branch: P_sft, with the
    SFT checkpoint itself as the point x = 0). `outlier_threshold` (tau) and `lts_alpha` switch the two robust
    stages on (both off by default: plain least squares; the paper uses tau = 2.5 to 4 on every curve);
    `config` carries the rest (bounds, grid, LTS starts, seed), and these keyword arguments override its fields.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"fit_curve: x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    bad = np.flatnonzero(~np.isfinite(x) | ~np.isfinite(y) | (x < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"fit_curve: point {i} (x={x[i]}, y={y[i]}) is not finite or has negative compute")
    unsorted = np.flatnonzero(np.diff(x) < 0)
    if unsorted.size:
        i = int(unsorted[0])
        raise ValueError(f"fit_curve: x must be sorted by compute; x[{i}]={x[i]} > x[{i + 1}]={x[i + 1]}")
    if lts_alpha is not None and not 0.5 <= lts_alpha <= 1.0:
        raise ValueError(f"fit_curve: lts_alpha={lts_alpha} must lie in [0.5, 1]")
    cfg = FitConfig(**{**(config or FitConfig()).__dict__, "outlier_threshold": outlier_threshold,
                       "lts_alpha": lts_alpha, "free_start": free_start})
    n = len(x)
    n_train_default = math.ceil(0.85 * n)
    train_mask = _index_mask(n, train, (0, n_train_default), "train")
    val_mask = _index_mask(n, val, (n_train_default, n), "val") & ~train_mask
    xt, yt = x[train_mask], y[train_mask]
    if len(xt) < 4 or (xt > 0).sum() < 3:
        raise ValueError(f"fit_curve: {len(xt)} training points ({(xt > 0).sum()} with x > 0); need >= 4 and >= 3")
    box = _box(xt, cfg)

    keep, th = zscore_reject(xt, yt, p_start, cfg, box)  # stage 1
    used = keep.copy()
    if cfg.lts_alpha is not None:  # stage 2 on the stage-1 inliers
        subset, th = lts_fit(xt[keep], yt[keep], p_start, cfg, box, th, x[val_mask], y[val_mask])
        used[np.flatnonzero(keep)[~subset]] = False
    s, a, lc, lb = th[:4]

    status, reason = "ok", ""
    x_last = float(xt[used].max())
    eps = 1e-4
    if lb <= box.log_b[0] + eps or lb >= box.log_b[1] - eps:
        status, reason = "not identifiable", f"B={math.exp(lb):.3g} ends on its bound {cfg.b_bounds}"
    elif lc <= box.log_c[0] + eps or lc >= box.log_c[1] - eps:
        status, reason = "not identifiable", (
            f"C_mid={math.exp(lc):.3g} ends on its bound [{math.exp(box.log_c[0]):.3g}, {math.exp(box.log_c[1]):.3g}]")
    elif a - s <= 1e-6 * (1 + abs(s)):
        status, reason = "not identifiable", "no rise: plasticity ends on its bound 0"
    elif math.exp(lc) > x_last:
        status, reason = "not identifiable", (
            f"C_mid={math.exp(lc):.3g} lies beyond the last training point x={x_last:.3g}: the data never bend")

    ru = _resid(xt[used], yt[used], th)
    tss = float(((yt[used] - yt[used].mean()) ** 2).sum())
    r2 = 1.0 - float(ru @ ru) / tss if tss > 0 else float("nan")
    rv = _resid(x[val_mask], y[val_mask], th)
    rmse = float(np.sqrt(np.mean(rv**2))) if rv.size else float("nan")
    inliers = np.zeros(n, dtype=bool)
    inliers[np.flatnonzero(train_mask)[used]] = True
    return FitResult(s, a, math.exp(lc), math.exp(lb), status, reason, r2, rmse, inliers, train_mask, val_mask,
                     int((~keep).sum()), int(keep.sum() - used.sum()), cfg)


def bootstrap_ceiling(x, y, result: FitResult, *, n_boot: int = 200, seed: int = 0, p_start_se: float = 0.0,
                      level: float = 0.95) -> dict:
    """Percentile CIs for A and PL = A - P_start by a residual bootstrap of the final fit.

    Each replicate adds resampled (centred) residuals of the fit's inliers to the fitted curve at the inlier x,
    and refits by plain least squares (the robust stages already chose the points). With p_start_se > 0 the
    start value is noisy too (an RL branch's P_sft is one evaluation: binomial SE = sqrt(p(1-p)/n_problems));
    a replicate draws P_start* ~ N(P_start, se^2), so the x = 0 point moves and PL* = A* - P_start*.
    When more than (1 - level) / 2 of the replicates are not identifiable (the same test as fit_curve's status),
    the upper ends of both intervals are inf: the interval is open above. A_se is half the 16th-84th percentile
    width; A_se_lo / A_se_hi are the distances from A down to the 16th / up to the 84th percentile (inf when more
    than 16% of the replicates are not identifiable), for one-sided comparisons of skewed ceilings.
    """
    x = np.asarray(x, dtype=np.float64)[result.inliers]
    y = np.asarray(y, dtype=np.float64)[result.inliers]
    cfg = result.config
    box = _box(x, cfg)
    th = (result.P_start, result.A, math.log(result.C_mid), math.log(result.B))
    fitted = y - _resid(x, y, th)
    pos = x > 0
    pool = (y - fitted)[pos]
    pool = pool - pool.mean()
    rng = np.random.default_rng(seed)
    a_s, pl_s, unident = [], [], []
    for _ in range(n_boot):
        ys = fitted.copy()
        ys[pos] += rng.choice(pool, size=int(pos.sum()), replace=True)
        s0 = result.P_start + (rng.normal() * p_start_se if p_start_se > 0 else 0.0)
        ys[~pos] = s0
        s, a, lc, lb, _ = _lsq(x, ys, s0, cfg, box, init=th, n_grid_starts=1)
        unident.append(math.exp(lc) > x.max() or lb >= box.log_b[1] - 1e-4 or lb <= box.log_b[0] + 1e-4)
        a_s.append(a)
        pl_s.append(a - s)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    a_lo, a_hi = np.percentile(a_s, q)
    pl_lo, pl_hi = np.percentile(pl_s, q)
    frac = float(np.mean(unident))
    if frac > (1 - level) / 2:
        # More replicates than the upper tail holds never bend within the data: their A is whatever the optimiser's
        # bounds allow (1e15 has been seen), so the interval's upper end is not a number the data give -> open.
        a_hi = pl_hi = math.inf
    # the SE is read off the percentile interval: replicates that run away would make a plain std meaningless
    p16, p84 = np.percentile(a_s, [15.87, 84.13])
    se = float(p84 - p16) / 2
    # one-sided SEs for claims "A > other" (se_lo) and "A < other" (se_hi): the bootstrap of a curve that barely
    # bends is skewed upwards; the upper one counts non-identifiable replicates as unbounded, like the interval
    se_lo = max(result.A - float(p16), 0.0)
    se_hi = math.inf if frac > 1 - 0.8413 else max(float(p84) - result.A, 0.0)
    return {"A_ci": (float(a_lo), float(a_hi)), "PL_ci": (float(pl_lo), float(pl_hi)), "A_se": se,
            "A_se_lo": se_lo, "A_se_hi": se_hi, "n_boot": n_boot, "frac_unidentified": frac}


# ----------------------------------------------------------------------------------------------------------------
# SFT sub-phases (Sec. 6.2.1) and the switch recommendation


def sft_subphases(x, val_loss, delta: float = 0.02, delta2: float = 0.1) -> list[str]:
    """Label each SFT checkpoint adaptive / stable / mild / severe from its validation loss (Eq. 13-17).

    L_min is the global minimum; T_stable = {L <= (1+delta) L_min}. Checkpoints before the first stable one are
    adaptive, those from the first to the last stable one are stable, later ones are mild if L < (1+delta2) L_min
    and severe otherwise.
    """
    x = np.asarray(x, dtype=np.float64)
    loss = np.asarray(val_loss, dtype=np.float64)
    if x.ndim != 1 or x.shape != loss.shape or x.size == 0:
        raise ValueError(f"sft_subphases: x and val_loss must be non-empty 1-D of equal length, got {x.shape}, "
                         f"{loss.shape}")
    bad = np.flatnonzero(~np.isfinite(loss) | (loss <= 0) | ~np.isfinite(x))
    if bad.size:
        raise ValueError(f"sft_subphases: point {int(bad[0])} has x={x[bad[0]]}, val_loss={loss[bad[0]]}; "
                         "need finite x and a finite positive loss")
    if np.any(np.diff(x) <= 0):
        raise ValueError("sft_subphases: x (SFT compute) must be strictly increasing")
    if not 0 <= delta < delta2:
        raise ValueError(f"sft_subphases: need 0 <= delta < delta2, got {delta}, {delta2}")
    l_min = loss.min()
    stable = np.flatnonzero(loss <= (1 + delta) * l_min)
    first, last = stable[0], stable[-1]
    labels = []
    for i, li in enumerate(loss):
        if i < first:
            labels.append("adaptive")
        elif i <= last:
            labels.append("stable")
        else:
            labels.append("mild" if li < (1 + delta2) * l_min else "severe")
    return labels


def switch_recommendation(steps, x, val_loss, delta: float = 0.02, delta2: float = 0.1, window: int = 3) -> dict:
    """From an SFT run in progress (beyond the paper): has it reached the Stable sub-phase, and where to branch RL.

    The sub-phases are relative to the minimum seen so far, so a run whose latest checkpoint is its minimum is
    "stable" only once the loss has flattened: the drop over the last `window` checkpoints is within delta.
    """
    steps = list(steps)
    loss = np.asarray(val_loss, dtype=np.float64)
    labels = sft_subphases(x, loss, delta, delta2)
    if len(steps) != len(labels):
        raise ValueError(f"switch_recommendation: {len(steps)} steps but {len(labels)} losses")
    stable_steps = [s for s, lab in zip(steps, labels) if lab == "stable"]
    now = labels[-1]
    k = min(window, len(loss) - 1)
    still_falling = loss.argmin() == len(loss) - 1 and (k == 0 or loss[-1 - k] > (1 + delta) * loss[-1])
    if still_falling:
        action, branch = "continue SFT", []
        msg = "validation loss is still falling (Adaptive sub-phase): RL started now would start below its best"
    elif now == "stable":
        action, branch = "switch", stable_steps
        msg = "SFT has saturated (Stable sub-phase): branch RL from the latest stable checkpoint"
    elif now == "mild":
        action, branch = "switch", stable_steps
        msg = ("mild overfitting: stop SFT; the stable checkpoints are the robust choice (mild ones can still be "
               "fine for small or easy data)")
    else:
        action, branch = "stop", stable_steps
        msg = "severe overfitting collapses RL plasticity: do not branch from the latest checkpoints"
    return {"phase_now": now, "reached_stable": not still_falling, "action": action, "branch_from": branch,
            "suggested": branch[-1] if branch else None, "message": msg, "labels": labels}


def pearson_r(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size < 3:
        raise ValueError(f"pearson_r: need two equal-length sequences of >= 3 values, got {a.shape}, {b.shape}")
    da, db = a - a.mean(), b - b.mean()
    return float((da @ db) / math.sqrt((da @ da) * (db @ db)))


# ----------------------------------------------------------------------------------------------------------------
# the Plasticity-Ceiling decomposition (Eq. 10-12) on evaluation results


def sign_test(n_up: int, n_down: int) -> float:
    """Exact two-sided sign test: the probability, if a change up and a change down were equally likely, of a
    split of the n_up + n_down changed problems at least as uneven as this one (1.0 when nothing changed). On
    paired 0/1 scores (the same problems before and after) this is McNemar's exact test. Exact, because a normal
    approximation oversells a handful of changes: 5 problems gained and none lost among 240 is a paired z (mean
    difference over its SE) of 2.25, but p = 0.0625."""
    if n_up < 0 or n_down < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got {n_up}, {n_down}")
    m, k = n_up + n_down, min(n_up, n_down)
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(m, i) for i in range(k + 1)) / 2.0 ** m)


def score(scores: dict, metric: str = "overall", bench_sizes: dict | None = None, where: str = "") -> float:
    """One number from a checkpoint's per-benchmark accuracies (percent): a benchmark, or "overall" = the mean
    weighted by problem count (the paper's 2157 problems unless `bench_sizes` says otherwise)."""
    if metric != "overall":
        if metric not in scores:
            raise KeyError(f"{where}: no score for benchmark {metric!r} (have {sorted(scores)})")
        return float(scores[metric])
    sizes = bench_sizes or PAPER_BENCH_SIZES
    missing = [b for b in sizes if b not in scores]
    if missing:
        raise KeyError(f"{where}: scores lack benchmarks {missing} needed for 'overall' (have {sorted(scores)})")
    return sum(float(scores[b]) * n for b, n in sizes.items()) / sum(sizes.values())


def analyze(sft_points: list[dict], rl_branches: dict, *, metric: str = "overall", bench_sizes: dict | None = None,
            fit_settings: dict | None = None, n_boot: int = 200, seed: int = 0, delta: float = 0.02,
            delta2: float = 0.1, name: str = "run") -> dict:
    """The decomposition table of one SFT data configuration.

    Input (what an evaluation loop writes; JSON-compatible):
      sft_points:  [{"step": int, "eflops": float (cumulative SFT compute), "scores": {bench: accuracy %},
                     "val_loss": float (optional)}, ...]   one per SFT checkpoint, step 0 = the base model
      rl_branches: {sft_step: [{"eflops": float (RL compute since the branch point, > 0), "scores": {...}}, ...]}
      fit_settings: {sft_step: {"train": [start, end], "val": [start, end], "outlier_threshold": tau,
                     "lts_alpha": alpha, "free_start": bool}} (optional, per branch; indices count the branch
                     list with the SFT checkpoint itself at index 0; defaults: 85/15 split, tau = 2.5, no LTS)
    Each branch is fitted on x = RL compute with the SFT checkpoint as the point (0, P_sft) and P_start = P_sft,
    so A = A_post and PL_rl = A_post - P_sft. With n_boot > 0, CIs include P_sft's binomial benchmark noise when
    the metric is "overall" or a benchmark of known size.
    """
    sizes = bench_sizes or PAPER_BENCH_SIZES
    sft = sorted(sft_points, key=lambda p: p["eflops"])
    by_step = {}
    for i, p in enumerate(sft):
        for key in ("step", "eflops", "scores"):
            if key not in p:
                raise KeyError(f"{name}: sft_points[{i}] lacks {key!r}")
        by_step[int(p["step"])] = p
    losses = [p.get("val_loss") for p in sft]
    have_loss = [i for i, v in enumerate(losses) if v is not None]
    labels = {}
    if len(have_loss) >= 2:
        xs = [sft[i]["eflops"] for i in have_loss]
        for i, lab in zip(have_loss, sft_subphases(xs, [losses[i] for i in have_loss], delta, delta2)):
            labels[int(sft[i]["step"])] = lab
    n_problems = sum(sizes.values()) if metric == "overall" else sizes.get(metric)

    rows = []
    for key, branch in sorted(rl_branches.items(), key=lambda kv: int(kv[0])):
        step = int(key)
        if step not in by_step:
            raise KeyError(f"{name}: rl_branches[{key!r}] starts from SFT step {step}, not in sft_points")
        where = f"{name}: sft step {step}"
        p_sft = score(by_step[step]["scores"], metric, bench_sizes, where)
        pts = sorted(branch, key=lambda e: e["eflops"])
        x = [0.0] + [float(e["eflops"]) for e in pts]
        y = [p_sft] + [score(e["scores"], metric, bench_sizes, f"{where}, RL point {j}") for j, e in enumerate(pts)]
        st = dict((fit_settings or {}).get(key, (fit_settings or {}).get(step, {})))
        row = {"sft_step": step, "sft_eflops": float(by_step[step]["eflops"]), "P_sft": p_sft,
               "subphase": labels.get(step), "n_points": len(x), "x": x, "y": y}
        try:
            res = fit_curve(x, y, p_start=p_sft, free_start=st.get("free_start", False),
                            train=tuple(st["train"]) if st.get("train") else None,
                            val=tuple(st["val"]) if st.get("val") else None,
                            outlier_threshold=st.get("outlier_threshold", 2.5), lts_alpha=st.get("lts_alpha"))
        except ValueError as e:  # e.g. a branch with too few evaluations yet: report it, fit the others
            nan = float("nan")
            row.update(PL_rl=nan, A_post=nan, C_mid=nan, B=nan, epsilon=nan, status="not fitted", reason=str(e),
                       r2_train=nan, rmse_val=nan, n_outliers=0, n_trimmed=0, inliers=[False] * len(x),
                       train=[False] * len(x))
            rows.append(row)
            continue
        row.update(PL_rl=res.A - p_sft, A_post=res.A, C_mid=res.C_mid, B=res.B, epsilon=res.P_start - p_sft,
                   status=res.status, reason=res.reason, r2_train=res.r2_train, rmse_val=res.rmse_val,
                   n_outliers=res.n_outliers, n_trimmed=res.n_trimmed, inliers=res.inliers.tolist(),
                   train=res.train.tolist())
        if n_boot > 0:
            se = math.sqrt(p_sft * (100 - p_sft) / n_problems) if n_problems else 0.0
            bs = bootstrap_ceiling(x, y, res, n_boot=n_boot, seed=seed, p_start_se=se)
            row.update(A_ci=bs["A_ci"], PL_ci=bs["PL_ci"], A_se=bs["A_se"], A_se_lo=bs["A_se_lo"],
                       A_se_hi=bs["A_se_hi"], frac_unidentified=bs["frac_unidentified"])
        rows.append(row)

    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["A_post"]) if ok else None
    for r in rows:  # is this checkpoint's ceiling distinguishable from the best one's?
        if best is not None and "A_se" in r and r["status"] == "ok":
            # the sides facing each other: the best one's lower SE, this one's upper SE (inf: not bounded above)
            z = (best["A_post"] - r["A_post"]) / max(math.hypot(best["A_se_lo"], r["A_se_hi"]), 1e-12)
            r["within_noise_of_best"] = bool(z < 1.96)
    valid = [v for v in losses if v is not None]
    sft_table = [{"step": int(p["step"]), "eflops": float(p["eflops"]),
                  "score": score(p["scores"], metric, bench_sizes, f"{name}: sft step {p['step']}"),
                  "val_loss": p.get("val_loss"), "subphase": labels.get(int(p["step"]))} for p in sft]
    report = {"name": name, "metric": metric, "rows": rows, "sft": sft_table,
              "best_step": best["sft_step"] if best else None, "best_A_post": best["A_post"] if best else None,
              "min_val_loss": min(valid) if valid else None, "recommendation": None}
    if len(have_loss) >= 2:
        report["recommendation"] = switch_recommendation(
            [sft[i]["step"] for i in have_loss], [sft[i]["eflops"] for i in have_loss],
            [losses[i] for i in have_loss], delta, delta2)
    return report


def loss_ceiling_correlation(reports: list[dict]) -> float:
    """Pearson r between each configuration's minimum SFT validation loss and its best A_post (Sec. 6.2.2)."""
    pairs = [(r["min_val_loss"], r["best_A_post"]) for r in reports
             if r["min_val_loss"] is not None and r["best_A_post"] is not None]
    return pearson_r([p[0] for p in pairs], [p[1] for p in pairs])


def _f(v, fmt=".1f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_ci(ci: tuple[float, float], fmt: str = ".1f") -> str:
    """"[lo, hi]", or "[lo, inf)" for an interval open above (see bootstrap_ceiling)."""
    lo, hi = ci
    return f"[{lo:{fmt}}, inf)" if math.isinf(hi) else f"[{lo:{fmt}}, {hi:{fmt}}]"


def format_report(report: dict) -> str:
    """Markdown for one `analyze` report."""
    out = [f"## Plasticity-Ceiling: {report['name']} ({report['metric']})", "",
           "| SFT step | SFT EFLOPs | sub-phase | P_sft | PL_rl | A_post | A_post 95% CI | C_mid | B | status |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ci = format_ci(r["A_ci"]) if "A_ci" in r else "-"
        mark = " (best)" if r["sft_step"] == report["best_step"] else (
            " (within noise of best)" if r.get("within_noise_of_best") else "")
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        out.append(f"| {r['sft_step']} | {_f(r['sft_eflops'])} | {r['subphase'] or '-'} | {_f(r['P_sft'], '.2f')} | "
                   f"{_f(r['PL_rl'], '.2f')} | {_f(r['A_post'], '.2f')}{mark} | {ci} | {_f(r['C_mid'])} | "
                   f"{_f(r['B'], '.2f')} | {status} |")
    out.append("")
    if report["best_step"] is not None:
        out.append(f"Highest ceiling: A_post = {report['best_A_post']:.2f} from SFT step {report['best_step']}.")
        close = [r["sft_step"] for r in report["rows"]
                 if r.get("within_noise_of_best") and r["sft_step"] != report["best_step"]]
        if close:
            out.append(f"Not distinguishable from it within bootstrap noise (|z| < 1.96): steps {close}.")
    rec = report.get("recommendation")
    if rec:
        where = f"; stable checkpoints: {rec['branch_from']}" if rec["branch_from"] else ""
        out.append(f"Switch recommendation: {rec['action']} ({rec['message']}){where}.")
    changes = report.get("rl_changes")
    if changes:
        out += ["", "RL branches against their SFT checkpoint, problem by problem (the same problems before and "
                "after; p: exact two-sided sign test, `sign_test`):", "",
                "| RL run | SFT step | problems | score at start | at end | gained / lost | p |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {c['run']} | {c['sft_step']} | {c['n']} | {c['start']:.2f} | {c['end']:.2f} | {c['up']} / "
                f"{c['down']} | {c['p']:.3g} |" for c in changes]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# JSON input


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (the authors' data lives in ../shared/data/retu/)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


# ----------------------------------------------------------------------------------------------------------------
# plots (matplotlib is optional: imported only here)

_PHASE_COLOURS = {"adaptive": "#dbe9f6", "stable": "#d9f0d3", "mild": "#fdf2c8", "severe": "#f8d5d0"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib (`pip install matplotlib`); the analysis itself does not") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_decomposition(report: dict, path: str | Path) -> Path:
    """Figure 3 style: A_post stacked as P_sft + PL_rl against SFT compute, sub-phases as background bands."""
    plt = _pyplot()
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4))
    sft = [p for p in report["sft"] if p["subphase"]]
    for i, p in enumerate(sft):  # band from halfway to the previous checkpoint to halfway to the next
        lo = (p["eflops"] + sft[i - 1]["eflops"]) / 2 if i else p["eflops"]
        hi = (p["eflops"] + sft[i + 1]["eflops"]) / 2 if i + 1 < len(sft) else p["eflops"]
        ax.axvspan(lo, hi, color=_PHASE_COLOURS[p["subphase"]], lw=0)
    xs = np.array([r["sft_eflops"] for r in rows])
    width = 0.6 * (np.diff(xs).min() if len(xs) > 1 else 1.0)
    ax.bar(xs, [r["P_sft"] for r in rows], width, color="#4c72b0", label="P_sft")
    ax.bar(xs, [r["PL_rl"] for r in rows], width, bottom=[r["P_sft"] for r in rows], color="#dd8452",
           label="PL_rl")
    a_post = np.array([r["A_post"] for r in rows])
    ax.plot(xs, a_post, "o-", color="#1f3b73", label="A_post")
    lo = min([r["P_sft"] for r in rows], default=0)
    top = max([r["A_post"] for r in rows], default=100) + 2
    if rows and "A_ci" in rows[0]:
        ci = np.minimum(np.array([r["A_ci"] for r in rows]), top)  # (n, 2); an open upper end runs off the top
        ax.errorbar(xs, a_post, yerr=[a_post - ci[:, 0], ci[:, 1] - a_post], fmt="none", ecolor="#1f3b73", capsize=3)
    ax.set_ylim(lo - 5, top)
    ax.set_xlabel("SFT compute (EFLOPs)")
    ax.set_ylabel(report["metric"])
    ax.set_title(f"{report['name']}: post-training ceiling")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_branches(report: dict, path: str | Path) -> Path:
    """Figure 5 style: the SFT curve (dashed), each RL branch's points (filled: fit, x: validation) and its fitted
    curve, coloured by the SFT step it starts from; RL compute is added to the branch's SFT compute."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["eflops"] for p in report["sft"]], [p["score"] for p in report["sft"]], "k--", lw=1, label="SFT")
    cmap = plt.get_cmap("viridis")
    n = max(len(report["rows"]) - 1, 1)
    for i, r in enumerate(report["rows"]):
        c = cmap(0.85 * i / n)
        x0 = r["sft_eflops"]
        x, y = np.array(r["x"]), np.array(r["y"])
        used, train = np.array(r["inliers"]), np.array(r["train"])
        ax.scatter(x0 + x[used], y[used], s=10, color=c)
        ax.scatter(x0 + x[~train], y[~train], s=14, marker="x", color=c)
        ax.scatter(x0 + x[train & ~used], y[train & ~used], s=14, facecolors="none", edgecolors=c)
        if r["status"] == "ok":
            xd = np.linspace(0, x.max(), 200)
            ax.plot(x0 + xd, sigmoid_power_law(xd, r["P_sft"] + r["epsilon"], r["A_post"], r["C_mid"], r["B"]),
                    color=c, lw=1.2)
        ax.annotate(str(r["sft_step"]), (x0 + x.max(), y[-1]), fontsize=7, fontweight="bold")
    ax.set_xlabel("SFT + RL compute (EFLOPs)")
    ax.set_ylabel(report["metric"])
    ax.set_title(f"{report['name']}: RL branches (filled: fit, open: rejected, x: validation)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# command line: `python fit.py run INPUT.json ...` (Table 4 of the paper: `python fit_table4.py`)


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help='analyse JSON files {"name", "sft_points", "rl_branches", ...}, one per SFT '
                         "data set; with three or more, also the min-val-loss vs ceiling correlation")
    run.add_argument("inputs", nargs="+")
    run.add_argument("--out", default=".", help="directory for <name>.md, <name>.json and the figures")
    run.add_argument("--metric", default="overall")
    run.add_argument("--boot", type=int, default=200)
    run.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for path in args.inputs:
        spec = load_json(Path(path))
        for key in ("sft_points", "rl_branches"):
            if key not in spec:
                raise KeyError(f"{path}: missing top-level key {key!r}")
        report = analyze(spec["sft_points"], spec["rl_branches"], metric=args.metric,
                         bench_sizes=spec.get("bench_sizes"), fit_settings=spec.get("fit_settings"),
                         n_boot=args.boot, name=spec.get("name", Path(path).stem))
        name = report["name"]
        (out / f"{name}.md").write_text(format_report(report))
        (out / f"{name}.json").write_text(json.dumps(jsonable(report), indent=1))
        if not args.no_plots:
            plot_decomposition(report, out / f"{name}_ceiling.png")
            plot_branches(report, out / f"{name}_branches.png")
        print(format_report(report))
        reports.append(report)
    usable = [r for r in reports if r["min_val_loss"] is not None and r["best_A_post"] is not None]
    if len(usable) >= 3:
        print(f"Pearson r (min SFT validation loss vs best A_post, {len(usable)} data sets): "
              f"{loss_ceiling_correlation(usable):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
