"""demo_report.py -- the report of the toy RETU study (`retu.py demo`): DIR/report.md and its figures.

Every number comes from the `retu.py fit` outputs of the run directory (`runs/<run>/fit/report.json` and
`input.json`), which the study's fit stages write; the report says which command reproduces each table. For each of
the paper's three findings the report gives the measured evidence and a verdict computed from it, one of VERDICTS.

Noise model. A benchmark accuracy p (percent) measured on n problems has the binomial standard error, taken from the
plus-two estimate (k + 1) / (n + 2) so that it is not zero at 0% or 100%. A ceiling A_post from a fit that fit.py
calls identifiable ("ok") carries its bootstrap SEs (fit.bootstrap_ceiling: residual bootstrap plus P_sft's binomial
noise), one below and one above it: the bootstrap of a curve that barely bends is skewed upwards, and the upper SE
is infinite when more than 16% of the replicates are not identifiable themselves. A branch whose fit is not
identifiable is represented by its final accuracy with the binomial SE. A claim "x > y" is supported when x - y
exceeds 1.96 times the combined SE of the sides facing each other, sqrt(se_x,below^2 + se_y,above^2), not supported
when y - x exceeds 1.96 sqrt(se_y,below^2 + se_x,above^2), and inconclusive (within noise) otherwise. The
correlation between minimum validation loss and ceiling is judged by an exact permutation test (all orderings of the
pools): no distributional assumption is needed for a handful of points. Whether an RL branch changed accuracy at all
is a paired question (the same problems before and after), judged by an exact sign test on the problems it gained
and lost (`retu.py fit` computes it, fit.sign_test), with a Bonferroni bound over the branches tested
(`learning_check`).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import demo
import fit
import stages

VERDICTS = ("supported", "not supported", "inconclusive (within noise)")
Z = 1.96                                           # two-sided 95%
PARADIGM_LABELS = {"grpo": "pure RL: GRPO", "dapo": "pure RL: DAPO_d", "luffy": "Syn-SFT-RL: LUFFY",
                   "srft": "Syn-SFT-RL: SRFT", "upt": "Syn-SFT-RL: UPT"}


@dataclass
class Estimate:
    """A measured accuracy or ceiling (percent) with its standard error and where it comes from. A fitted ceiling
    also has one-sided SEs: its bootstrap is skewed upwards when the curve barely bends (fit.bootstrap_ceiling)."""
    value: float
    se: float
    source: str                                    # "A_post (fit)" or "final accuracy"
    se_lo: float | None = None                     # SE below the value (None: se)
    se_hi: float | None = None                     # SE above the value (None: se; inf: not bounded above)

    @property
    def lo(self) -> float:
        return self.se if self.se_lo is None else self.se_lo

    @property
    def hi(self) -> float:
        return self.se if self.se_hi is None else self.se_hi

    def fmt(self) -> str:
        if self.lo == self.hi:
            return f"{self.value:.1f} ± {self.se:.1f}"
        return f"{self.value:.1f} +{self.hi:.1f}/-{self.lo:.1f}"


def binomial_se(p: float, n: int) -> float:
    """SE (percent) of an accuracy p (percent) on n problems, from the plus-two estimate (k + 1) / (n + 2): unlike
    sqrt(p (100 - p) / n) it is not zero at 0% or 100%, where one more solved problem would be a real change."""
    q = (p / 100.0 * n + 1.0) / (n + 2.0)
    return 100.0 * math.sqrt(q * (1.0 - q) / (n + 2.0))


def compare(a: Estimate, b: Estimate) -> tuple[str, float]:
    """Verdict on the claim a > b, and its z score. The SEs are the sides facing each other (a's lower and b's upper
    when a is ahead): a ceiling not bounded above (se_hi inf) cannot be shown to lie below anything."""
    s = math.hypot(a.lo, b.hi) if a.value >= b.value else math.hypot(a.hi, b.lo)
    z = (a.value - b.value) / s if s > 0 else math.copysign(math.inf, a.value - b.value) if a.value != b.value else 0.0
    return (VERDICTS[0] if z > Z else VERDICTS[1] if z < -Z else VERDICTS[2]), z


def combine(verdicts: list[str]) -> str:
    """All parts supported -> supported; any part contradicted -> not supported; otherwise inconclusive."""
    if not verdicts:
        return VERDICTS[2]
    if any(v == VERDICTS[1] for v in verdicts):
        return VERDICTS[1]
    return VERDICTS[0] if all(v == VERDICTS[0] for v in verdicts) else VERDICTS[2]


def permutation_test_r(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Pearson r and exact one-sided permutation p-values (P[r* <= r], P[r* >= r]) over all orderings of y."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:           # a constant has no correlation: nothing to test
        return float("nan"), 1.0, 1.0
    r = fit.pearson_r(x, y)
    perms = [fit.pearson_r(x, list(p)) for p in itertools.permutations(y)]
    eps = 1e-12                                    # ties with the observed r count as at least as extreme
    return r, float(np.mean([v <= r + eps for v in perms])), float(np.mean([v >= r - eps for v in perms]))


# ----------------------------------------------------------------------------------------------------
# Reading the fit outputs


class FitOutput:
    """One `retu.py fit` output directory: report.json (fit.analyze) and input.json (what was fitted)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / "fit" / "report.json"
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: missing; the study's fit stage for {run_dir.name} has not run")
        self.report = json.loads(self.path.read_text())
        self.input = json.loads((run_dir / "fit" / "input.json").read_text())
        self.n_problems = int(sum(self.input["bench_sizes"].values()))

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(EFLOPs, overall accuracy) of the run's evaluated checkpoints."""
        pts = self.report["sft"]
        return np.array([p["eflops"] for p in pts]), np.array([p["score"] for p in pts])

    def final(self) -> Estimate:
        if not self.report["sft"]:
            raise ValueError(f"{self.path}: no evaluated checkpoints")
        p = self.report["sft"][-1]["score"]
        return Estimate(p, binomial_se(p, self.n_problems), "final accuracy")

    def branch_rows(self) -> dict[int, dict]:
        return {int(r["sft_step"]): r for r in self.report["rows"]}

    def ceiling(self, row: dict) -> Estimate:
        """A branch's A_post with its bootstrap SE when the fit is identifiable, else its final accuracy. The SE of
        a fitted ceiling is at least the binomial SE of an accuracy at that level: a bootstrap over a flat curve
        (every point 0, say) gives 0, but each point is a measurement on n_problems with that noise."""
        if row["status"] == "ok" and row.get("A_se") is not None and math.isfinite(row["A_se"]):
            floor = binomial_se(min(max(row["A_post"], 0.0), 100.0), self.n_problems)
            sides = [max(row[k], floor) if k in row else None for k in ("A_se_lo", "A_se_hi")]
            return Estimate(row["A_post"], max(row["A_se"], floor), "A_post (fit)", *sides)
        return Estimate(row["y"][-1], binomial_se(row["y"][-1], self.n_problems), "final accuracy")


def branch_steps(run_dir: Path) -> dict[str, int]:
    """phase -> SFT step the study branched RL from (runs/sft_<pool>/branches.json), for branches that ran."""
    chosen = json.loads((run_dir / "branches.json").read_text())["branches"]
    runs = run_dir.parent
    pool = run_dir.name.removeprefix("sft_")
    return {ph: s for ph, s in chosen.items() if (runs / f"dapo_{pool}_{ph}" / "eval.jsonl").exists()}


def fit_command(out: Path, run: str, rl_runs: list[str] = ()) -> str:
    rl = (" --rl-runs " + " ".join(str(out / "runs" / r) for r in rl_runs)) if rl_runs else ""
    return f"`python retu.py fit --run-dir {out / 'runs' / run}{rl}`"


# ----------------------------------------------------------------------------------------------------
# The findings


def finding1(out: Path, cfg: demo.StudyConfig) -> dict:
    """Sequential SFT-then-RL against pure RL and Syn-SFT-RL from the base model: final accuracies."""
    pool = cfg.paradigm_pool
    sft = FitOutput(out / "runs" / f"sft_{pool}")
    steps = branch_steps(sft.run_dir)
    if not steps:
        raise ValueError(f"finding 1 needs an RL branch of pool {pool!r}; none ran")
    # the stable branch (the paper's recommendation); a pool whose minimum loss is at step 0 has none
    phase = "stable" if "stable" in steps else next(iter(steps))
    row = sft.branch_rows()[steps[phase]]
    seq = Estimate(row["y"][-1], binomial_se(row["y"][-1], sft.n_problems), "final accuracy")
    rl_eflops = row["x"][-1]
    entries = [{"name": f"SFT ({pool}, {len(sft.report['sft'])} checkpoints), last checkpoint",
                "est": sft.final(), "eflops": sft.report["sft"][-1]["eflops"]},
               {"name": f"SFT-then-RL: SFT step {steps[phase]} ({phase}) -> DAPO_dc", "est": seq,
                "eflops": row["sft_eflops"] + rl_eflops}]
    parts, curves = [], {"SFT": sft.curve(),
                         "SFT-then-RL": (row["sft_eflops"] + np.array(row["x"]), np.array(row["y"]))}
    for algo in cfg.baseline_algos:
        run = FitOutput(out / "runs" / f"{algo}_base")
        est = run.final()
        verdict, z = compare(seq, est)
        parts.append(verdict)
        entries.append({"name": PARADIGM_LABELS[algo] + " from the base model", "est": est,
                        "eflops": run.report["sft"][-1]["eflops"], "verdict": verdict, "z": z})
        curves[PARADIGM_LABELS[algo]] = run.curve()
    commands = [fit_command(out, f"sft_{pool}", [f"dapo_{pool}_{ph}" for ph in steps])]
    commands += [fit_command(out, f"{a}_base") for a in cfg.baseline_algos]
    return {"entries": entries, "verdict": combine(parts), "curves": curves, "commands": commands,
            "n_problems": sft.n_problems}


def finding2(out: Path, cfg: demo.StudyConfig) -> dict:
    """Branches from checkpoints in different SFT sub-phases: is the Stable / mild-overfitting ceiling highest?"""
    pools = []
    for pool in cfg.phase_pools:
        sft = FitOutput(out / "runs" / f"sft_{pool}")
        steps = branch_steps(sft.run_dir)
        rows = sft.branch_rows()
        phases = {ph: (s, rows[s], sft.ceiling(rows[s])) for ph, s in steps.items()}
        good = [ph for ph in ("stable", "mild") if ph in phases]
        other = [ph for ph in phases if ph not in ("stable", "mild")]
        parts, best = [], None
        if good and other:
            best = max(good, key=lambda ph: phases[ph][2].value)
            parts = [compare(phases[best][2], phases[ph][2])[0] for ph in other]
        pools.append({"pool": pool, "sft": sft, "phases": phases, "best": best, "others": other,
                      "verdict": combine(parts), "command": fit_command(out, f"sft_{pool}",
                                                                        [f"dapo_{pool}_{ph}" for ph in steps])})
    return {"pools": pools, "verdict": combine([p["verdict"] for p in pools])}


def finding3(out: Path, cfg: demo.StudyConfig) -> dict:
    """Data scale and difficulty: best ceiling per pool; minimum validation loss against that ceiling."""
    rows = []
    for pool in cfg.sft_pools:
        sft = FitOutput(out / "runs" / f"sft_{pool}")
        ran = branch_steps(sft.run_dir)
        by_step = sft.branch_rows()
        cands = [(ph, sft.ceiling(by_step[s])) for ph, s in ran.items()]
        if not cands:
            continue
        ph, est = max(cands, key=lambda c: c[1].value)
        size = sum(1 for _ in open(out / "data" / f"sft_{pool}.jsonl"))
        rows.append({"pool": pool, "size": size, "min_val_loss": sft.report["min_val_loss"], "phase": ph, "est": est,
                     "command": fit_command(out, f"sft_{pool}", [f"dapo_{pool}_{p}" for p in ran])})
    by = {r["pool"]: r for r in rows}
    claims = []
    for a, b, what in (("large", "small", "data scale: the largest pool's ceiling exceeds the smallest's"),
                       ("hard", "easy", "difficulty: the hard pool's ceiling exceeds the easy pool's (same size)")):
        if a in by and b in by:
            v, z = compare(by[a]["est"], by[b]["est"])
            claims.append({"claim": what, "verdict": v, "detail": f"{a} {by[a]['est'].fmt()} vs {b} "
                                                                  f"{by[b]['est'].fmt()}, z = {z:+.2f}"})
    corr = None
    pts = [r for r in rows if r["min_val_loss"] is not None]
    if len(pts) >= 3:
        r, p_neg, p_pos = permutation_test_r([q["min_val_loss"] for q in pts], [q["est"].value for q in pts])
        v = VERDICTS[0] if r < 0 and p_neg < 0.05 else VERDICTS[1] if r > 0 and p_pos < 0.05 else VERDICTS[2]
        corr = {"r": r, "p": p_neg, "n": len(pts)}
        claims.append({"claim": "a lower minimum validation loss predicts a higher ceiling (Pearson r < 0)",
                       "verdict": v, "detail": f"r = {r:+.2f} over {len(pts)} pools, exact permutation "
                                               f"p(r* <= r) = {p_neg:.3f}"})
    return {"rows": rows, "claims": claims, "corr": corr, "verdict": combine([c["verdict"] for c in claims])}


def unanswered_share(run_dir: Path, step: int, templates: list[int]) -> tuple[float, int]:
    """(replies without a boxed answer, problems) among a checkpoint's benchmark problems phrased in the templates
    of the expert data's cut-offs (demo.DataConfig.cutoff_templates), from `retu.py eval`'s per-problem files; a
    problem counts by the fraction of its samples."""
    n, bare = 0, 0.0
    for path in sorted((run_dir / "eval" / f"step_{step:08d}").glob("*.jsonl")):
        for line in open(path):
            rec = json.loads(line)
            a, b = demo.record_factors(rec)
            if any(rec["problem"] == demo.problem_text(a, b, t) for t in templates):
                n += 1
                bare += sum("\\boxed{" not in c for c in rec["completions"]) / len(rec["completions"])
    return bare, n


def learning_check(out: Path, cfg: demo.StudyConfig) -> dict:
    """Did the toy model learn at all? Per SFT pool: validation loss at the start and its minimum, and the best
    level-1 accuracy of any checkpoint (eval.jsonl; `retu.py fit --metric level1` shows the same numbers); per RL
    branch from an SFT checkpoint: overall accuracy at its start and at its end, the problems it gained and lost,
    and the sign test's p (`retu.py fit`'s "rl_changes"). "RL moved accuracy" needs p below 0.05 / (number of
    branches tested): the Bonferroni bound keeps the chance that any of several unchanged branches passes by luck
    under 5%."""
    sft = []
    for pool in cfg.sft_pools:
        run = FitOutput(out / "runs" / f"sft_{pool}")
        losses = [p["val_loss"] for p in run.report["sft"] if p["val_loss"] is not None]
        metrics = [json.loads(line) for line in open(run.run_dir / "metrics.jsonl")]
        start = next(r["val_loss"] for r in metrics if r.get("kind") == "val" and r["step"] == 0)
        evals = [json.loads(line) for line in open(run.run_dir / "eval.jsonl")]
        best = max(evals, key=lambda e: e["scores"].get("level1", -1.0))
        sft.append({"pool": pool, "val_start": start, "val_min": min(losses) if losses else float("nan"),
                    "level1": best["scores"].get("level1", float("nan")), "level1_step": best["step"]})
    data_cfg = json.loads((out / "data" / "config.json").read_text())
    templates = data_cfg.get("cutoff_templates") or []
    rl = []
    for pool in cfg.sft_pools:
        run = FitOutput(out / "runs" / f"sft_{pool}")
        if "rl_changes" not in run.report:
            branches = [f"dapo_{pool}_{ph}" for ph in branch_steps(run.run_dir)]
            raise ValueError(f"{run.path}: no 'rl_changes' (an older `retu.py fit` wrote it); run again: "
                             + fit_command(out, run.run_dir.name, branches))
        changes = {c["run"]: c for c in run.report["rl_changes"]}
        for ph in branch_steps(run.run_dir):
            row = changes[f"dapo_{pool}_{ph}"]
            if templates:                          # what RL did to the expert data's cut-offs (demo.DataConfig)
                row["unanswered"] = (unanswered_share(run.run_dir, row["sft_step"], templates),
                                     unanswered_share(out / "runs" / row["run"], row["rl_step"], templates))
            rl.append(row)
    for algo in cfg.baseline_algos:
        _, y = FitOutput(out / "runs" / f"{algo}_base").curve()
        rl.append({"run": f"{algo}_base", "start": float("nan"), "end": float(y[-1])})
    majority = max(r["level1"] for r in sft) > 50.0
    tested = [r for r in rl if "p" in r]
    alpha = 0.05 / max(len(tested), 1)
    return {"sft": sft, "rl": rl, "majority": majority, "alpha": alpha, "moved": any(r["p"] < alpha for r in tested),
            "templates": templates, "share": data_cfg.get("cutoff_share")}


# ----------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg: fit._pyplot)


def plot_finding1(f1: dict, path: Path) -> Path:
    """Figure 2 style: overall accuracy against training compute for every paradigm."""
    plt = fit._pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (name, (x, y)) in enumerate(f1["curves"].items()):
        style = {"SFT": dict(color="k", ls="--"), "SFT-then-RL": dict(color="#c44e52", lw=2)}.get(
            name, dict(color=plt.get_cmap("tab10")(i), lw=1))
        ax.plot(x, y, marker="o", ms=3, label=name, **style)
    ax.set_xlabel("training compute (EFLOPs)")
    ax.set_ylabel(f"overall accuracy (%), {f1['n_problems']} problems")
    ax.set_title("Finding 1: paradigms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _bars(est: list[Estimate]) -> tuple[list[list[float]], float]:
    """95% error bars (below, above) of estimates in percent, and the axis top: an unbounded bar runs off it."""
    top = min(100.0, max(5.0, 1.1 * max(e.value + Z * e.lo for e in est)))
    return [[Z * e.lo for e in est], [min(Z * e.hi, top - e.value) for e in est]], top


def plot_finding2(f2: dict, path: Path) -> Path:
    """Figure 3/5 style, one row per pool: validation loss with the sub-phases and the branch points (left);
    P_sft + PL_rl = ceiling of each branch with its error bar (right)."""
    plt = fit._pyplot()
    pools = f2["pools"]
    fig, axes = plt.subplots(len(pools), 2, figsize=(8, 3.2 * len(pools)), squeeze=False)
    for (ax_l, ax_r), p in zip(axes, pools):
        sft = [q for q in p["sft"].report["sft"] if q["val_loss"] is not None]
        x = [q["eflops"] for q in sft]
        for i, q in enumerate(sft):
            if q["subphase"]:
                lo = (x[i] + x[i - 1]) / 2 if i else x[i]
                hi = (x[i] + x[i + 1]) / 2 if i + 1 < len(x) else x[i]
                ax_l.axvspan(lo, hi, color=fit._PHASE_COLOURS[q["subphase"]], lw=0)
        ax_l.plot(x, [q["val_loss"] for q in sft], "k.-", label="validation loss")
        for ph, (_, row, _) in p["phases"].items():
            ax_l.axvline(row["sft_eflops"], color="#c44e52", lw=0.8, ls=":")
            ax_l.annotate(ph, (row["sft_eflops"], ax_l.get_ylim()[1]), fontsize=7, rotation=90, va="top")
        ax_l.set_xlabel("SFT compute (EFLOPs)")
        ax_l.set_ylabel("validation loss")
        ax_l.set_title(f"sft_{p['pool']}: sub-phases and branch points", fontsize=9)
        names = list(p["phases"])
        est = [p["phases"][ph][2] for ph in names]
        psft = [p["phases"][ph][1]["P_sft"] for ph in names]
        pos = np.arange(len(names))
        ax_r.bar(pos, psft, 0.6, color="#4c72b0", label="P_sft")
        # what RL added above P_sft, or (hatched, over the P_sft bar) what it lost
        ax_r.bar(pos, [max(0.0, e.value - s) for e, s in zip(est, psft)], 0.6, bottom=psft, color="#dd8452",
                 label="RL gain: ceiling - P_sft")
        ax_r.bar(pos, [max(0.0, s - e.value) for e, s in zip(est, psft)], 0.6, bottom=[e.value for e in est],
                 color="white", hatch="///", edgecolor="#c44e52", label="RL loss: P_sft - ceiling")
        yerr, top = _bars(est)
        ax_r.errorbar(pos, [e.value for e in est], yerr=yerr, fmt="none", ecolor="k", capsize=3)
        ax_r.set_xticks(pos, [f"{ph}\n{'fit' if e.source.startswith('A_post') else 'final'}"
                              for ph, e in zip(names, est)], fontsize=8)
        ax_r.set_ylim(0, top)   # accuracy is never below 0
        ax_r.set_ylabel("accuracy (%)")
        ax_r.set_title("ceiling per branch (95% bars)", fontsize=9)
        ax_r.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_finding3(f3: dict, path: Path) -> Path:
    """Ceiling per SFT pool (left) and minimum validation loss against ceiling (right)."""
    plt = fit._pyplot()
    rows = f3["rows"]
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(8, 3.4))
    pos = np.arange(len(rows))
    est = [r["est"] for r in rows]
    yerr, top = _bars(est)
    ax_l.bar(pos, [e.value for e in est], 0.6, color="#55a868", capsize=3, yerr=yerr)
    ax_l.set_xticks(pos, [f"{r['pool']}\n{r['size']}" for r in rows], fontsize=8)
    ax_l.set_ylim(0, top)
    ax_l.set_ylabel("ceiling (%)")
    ax_l.set_title("best branch ceiling per SFT pool (95% bars)", fontsize=9)
    lv = [r["min_val_loss"] for r in rows if r["min_val_loss"] is not None]
    ce = [r["est"].value for r in rows if r["min_val_loss"] is not None]
    ax_r.scatter(lv, ce, color="#55a868")
    for r in rows:
        if r["min_val_loss"] is not None:
            ax_r.annotate(r["pool"], (r["min_val_loss"], r["est"].value), fontsize=8)
    if f3["corr"]:
        ax_r.set_title(f"min validation loss vs ceiling: r = {f3['corr']['r']:+.2f}", fontsize=9)
    ax_r.set_xlabel("minimum SFT validation loss")
    ax_r.set_ylabel("ceiling (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The report


def _marker_seconds(out: Path) -> dict[str, float]:
    return {p.stem: json.loads(p.read_text())["seconds"] for p in sorted((out / "stages").glob("*.done"))}


def write_report(out_dir: str | Path, cfg: demo.StudyConfig, *, quick: bool = False) -> Path:
    """Compute the three findings from the fit outputs in `out_dir`, draw the figures, write report.md."""
    out = Path(out_dir)
    f1, f2, f3 = finding1(out, cfg), finding2(out, cfg), finding3(out, cfg)
    figs = {"f1": plot_finding1(f1, out / "finding1.png"), "f2": plot_finding2(f2, out / "finding2.png"),
            "f3": plot_finding3(f3, out / "finding3.png")}
    secs = _marker_seconds(out)
    n = f1["n_problems"]
    md = [f"# RETU at toy scale: report{' (--quick: minimum sizes, the numbers mean nothing)' if quick else ''}", "",
          f"Study directory `{out}`; {len(secs)} stages, {stages.fmt_s(sum(secs.values()))} of stage time. "
          f"Accuracy is pass@1 on {n} benchmark problems (levels {', '.join(map(str, cfg.bench_levels))}), "
          f"temperature {cfg.eval_temperature}. Noise model: binomial SE of an accuracy (plus-two estimate, never 0); "
          "fit.py's bootstrap SEs below / above an identifiable A_post (+inf: not bounded above); a claim x > y is "
          "*supported* when x - y > 1.96 sqrt(se_x,below^2 + se_y,above^2), *not supported* when y - x exceeds the "
          "mirror bound, *inconclusive (within noise)* otherwise.", ""]
    md += ["## Finding 1: sequential SFT-then-RL beats pure RL and Syn-SFT-RL", "",
           "| paradigm | final accuracy (%) ± SE | compute (EFLOPs) | SFT-then-RL better? (z) |", "|---|---|---|---|"]
    for e in f1["entries"]:
        md.append(f"| {e['name']} | {e['est'].fmt()} | {e['eflops']:.3g} | "
                  + (f"{e['verdict']} ({e['z']:+.2f})" if "verdict" in e else "-") + " |")
    md += ["", f"![finding 1]({figs['f1'].name})", "", "Reproduce: " + "; ".join(f1["commands"]) +
           " (the last row of each `report.json` \"sft\" curve; the branch is the row of its SFT step).", "",
           f"**Verdict: {f1['verdict']}**", ""]
    md += ["## Finding 2: switch to RL in the Stable or mild-overfitting sub-phase", ""]
    for p in f2["pools"]:
        md += [f"Pool `{p['pool']}`: branches from one checkpoint per SFT sub-phase (fit.sft_subphases on the "
               "validation loss), each DAPO_dc on the RL prompts.", "",
               "| sub-phase | SFT step | val loss | P_sft | A_post [95% CI] (fit status) | ceiling used ± SE |",
               "|---|---|---|---|---|---|"]
        vloss = {q["step"]: q["val_loss"] for q in p["sft"].report["sft"]}
        for ph, (step, row, est) in p["phases"].items():
            # a fit that is not identifiable has no ceiling to put an interval on (its bootstrap runs away)
            ci = " " + fit.format_ci(row["A_ci"]) if row.get("A_ci") and row["status"] == "ok" else ""
            vl = vloss.get(step)
            md.append(f"| {ph} | {step} | {'-' if vl is None else f'{vl:.3f}'} | {row['P_sft']:.1f} | "
                      f"{fit._f(row['A_post']) if row['status'] == 'ok' else '-'}{ci} ({row['status']}) | "
                      f"{est.fmt()} ({est.source}) |")
        md += ["", "Reproduce: " + p["command"] + " (`fit/report.md` has the same rows).", ""]
        if p["best"] is None:
            md.append("Not testable: no branch from a stable/mild checkpoint together with one from another phase.")
        else:
            md.append(f"Best of stable/mild: {p['best']}; compared with "
                      + ", ".join(f"{ph} (z = {compare(p['phases'][p['best']][2], p['phases'][ph][2])[1]:+.2f})"
                                  for ph in p["others"]) + ".")
        md += ["", f"Verdict for `{p['pool']}`: {p['verdict']}", ""]
    md += [f"![finding 2]({figs['f2'].name})", "", f"**Verdict: {f2['verdict']}**", ""]
    md += ["## Finding 3: data scale dominates, difficulty multiplies, minimum validation loss predicts the ceiling",
           "", "| SFT pool | examples | min val loss | best branch | ceiling ± SE (source) |", "|---|---|---|---|---|"]
    for r in f3["rows"]:
        md.append(f"| {r['pool']} | {r['size']} | {fit._f(r['min_val_loss'], '.3f')} | {r['phase']} | "
                  f"{r['est'].fmt()} ({r['est'].source}) |")
    md += ["", "Reproduce: " + "; ".join(r["command"] for r in f3["rows"]) + ".", ""]
    for c in f3["claims"]:
        md.append(f"- {c['claim']}: {c['detail']} -> {c['verdict']}")
    md += ["", f"![finding 3]({figs['f3'].name})", "", f"**Verdict: {f3['verdict']}**", ""]
    lc = learning_check(out, cfg)
    md += ["## Did the toy model learn?", "",
           f"SFT solves a majority of level-1 problems at some checkpoint: **{'yes' if lc['majority'] else 'no'}**. "
           f"RL changes accuracy beyond noise in some branch: **{'yes' if lc['moved'] else 'no'}**. "
           "Without both, the verdicts above test the pipeline, not the paper.", "",
           "| SFT pool | val loss at step 0 | min val loss | best level-1 accuracy (%) | at step |",
           "|---|---|---|---|---|"]
    md += [f"| {r['pool']} | {r['val_start']:.3f} | {r['val_min']:.3f} | {r['level1']:.1f} | {r['level1_step']} |"
           for r in lc["sft"]]
    cut = any("unanswered" in r for r in lc["rl"])
    md += ["", "| RL run | accuracy at its start (%) | at its end (%) | problems gained / lost | sign test p |"
           + (" unanswered, start -> end |" if cut else ""),
           "|---|---|---|---|---|" + ("---|" if cut else "")]
    for r in lc["rl"]:
        row = f"| {r['run']} | {fit._f(r['start'])} | {r['end']:.1f} | "
        row += f"{r['up']} / {r['down']} | {r['p']:.3g} |" if "p" in r else "- | - |"
        if cut:
            row += " {:.0f} -> {:.0f} of {} |".format(r["unanswered"][0][0], r["unanswered"][1][0],
                                                      r["unanswered"][0][1]) if "unanswered" in r else " - |"
        md.append(row)
    md += ["", "(Gained / lost: problems whose score rose / fell between the branch's SFT checkpoint and its last RL "
           "checkpoint; p: exact two-sided sign test on them; the branch rows of each pool's `retu.py fit` report "
           f"(`fit/report.md`). A change counts when p < {lc['alpha']:.3g}, 0.05 over the number of branches tested; "
           "the pure-RL runs from the base model have no evaluated start."
           + (" Unanswered: replies with no boxed answer to the benchmark problems phrased "
              + " or ".join(f"\"{demo.PROMPT_TEMPLATES[t]}\"" for t in lc["templates"])
              + f", the phrasing{'s' if len(lc['templates']) > 1 else ''} whose expert trajectories are cut off "
              "before their final result "
              f"{100 * lc['share']:.0f}% of the time (demo.DataConfig.cutoff_share).)"
              if cut else ")")]
    md += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in secs.items()]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
