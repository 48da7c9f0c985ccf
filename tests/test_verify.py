"""Tests for verify.py: the grading policy of ../shared/reference/verifier.md in both directions.

The corpus below (hand-written, every case with its expected verdict) covers every rule of the policy: equivalent
forms must pass, near misses must fail. Adversarial inputs must fail closed quickly and execute nothing.

Benchmark (not a test): `python tests/test_verify.py --bench` prints median / p99 latency and cases/s of
score and score_batch on the corpus, and, when `math_verify` is importable (e.g. PYTHONPATH=/path/to/it), its
accuracy, latency and the list of disagreements on the same corpus.
"""
import builtins
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import verify  # noqa: E402

# (category, predicted answer, gold, expected). The completion is "... so the answer is $\boxed{<pred>}$."
BOXED = [
    # -- formatting of integers
    ("int", "72", "72", 1), ("int", "072", "72", 1), ("int", "72.0", "72", 1), ("int", "72.00", "72", 1),
    ("int", "-5", "-5", 1), ("int", "5", "-5", 0), ("int", "71", "72", 0), ("int", "720", "72", 0),
    ("int", "+7", "7", 1), ("int", r"\mathbf{7}", "7", 1), ("int", r"\textbf{7}", "7", 1),
    ("int", r"\text{13}", "13", 1), ("int", "13", r"\text{13}", 1), ("int", "{13}", "13", 1),
    ("int", "1,000,000", "1000000", 1), ("int", r"1\,000", "1000", 1), ("int", "1{,}000", "1000", 1),
    ("int", "1 000", "1000", 1), ("int", "1000", "1,000", 1), ("int", "10^3", "1000", 1),
    ("int", "2^{10}", "1024", 1), ("int", "2^{10}", "1023", 0), ("int", "1,001", "1000", 0),
    ("int", "7", "7.5", 0), ("int", "72.1", "72", 0), ("int", "71.9999", "72", 0), ("int", "0", "-0", 1),
    # -- decimals vs fractions (rule 5)
    ("dec", "0.5", r"\frac12", 1), ("dec", r"\frac{1}{2}", "0.5", 1), ("dec", "0.50", "1/2", 1),
    ("dec", ".5", "0.5", 1), ("dec", "-0.25", r"-\frac14", 1), ("dec", "0.25", r"-\frac14", 0),
    ("dec", "0.333", r"\frac13", 0), ("dec", "0.3333", r"\frac13", 0), ("dec", "0.33333", r"\frac13", 0),
    ("dec", "0.333333", r"\frac13", 1), ("dec", "0.3333333333", r"\frac13", 1),
    ("dec", "0.333343", r"\frac13", 0), ("dec", "0.666667", r"\frac23", 1), ("dec", "0.666666", r"\frac23", 1),
    ("dec", "0.666", r"\frac23", 0), ("dec", "0.111111", r"\frac19", 1), ("dec", "0.1", r"\frac19", 0),
    ("dec", "0.125", r"\frac18", 1), ("dec", "0.1249999", r"\frac18", 0), ("dec", "0.12", r"\frac18", 0),
    ("dec", r"\frac{5}{10}", r"\frac12", 1), ("dec", r"\frac{2}{4}", "0.5", 1), ("dec", "2.65", "2.650", 1),
    ("dec", "2.650", "2.65", 1), ("dec", "2.6", "2.65", 0), ("dec", "2.7", "2.65", 0), ("dec", "2.654", "2.65", 0),
    ("dec", r"\frac{53}{20}", "2.65", 1), ("dec", r"\sqrt2", "1.41", 1), ("dec", r"\sqrt2", "1.42", 0),
    ("dec", r"\frac13", "0.333", 1), ("dec", r"\frac13", "0.33", 0), ("dec", r"\frac{22}{7}", r"\pi", 0),
    ("dec", "3.14", r"\pi", 0), ("dec", "3.1416", r"\pi", 0), ("dec", "3.141593", r"\pi", 1),
    ("dec", "3.14159265", r"\pi", 1), ("dec", "1.41", r"\sqrt2", 0), ("dec", "1.414214", r"\sqrt2", 1),
    ("dec", "2.718282", "e", 1), ("dec", "12.566371", r"4\pi", 1), ("dec", "12.566", r"4\pi", 0),
    ("dec", r"0.\overline{3}", r"\frac13", 1), ("dec", r"0.1\overline{6}", r"\frac16", 1),
    ("dec", r"0.\overline{3}", "0.3", 0),
    # -- mixed numbers (rule 9)
    ("mixed", r"2\frac12", r"\frac52", 1), ("mixed", r"2\frac{1}{2}", "2.5", 1), ("mixed", r"3\frac{1}{4}", "3.25", 1),
    ("mixed", r"-2\frac12", "-2.5", 1), ("mixed", r"2\frac12", "1", 0), ("mixed", r"2 \frac{1}{2}", r"\frac52", 1),
    ("mixed", r"2\frac{3}{2}", "3", 1), ("mixed", r"2\frac12", "2", 0),
    # -- radicals
    ("rad", r"\sqrt{8}", r"2\sqrt2", 1), ("rad", r"\sqrt{12}", r"2\sqrt{3}", 1), ("rad", r"\sqrt{12}", r"3\sqrt{2}", 0),
    ("rad", r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt2}", 1), ("rad", r"\sqrt[3]{27}", "3", 1),
    ("rad", r"\sqrt[3]{16}", r"2\sqrt[3]{2}", 1), ("rad", r"\sqrt2+1", r"1+\sqrt{2}", 1),
    ("rad", r"\sqrt2-1", r"1-\sqrt2", 0),
    ("rad", r"\sqrt{2}", "2", 0), ("rad", "2^{1/2}", r"\sqrt2", 1), ("rad", r"\sqrt{3}/3", r"\frac{\sqrt3}{3}", 1),
    ("rad", r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", 1), ("rad", r"\sqrt{3}", r"\sqrt{2}", 0),
    ("rad", r"\sqrt[3]{-8}", "-2", 1), ("rad", r"\sqrt[3]{-8}", "2", 0),
    ("rad", r"2\sqrt{2}", r"\sqrt{2}", 0), ("rad", r"\sqrt{50}", r"5\sqrt2", 1), ("rad", "sqrt(2)", r"\sqrt2", 1),
    # -- pi, functions, tiny and huge values (rule 5 tolerances)
    ("sym", r"2\pi", r"2\pi", 1), ("sym", r"\pi/2", r"\frac{\pi}{2}", 1), ("sym", r"\frac{\pi}{2}", "90", 0),
    ("sym", r"\pi r^2", r"r^2\pi", 1), ("sym", r"\sin\frac\pi6", r"\frac12", 1), ("sym", r"\cos(\pi/3)", "0.5", 1),
    ("sym", r"\tan\frac{\pi}{4}", "1", 1), ("sym", r"\sin^2 x + \cos^2 x", "1", 1), ("sym", r"\log_2 8", "3", 1),
    ("sym", r"\ln(e^2)", "2", 1), ("sym", r"e^{\ln 5}", "5", 1), ("sym", r"1 - \frac{1}{e}", r"1 + \frac1e", 0),
    ("sym", r"\frac{e-1}{e}", r"1-\frac1e", 1), ("sym", r"\binom52", "10", 1), ("sym", r"\binom{6}{3}", "20", 1),
    ("sym", r"\binom{6}{3}", "15", 0), ("sym", "5!", "120", 1), ("sym", "5!", "24", 0),
    ("sym", r"\frac{\pi}{3}", r"\frac{\pi}{4}", 0),
    ("sym", r"\frac{1}{2004!}", r"\frac{1}{2006!}", 0), ("sym", r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}", 0),
    ("sym", r"\frac{2^{2005}+1}{3\cdot 2^{2006}}", r"\frac{1}{3\cdot2^{2006}}", 0),
    ("sym", r"\frac{1}{2006!}", r"\frac{1}{2006!}", 1), ("sym", r"\frac{2005!}{2006!}", r"\frac{1}{2006}", 1),
    ("sym", "10^{100}", "10^{100}+1", 0), ("sym", "2^{64}", "2^{64}-1", 0),
    ("sym", "2^{64}", "18446744073709551616", 1),
    ("sym", "10^{-100}", "10^{-101}", 0), ("sym", r"\sqrt{2}\cdot 10^{-50}", r"\sqrt{2}\cdot 10^{-51}", 0),
    ("sym", r"\pi \cdot 10^{-30}", r"10^{-30}\pi", 1), ("sym", "e^{-100}", "e^{-101}", 0),
    ("sym", r"\sqrt{2}\cdot 10^{-50}", r"\frac{\sqrt{2}}{10^{50}}", 1), ("sym", r"\lfloor 3.7 \rfloor", "3", 1),
    ("sym", r"\lceil \sqrt{2} \rceil", "2", 1),
    # -- polynomials and symbolic expressions (rule 2)
    ("poly", "(x+1)^2", "x^2+2x+1", 1), ("poly", "x^2+2x+1", "(x+1)^2", 1), ("poly", "(x+1)^2", "x^2+x+1", 0),
    ("poly", "(x-1)(x+1)", "x^2-1", 1), ("poly", "x^2-1", "x^2+1", 0), ("poly", "2ba", "2ab", 1),
    ("poly", "a^2-b^2", "(a-b)(a+b)", 1), ("poly", "x^3", "x^2", 0), ("poly", "3x^2-2x", "x(3x-2)", 1),
    ("poly", r"\frac{x^2-1}{x-1}", "x+1", 1), ("poly", "x+y", "y+x", 1), ("poly", "2x", "2y", 0),
    ("poly", "x^{10}", "x^{11}", 0), ("poly", r"\frac{1}{x}+\frac{1}{y}", r"\frac{x+y}{xy}", 1),
    ("poly", "|x|", "x", 0),
    ("poly", r"\sqrt{x^2}", "|x|", 1), ("poly", "x_1+x_2", "x_2+x_1", 1), ("poly", "x_1", "x_2", 0),
    ("poly", r"\frac{x}{2}", "0.5x", 1), ("poly", "(x+1)^3", "x^3+3x^2+3x+1", 1),
    ("poly", "(x+1)^3", "x^3+3x^2+3x+2", 0),
    ("poly", r"\alpha+\beta", r"\beta+\alpha", 1), ("poly", r"2\theta", r"\theta", 0),
    # -- equations (rule 2, chains)
    ("eq", "y=2x+3", "2x-y+3=0", 1), ("eq", "y = 2x + 3", "y=2x+4", 0), ("eq", "x=5", "5", 1), ("eq", "5", "x=5", 1),
    ("eq", "a+b=101", "101", 1), ("eq", "a+b = 50+51 = 101", "101", 1), ("eq", "101", "a+b=101", 0),
    ("eq", "y=2x+3", "2x+3", 1), ("eq", "x^2+y^2=1", "y^2+x^2=1", 1), ("eq", "x^2+y^2=1", "x^2+y^2=2", 0),
    ("eq", "2x+4y=6", "x+2y=3", 1), ("eq", "x = 3", "x = -3", 0), ("eq", "x=2", "y=2", 0), ("eq", "x = 6", "5", 0),
    ("eq", "k = 4", "4", 1), ("eq", r"x = \frac{1}{2}", "0.5", 1),
    # -- inequalities, intervals, set-builder (rule 7)
    ("ineq", r"x \le 2", r"(-\infty,2]", 1), ("ineq", r"(-\infty,2]", r"x\le 2", 1), ("ineq", "x<2", r"(-\infty,2]", 0),
    ("ineq", r"x \geq 10", r"[10,\infty)", 1), ("ineq", r"\geq 10", "10", 0), ("ineq", r"x\ge10", "10", 0),
    ("ineq", "10", r"x \ge 10", 0), ("ineq", "-2<x<3", "(-2,3)", 1), ("ineq", r"x>-2 \text{ and } x<3", "-2<x<3", 1),
    ("ineq", r"x<-1 \text{ or } x>2", r"(-\infty,-1)\cup(2,\infty)", 1),
    ("ineq", r"x<-1 \text{ or } x>2", r"(-\infty,-1]\cup(2,\infty)", 0), ("ineq", "2 < x", "x > 2", 1),
    ("ineq", "2x < 6", "x<3", 1), ("ineq", "x>3", "x<3", 0), ("ineq", r"\{x \mid x>2\}", r"(2,\infty)", 1),
    ("ineq", r"\{x : x \le 0\}", r"x \le 0", 1), ("ineq", r"x \neq 1", r"(-\infty,1)\cup(1,\infty)", 1),
    ("ineq", "x^2<4", "(-2,2)", 1), ("ineq", "(-2,2)", "x^2<4", 1), ("ineq", r"x^2 \le 4", "(-2,2)", 0),
    ("ineq", r"x^2-5x+6\ge0", r"(-\infty,2]\cup[3,\infty)", 1), ("ineq", "x^2>2", r"x>\sqrt2", 0),
    ("ineq", r"x^2 > 2", r"x<-\sqrt2 \text{ or } x>\sqrt2", 1),
    ("ineq", "x>2", r"x \ge 2", 0), ("ineq", r"x \in [1, 2]", "[1,2]", 1), ("ineq", "x ≤ 2", r"x \leq 2", 1),
    # -- tuples (rule 6)
    ("tuple", "(1,2)", "(1,2)", 1), ("tuple", "(1,2)", "(2,1)", 0), ("tuple", "(1, 2)", "(1,2)", 1),
    ("tuple", r"\left(1,2\right)", "(1,2)", 1), ("tuple", r"(\frac12, 3)", "(0.5, 3)", 1),
    ("tuple", "(1,2,3)", "(1,2)", 0),
    ("tuple", "(1,2)", "(1,2,3)", 0), ("tuple", "(3,-1)", "(3, -1)", 1), ("tuple", "(-1, 3)", "(3, -1)", 0),
    ("tuple", r"\langle 1,2 \rangle", "(1,2)", 1), ("tuple", "(2,500)", "(2,500)", 1),
    ("tuple", "(2, 500)", "(2,500)", 1),
    ("tuple", r"(\sqrt2, \pi)", r"(\sqrt{2}, \pi)", 1), ("tuple", "(1,2)", "1", 0),
    # -- intervals (rule 6)
    ("interval", "[0,1)", "[0,1)", 1), ("interval", "[0,1)", "(0,1)", 0), ("interval", "(0,1)", "[0,1)", 0),
    ("interval", "(0,1]", "(0,1]", 1), ("interval", "[0,1]", "[0,1)", 0),
    ("interval", r"(-\infty, 0)\cup(1,\infty)", r"(-\infty,0)\cup(1,\infty)", 1),
    ("interval", r"(1,\infty)\cup(-\infty,0)", r"(-\infty,0)\cup(1,\infty)", 1),
    ("interval", r"(-\infty,0)\cup(1,\infty)", r"(-\infty,0]\cup(1,\infty)", 0), ("interval", "[2,5]", "[2,5)", 0),
    ("interval", r"[\frac12, 2]", "[0.5,2]", 1), ("interval", "(0,1)", "(0,1)", 1),
    ("interval", r"(-\infty, \infty)", r"\mathbb{R}", 1), ("interval", r"\mathbb{R}", r"(-\infty,\infty)", 1),
    ("interval", "[1,2]", "(1,2)", 0), ("interval", "1", "[1,2]", 0), ("interval", "2", r"(-\infty,2]", 0),
    ("interval", r"[\sqrt2, 3)", r"[2^{1/2}, 3)", 1),
    # -- sets and multiple answers (rules 6, 8)
    ("set", r"\{1,2,3\}", r"\{3,2,1\}", 1), ("set", r"\{1,2\}", r"\{1,2,3\}", 0), ("set", r"\{1,2,3\}", r"\{1,2\}", 0),
    ("set", "1, 2, 3", "3, 2, 1", 1), ("set", "3, -5", "-5, 3", 1), ("set", "-5", "-5, 3", 0), ("set", "3", "3, -5", 0),
    ("set", "1,2,2,3", "1,2,3", 1), ("set", r"\pm 2", "2,-2", 1), ("set", "2, -2", r"\pm 2", 1),
    ("set", "2", r"\pm2", 0),
    ("set", r"1\pm\sqrt2", r"1+\sqrt2,1-\sqrt2", 1), ("set", r"1+\sqrt2", r"1\pm\sqrt2", 0),
    ("set", r"\{-1, 1\}", r"\pm1", 1),
    ("set", r"\emptyset", r"\varnothing", 1), ("set", r"\{\}", r"\emptyset", 1), ("set", r"\emptyset", "0", 0),
    ("set", "1728", r"1331 \text{ and } 1728", 0), ("set", "1331, 1728", r"1331 \text{ and } 1728", 1),
    ("set", r"x = 3 \text{ or } x = -5", "3, -5", 1), ("set", r"x = 3 \text{ or } x = -5", "3", 0),
    ("set", "1, 2", r"x = 1 \text{ or } x = 2", 1), ("set", "1", r"x = 1 \text{ or } x = 2", 0),
    ("set", "1, 2, 3", r"x = 1 \text{ or } x = 2", 0), ("set", r"x = \pm 2", "2, -2", 1),
    ("set", r"\{3\}", "3", 1), ("set", "3 or 4 or 5", "5", 0),
    ("set", r"3 \text{ or } 4", "4", 0), ("set", "(1,2), (3,4)", "(3,4), (1,2)", 1),
    ("set", "(1,2), (3,4)", "(1,2)", 0),
    # -- percent (rule 3)
    ("pct", r"50\%", "50", 1), ("pct", r"50\%", "0.5", 1), ("pct", "50", r"50\%", 1), ("pct", "0.5", r"50\%", 1),
    ("pct", "0.5", "50", 0), ("pct", "50", "0.5", 0), ("pct", "20", r"\frac15", 0), ("pct", r"12.5\%", "12.5", 1),
    ("pct", r"12.5\%", "0.125", 1), ("pct", "12.5", r"12.5\%", 1), ("pct", r"25\%", "0.5", 0), ("pct", "50%", "50", 1),
    ("pct", "50 percent", "50", 1), ("pct", r"5\%", "50", 0),
    # -- units, currency, degrees (rule 4)
    ("unit", r"30^\circ", "30", 1), ("unit", r"30^{\circ}", "30", 1), ("unit", "30°", "30", 1),
    ("unit", r"\frac{\pi}{6}", r"30^\circ", 0), ("unit", "30", r"\frac{\pi}{6}", 0), ("unit", r"\$12.50", "12.5", 1),
    ("unit", r"\$ 12.50", "12.50", 1), ("unit", "12", r"\$12", 1), ("unit", r"5 \text{ cm}", "5", 1),
    ("unit", r"5\text{ cm}^2", "5", 1), ("unit", r"8 \text{ ways}", "8", 1), ("unit", r"\text{8 ways}", "8", 1),
    ("unit", "60 miles per hour", "60", 1), ("unit", r"3 \text{ hours and } 20 \text{ minutes}", "3", 0),
    ("unit", r"6 \text{ cm}", "5", 0), ("unit", r"12 \text{ dollars}", "12", 1), ("unit", "€5", "5", 1),
    ("unit", r"2 \text{ (since } x>0)", "2", 1), ("unit", r"90^\circ", r"\frac{\pi}{2}", 0),
    # -- scientific notation
    ("sci", r"6.02 \times 10^{23}", r"6.02\times10^{23}", 1), ("sci", "6.02e23", r"6.02 \times 10^{23}", 1),
    ("sci", r"6.02 \times 10^{22}", r"6.02\times10^{23}", 0), ("sci", r"3\times10^8", "300000000", 1),
    ("sci", r"3.0 \times 10^{8}", r"3 \times 10^8", 1), ("sci", "1.5e-3", "0.0015", 1), ("sci", "1.5e-3", "1.5e-4", 0),
    ("sci", r"1.5\times10^{-3}", "0.0015", 1), ("sci", r"\frac{3}{2000}", r"1.5 \times 10^{-3}", 1),
    ("sci", "1e6", "1000000", 1), ("sci", "1e6", "100000", 0),
    ("sci", r"6.0221 \times 10^{23}", r"6.02\times10^{23}", 0),
    # -- text and multiple choice
    ("text", r"\text{Monday}", "Monday", 1), ("text", "Monday", r"\text{Tuesday}", 0),
    ("text", r"\text{yes}", "Yes", 1),
    ("text", r"\text{no}", "yes", 0), ("text", r"\text{(B)}", "B", 1), ("text", "B", "(B)", 1), ("text", "(C)", "B", 0),
    ("text", r"\text{(B) } 12", "(B)", 1), ("text", "(A)", "A", 1), ("text", "odd", r"\text{odd}", 1),
    ("text", "even", "odd", 0), ("text", r"\text{(D)}", "(E)", 0), ("text", "five", "5", 1), ("text", "six", "5", 0),
    ("text", r"\text{Tuesday}", r"\text{Thursday}", 0), ("text", "B", "b", 0),
    # -- matrices
    ("matrix", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1),
    ("matrix", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1),
    ("matrix", r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 0),
    ("matrix", r"\begin{pmatrix}1&2\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 0),
    ("matrix", r"\begin{pmatrix} \frac12 & 0 \\ 0 & 1\end{pmatrix}", r"\begin{pmatrix}0.5&0\\0&1\end{pmatrix}", 1),
    ("matrix", r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1),
    ("matrix", r"\begin{pmatrix}2\\1\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", 0),
    ("matrix", r"\begin{pmatrix}x&0\\0&x\end{pmatrix}", r"\begin{pmatrix}x&0\\0&x\end{pmatrix}", 1),
    # -- infinity
    ("inf", r"\infty", r"\infty", 1), ("inf", r"-\infty", r"\infty", 0), ("inf", r"\infty", "infinity", 1),
    ("inf", "∞", r"\infty", 1), ("inf", r"\infty", "10^{100}", 0), ("inf", r"+\infty", r"\infty", 1),
    # -- complex numbers
    ("complex", "i^2", "-1", 1), ("complex", "|3+4i|", "5", 1), ("complex", r"e^{i\pi}", "-1", 1),
    ("complex", r"\sqrt{-4}", "2i", 1), ("complex", r"2\mathrm{i}", "2i", 1), ("complex", "3+4i", "4i+3", 1),
    ("complex", "3+4i", "3-4i", 0), ("complex", "(1+i)^2", "2i", 1), ("complex", r"\frac{1}{i}", "-i", 1),
    ("complex", "1+i", "1", 0), ("complex", "i", "-i", 0), ("complex", "|3+4i|", "25", 0),
    # -- fuzzy-string gaming: the authors' Levenshtein > 0.6 fallback would accept all of these
    ("fuzzy", r"\frac{1}{3}", r"\frac{1}{2}", 0), ("fuzzy", "12354", "12345", 0), ("fuzzy", "x^2+1", "x^2+2", 0),
    ("fuzzy", "(1,2,4)", "(1,2,3)", 0), ("fuzzy", "3.1416", "3.1415", 0), ("fuzzy", "1234", "12345", 0),
    ("fuzzy", r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{2}}{2}", 0), ("fuzzy", r"2\sqrt{6}", r"2\sqrt{5}", 0),
    ("fuzzy", "(-1,2]", "(-1,2)", 0), ("fuzzy", r"\{1,2,4\}", r"\{1,2,3\}", 0), ("fuzzy", "x^2-4x+4", "x^2-4x+3", 0),
    # -- the normalisation list of the issue
    ("norm", "√3", r"\sqrt3", 1), ("norm", "2π", r"2\pi", 1), ("norm", "45°", "45", 1), ("norm", "3×4", "12", 1),
    ("norm", "12÷4", "3", 1), ("norm", "−5", "-5", 1), ("norm", "１２", "12", 1), ("norm", r"\dfrac{3}{4}", "0.75", 1),
    ("norm", r"\tfrac34", r"\frac34", 1), ("norm", r"\left( 1, 2 \right)", "(1,2)", 1), ("norm", r"1\!000", "1000", 1),
    ("norm", r"\frac{1}{2}\,", "0.5", 1), ("norm", "1,234", "1234", 1), ("norm", r"\$5", "5", 1),
    ("norm", r"5 \text{ meters}", "5", 1), ("norm", "5.", "5", 1), ("norm", r"60^\circ", "60", 1),
    ("norm", r"50\%", "0.5", 1), ("norm", "x²", "x^2", 1), ("norm", "½", "0.5", 1), ("norm", "2½", "2.5", 1),
    ("norm", r"\displaystyle\frac{9}{7}", r"\dfrac{9}{7}", 1), ("norm", r"\left|-3\right|", "3", 1),
    # -- found by red-teaming the verifier (each was wrong once)
    ("pct", r"5000\%", r"50\%", 0), ("pct", r"\frac{100}{2}\%", r"50\%", 1), ("text", "(B) or (C)", "(B)", 0),
    ("int", r"\$1,000.50", "1000.5", 1), ("int", r"10,\!000", "10000", 1), ("int", "10000", r"10,\!000", 1),
    ("unit", r"10 \text{ or more}", "10", 0), ("unit", "10 at least", "10", 0),
    ("unit", r"5 \text{ is the answer}", "5", 1),
    ("unit", r"5 \text{ if } n>2", "5", 0), ("interval", r"\text{all real numbers}", r"(-\infty,\infty)", 1),
    ("eq", "f(x) = x^2", "x^2", 1), ("tuple", "x=3, y=4", "(3,4)", 1), ("set", "3 or 5", "3, 5", 1),
    ("set", "3, 4", "3", 0),
    ("norm", r"\frac.5 2", "1", 0), ("text", r"\text{No}", "no", 1), ("text", r"\text{no}", r"\text{yes}", 0),
    ("sym", r"\sin 2x", r"\sin(2x)", 1), ("sym", r"2\sin x\cos x", r"\sin 2x", 1),
    ("sym", r"\sin x \cos x", r"\sin 2x", 0),
    ("sym", r"\sin 2\theta", r"2\sin\theta\cos\theta", 1), ("sym", r"\frac{\pi}{3} + 10^{-95}", r"\frac{\pi}{3}", 0),
    ("norm", r"\cfrac{2}{3}", r"\frac23", 1), ("norm", "1,234", "1243", 0), ("norm", "−5", "5", 0),
]

# (category, completion, gold, expected): extraction rules (rule 1, 8) and gold formats, verbatim.
RAW = [
    ("box", r"\boxed{\boxed{5}}", "5", 1), ("box", r"so $\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt3}2", 1),
    ("box", r"first \boxed{3}. Later, after checking everything again, \boxed{4}.", "4", 1),
    ("box", r"first \boxed{3}. Later, after checking everything again, \boxed{4}.", "3", 0),
    ("box", r"\boxed{840} \boxed{840}", "840", 1),
    ("box", r"\boxed{7} if $n$ is odd, \boxed{8} if $n$ is even", "7", 0),
    ("box", r"\boxed{7} if $n$ is odd, \boxed{8} if $n$ is even", "8", 0),
    ("box", r"$\boxed{3}$ or $\boxed{4}$", "3", 0),
    ("box", r"$\boxed{3}$ or $\boxed{4}$", "3, 4", 1),
    ("box", r"The roots are $\boxed{3}$ and $\boxed{-5}$.", "3, -5", 1),
    ("box", r"The roots are $\boxed{3}$, $\boxed{-5}$.", "-5,3", 1),
    ("box", r"The roots are $\boxed{3}$ and $\boxed{-5}$.", "3", 0),
    ("box", r"\fbox{12}", "12", 1), ("box", r"x = \boxed{3}, y = \boxed{4}", "(3, 4)", 1), ("box", r"\boxed{}", "5", 0),
    ("truncated", r"So the answer is \boxed{12", "12", 0),
    ("truncated", r"So the answer is \boxed{\frac{1}{2}", r"\frac12", 0),
    ("truncated", r"The answer is \boxed{12}. So \boxed{", "12", 0),
    ("truncated", "First choose 3 of the 9 people, then", "9", 0),
    ("truncated", r"\boxed{3} and then \boxed{5} since \boxed{", "5", 0),
    ("truncated", r"so \boxed{\frac{1}{\boxed{2}", "2", 0),
    ("truncated", "So x = 7. So x = 7. So x", "7", 0), ("truncated", "The answer is", "5", 0),
    ("truncated", r"The answer is $\frac{1}{", r"\frac12", 0), ("truncated", "I computed 5 apples and", "5", 0),
    ("phrase", "The answer is 5.", "5", 1),
    ("phrase", r"The final answer is $\frac{1}{2}$. I hope it is correct.", "0.5", 1),
    ("phrase", "Answer: 42", "42", 1), ("phrase", "#### 72", "72", 1), ("phrase", "The answer is: 3.5", "3.5", 1),
    ("phrase", "Therefore, the answer is $x = 4$.", "4", 1), ("phrase", "**Final Answer:** 17", "17", 1),
    ("phrase", "<answer>12</answer>", "12", 1), ("phrase", "The answer is 5 because 2+3=5.", "5", 1),
    ("phrase", "I computed 5 apples.", "5", 0), ("phrase", "72", "72", 1), ("phrase", r"$\frac{1}{2}$", "0.5", 1),
    ("phrase", "The answer is 6.", "5", 0), ("phrase", "The answer is 5. Wait, the answer is 6.", "5", 0),
    ("phrase", "Answer: (B)", "B", 1), ("phrase", "The answer is (B).", "B", 1),
    ("phrase", "The answer is (B).", "C", 0),
    ("phrase", "Answer: C", "(C)", 1), ("phrase", r"The answer is \(\frac{3}{4}\).", "0.75", 1),
    ("phrase", "The answer is 1,000 dollars.", "1000", 1), ("phrase", r"The answer is \boxed{5}.<|im_end|>", "5", 1),
    ("gold", r"\boxed{7}", r"\boxed{\frac{9}{7}}", 0), ("gold", r"\boxed{\dfrac{9}{7}}", r"\boxed{\frac{9}{7}}", 1),
    ("gold", r"\boxed{5}", r"Adding, we get $2+3=\boxed{5}$.", 1), ("gold", r"\boxed{9/7}", r"\dfrac{9}{7}", 1),
    ("gold", r"\boxed{\frac97}", r"$\frac{9}{7}$", 1),
    ("gold", r"\boxed{72}", "Natalia sold 48/2 = 24 clips.\n#### 72", 1),
    ("gold", r"\boxed{71}", "Natalia sold 48/2 = 24 clips.\n#### 72", 0), ("gold", r"\boxed{1000}", "#### 1,000", 1),
    ("gold", r"\boxed{033}", "33", 1), ("gold", r"\boxed{(1,2)}", "$(1,2)$", 1),
    ("gold", r"\boxed{6.02e23}", r"6.02 \times 10^{23}", 1),
]

CORPUS = [(cat, f"We compute carefully, so the answer is $\\boxed{{{p}}}$.", g, w) for cat, p, g, w in BOXED] + RAW


def test_corpus_shape():
    assert len(CORPUS) >= 300
    negatives = sum(w == 0 for *_, w in CORPUS)
    assert negatives >= len(CORPUS) / 3, (negatives, len(CORPUS))
    cats = {c for c, *_ in CORPUS}
    assert {"int", "dec", "rad", "sym", "poly", "eq", "tuple", "interval", "set", "pct", "unit", "sci", "text",
            "matrix", "inf", "ineq", "complex", "box", "phrase", "truncated", "fuzzy", "norm", "gold"} <= cats


@pytest.mark.parametrize("cat,completion,gold,want", CORPUS, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CORPUS)])
def test_corpus(cat, completion, gold, want):
    v = verify.grade(completion, gold)
    assert v.score == want, (v, gold)
    assert verify.score(completion, gold) == want


def test_sympy_latex_forms_of_random_expressions():
    """sympy.latex as an independent LaTeX writer: expanded / factored forms of random expressions are equal,
    and adding 1/7 is caught even next to a huge value (e^{e^{y+5}} + 1/7)."""
    import random

    import sympy as sp
    rng, (x, y) = random.Random(0), sp.symbols("x y")

    def rand_expr(d=0):
        if d > 2 or rng.random() < 0.3:
            return rng.choice([x, y, sp.Integer(rng.randint(1, 9)), sp.Rational(rng.randint(1, 9), rng.randint(2, 9)),
                               sp.sqrt(rng.randint(2, 7)), sp.pi])
        a, b = rand_expr(d + 1), rand_expr(d + 1)
        return rng.choice([a + b, a - b, a * b, a / (b + 3), a ** rng.randint(2, 3), sp.sin(a), sp.exp(a),
                           sp.sqrt(a ** 2 + 1)])
    for _ in range(150):
        e = rand_expr()
        gold = sp.latex(e)
        forms = [sp.latex(sp.expand(e))] + ([] if e.has(sp.sin, sp.exp) else [sp.latex(sp.factor(e))])
        for form in forms:
            assert verify.grade(f"\\boxed{{{form}}}", gold).correct, (gold, form)
        assert not verify.grade(f"\\boxed{{{sp.latex(e + sp.Rational(1, 7))}}}", gold).correct, gold


def test_aime_integer_gold_and_non_string_inputs():
    assert verify.score(r"\boxed{33}", 33) == 1.0
    assert verify.score(r"\boxed{34}", 33) == 0.0
    assert verify.score(None, "5") == 0.0
    assert verify.score(12345, "5") == 0.0


def test_extract_answer():
    assert verify.extract_answer(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert verify.extract_answer(r"\boxed{3} and \boxed{-5}") == "{3} , {-5}"
    assert verify.extract_answer(r"\boxed{3} or \boxed{4}") == "{3} or {4}"
    assert verify.extract_answer(r"\boxed{1}. Then, much later in a new paragraph: \boxed{2}") == "2"
    assert verify.extract_answer(r"\boxed{\frac{1}{2}") is None
    assert verify.extract_answer("The final answer is $42$. I hope it is correct.") == "42"
    assert verify.extract_answer("The answer is 3.5.") == "3.5"
    assert verify.extract_answer("First choose 3 of the 9 people, then") is None
    assert verify.extract_answer("") is None


def test_reasons_separate_parse_failures_from_wrong_answers():
    assert verify.grade(r"\boxed{5}", "6").reason == "wrong"
    assert verify.grade("no marker here at all", "6").reason == "no_answer"
    assert verify.grade(r"\boxed{5 +* ]}", "6").reason == "unparsable"
    assert verify.grade(r"\boxed{5}", "").reason == "bad_gold"
    assert verify.grade(r"\boxed{5}", "5").reason == "correct"


# -- adversarial inputs: each must fail closed (or be right) fast and execute nothing

NESTED = "(" * 10000 + "1" + ")" * 10000
ADVERSARIAL = [
    ("tower", r"\boxed{9^{9^{9^{9}}}}", "1", 0),
    ("tower-self", r"\boxed{9^{9^{9^{9}}}}", r"9^{9^{9^{9}}}", 1),      # identical text: right answer
    ("nested-parens", f"\\boxed{{{NESTED}}}", "1", 0),
    ("nested-braces", "\\boxed{" + "{" * 10000 + "1" + "}" * 10000 + "}", "1", 0),
    ("unbalanced", "\\boxed{" + "{" * 5000 + "1", "1", 0),
    ("1MB", "x" * 1_000_000 + r" \boxed{7}", "7", 1),
    ("1MB-boxes", r"\boxed{" * 100_000, "1", 0),
    ("1MB-noanswer", "7 " * 500_000, "7", 0),
    ("import", r"\boxed{__import__('os').system('touch /tmp/retu_pwned')}", "0", 0),
    ("eval", r"\boxed{eval(\"open('/tmp/retu_pwned','w')\")}", "0", 0),
    ("lambda", r"\boxed{(lambda: 1)()}", "1", 0),
    ("dunder", r"\boxed{().__class__.__bases__[0].__subclasses__()}", "0", 0),
    ("factorial-bomb", r"\boxed{(10^{10})!}", "1", 0), ("factorial-tower", r"\boxed{((100)!)!}", "1", 0),
    ("exp-bomb", r"\boxed{e^{e^{e^{10}}}}", "1", 0), ("sin-bomb", r"\boxed{\sin(10^{10^{5}})}", "0", 0),
    ("big-literal", r"\boxed{" + "9" * 100_000 + "}", "1", 0), ("binom-bomb", r"\boxed{\binom{10^{9}}{5}}", "1", 0),
    ("surrogates", "\ud800\udfff \\boxed{5}\udc80", "5", 1), ("nul", "\x00\\boxed{5}\x00", "5", 1),
    ("long-sum", r"\boxed{" + "+".join(["1"] * 900) + "}", "900", 1),
    ("many-items", r"\boxed{" + ",".join(["1"] * 900) + "}", "1", 0),
    ("sqrt-big", r"\boxed{\sqrt{" + "7" * 380 + "}}", "3", 0), ("root-index", r"\boxed{\sqrt[10^{9}]{2}}", "1", 0),
    ("deep-frac", "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}", "1", 0),
    ("pm-bomb", r"\boxed{" + r"\pm 1" * 20 + "}", "1", 0),
    ("dots", r"\boxed{" + "." * 1999 + "x}", "1", 0), ("answer-tags", "<answer>" * 100_000, "1", 0),
    ("text-unclosed", "\\boxed{" + "\\text{" * 300 + "}", "1", 0),
    ("words", r"\boxed{1" + " aa" * 600 + " 1x}", "1", 0),
    ("root-of-product", r"\boxed{y}", r"{\sqrt{7^2+2.718^2}}^{\frac{1}{700876051303}}", 0),
    ("quartic", r"\boxed{\frac{x^4}{65521} + \frac{x^3}{65519} - \frac{x}{65497} + \frac{3}{65479} < 0}", "(0,1)", 0),
    ("long-union", r"\boxed{" + r"\cup".join(f"({2 * k},{2 * k + 1})" for k in range(150)) + "}", "(0,1)", 0),
]


@pytest.mark.parametrize("name,completion,gold,want", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_fast_and_closed(name, completion, gold, want):
    wall, cpu = time.perf_counter(), time.process_time()
    assert verify.score(completion, gold) == want
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    # CPU time of this process: immune to other jobs on the machine. The bound is for super-linear blowups (seconds
    # to minutes on these inputs): 1MB-boxes costs 0.03-0.35 s alone, but read 1.0-1.1 s inside the full suite on a
    # loaded machine (cause not pinned down: not the torch threads, not the collector walking a large heap)
    assert cpu < 2.0, (name, cpu)
    assert wall < 10.0, (name, wall)       # hang guard
    assert not os.path.exists("/tmp/retu_pwned")


def test_huge_or_broken_gold_is_bad_gold_fast():
    for gold in ("1" + " aa" * 300_000, "\\text{" * 300, "\\boxed{" * 1000):
        cpu = time.process_time()
        assert verify.grade(r"\boxed{1}", gold).reason == "bad_gold"
        assert time.process_time() - cpu < 1.0


def test_no_eval_path(monkeypatch, tmp_path):
    """No corpus or payload answer reaches eval/exec or sympy's string parser."""
    import sympy.parsing.sympy_parser as sp_parser

    def boom(*a, **k):
        raise AssertionError("eval path reached")
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    monkeypatch.setattr(sp_parser, "eval_expr", boom)
    monkeypatch.setattr(sp_parser, "parse_expr", boom)
    marker = tmp_path / "pwned"
    payloads = [f"__import__('pathlib').Path('{marker}').touch()", f"open('{marker}', 'w')",
                f"exec(\"open('{marker}','w')\")", "sympify('x')", "globals()", "x.__class__"]
    for p in payloads:
        v = verify.grade(f"\\boxed{{{p}}}", "1")
        assert v.reason in ("unparsable", "wrong"), (p, v)
    for _, completion, gold, _ in CORPUS:
        assert verify.grade(completion, gold).reason != "error", (completion, gold)
    assert not marker.exists()


def test_fuzz_token_soup_never_crashes():
    """Random LaTeX-ish token strings: no internal error, every call fast (a deterministic sample)."""
    import random
    toks = [r"\frac", r"\sqrt", "{", "}", "(", ")", "[", "]", "^", "_", "x", "2", "10", "0.5", ".99", "-", "+", "/",
            "=", "<", r"\le", ",", r"\pi", "e", "i", "!", "|", r"\infty", r"\cup", r"\{", r"\}", r"\pm", "%",
            r"\text{ cm}", r"\sin", r"\log", "99", r"\binom", r"\left(", r"\right)", " ", "or", "&", r"\\",
            r"\begin{pmatrix}", r"\end{pmatrix}", r"\mid", r"\circ", r"\lfloor", r"\rfloor", r"\overline{3}", "\\"]
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice(toks) for _ in range(rng.randint(1, 14)))
        b = "".join(rng.choice(toks) for _ in range(rng.randint(1, 14))) if rng.random() < 0.5 else a
        cpu = time.process_time()
        v = verify.grade("\\boxed{" + a + "}", b)
        assert v.reason != "error", (a, b)
        assert time.process_time() - cpu < 1.0, (a, b)


def test_fuzz_hostile_grammar_stays_fast():
    """Random well-formed LaTeX with hostile pieces (towers, factorials, huge literals, roots, floors, binomials,
    sets): each call stays under 1 s of CPU and never hits an internal error. Each generator rule below once
    found a sympy call that ran for minutes (gamma(2^12345) in evalf, binomial(-1, 10^12), factoring a root)."""
    import random
    rng = random.Random(1)
    leaves = ["2", "7", "0", "1", "0.5", "99", "12345", "x", "y", r"\pi", "e", "i", "10^{300}", "2^{2005}", "1.5e-300",
              "65537", "-1", r"\infty", "1000000000000"]

    def gen(d):
        if d <= 0 or rng.random() < 0.2:
            return rng.choice(leaves)
        a, b = gen(d - 1), gen(d - 1)
        return rng.choice([f"{a}+{b}", f"{a}\\cdot {b}", f"\\frac{{{a}}}{{{b}}}", f"{{{a}}}^{{{b}}}", f"({a})!",
                           f"\\sqrt[{{{b}}}]{{{a}}}", f"\\sin({a})", f"\\log_{{{b}}}({a})", f"\\binom{{{a}}}{{{b}}}",
                           f"\\lfloor {a} \\rfloor", f"|{a}|", f"e^{{{a}}}", f"\\cos\\frac{{\\pi}}{{{a}}}", f"{a}<{b}",
                           f"({a},{b})", f"[{a},{b})", f"\\{{{a},{b}\\}}", f"{a}\\%", f"{a} \\pm {b}",
                           f"x^{{{a}}} < {b}", f"\\sqrt{{{a}^2+{b}^2}}"])
    for _ in range(150):
        a, b = gen(rng.randint(1, 5)), gen(rng.randint(1, 5))
        b = a.replace("x", "(x)") if rng.random() < 0.3 else b
        cpu = time.process_time()
        v = verify.grade(f"\\boxed{{{a}}}", b)
        assert v.reason != "error", (a, b)
        assert time.process_time() - cpu < 1.0, (a, b)


def test_watchdog_interrupts_a_stuck_call_in_any_thread(monkeypatch):
    """A call stuck inside a library loop (no cooperative check) is interrupted at cfg.hard_limit_s."""
    def stuck(*args):
        while True:
            pass
    monkeypatch.setattr(verify, "_grade", stuck)
    cfg = verify.VerifyConfig(hard_limit_s=0.3)
    out = {}
    t0 = time.perf_counter()
    out["main"] = verify.grade("x", "y", cfg)
    th = threading.Thread(target=lambda: out.update(thread=verify.grade("x", "y", cfg)))
    th.start()
    th.join(30)
    assert [(v.reason, v.score) for v in (out["main"], out["thread"])] == [("timeout", 0.0)] * 2
    assert time.perf_counter() - t0 < 20.0


def test_sympy_slow_path_fails_closed_in_time():
    """Found by fuzzing: sympy's assumption system evaluates this gold for seconds inside one constructor."""
    gold = r"(\lfloor 7 \rfloor)(\sqrt{\sin(\sin(\arcsin(0.5)))^2+\log_{1000}(\arcsin(3))\%^2})"
    t0 = time.perf_counter()
    assert verify.score(r"\boxed{\{\arcsin(0),\infty+10\}}", gold) == 0.0
    assert time.perf_counter() - t0 < 10.0


def test_budget_works_off_the_main_thread():
    cfg = verify.VerifyConfig(time_budget_s=0.0)
    out = {}
    th = threading.Thread(target=lambda: out.update(v=verify.grade(r"\boxed{(x+1)^2}", "x^2+2x+1", cfg)))
    th.start()
    th.join(30)
    assert out["v"].reason == "timeout" and out["v"].score == 0.0
    out.clear()
    th = threading.Thread(target=lambda: out.update(v=verify.grade(r"\boxed{(x+1)^2}", "x^2+2x+1")))
    th.start()
    th.join(30)
    assert out["v"].score == 1.0


def test_score_batch_matches_score_and_survives_overtime():
    items = CORPUS[::7]
    comps, golds = [c for _, c, _, _ in items], [g for _, _, g, _ in items]
    assert verify.score_batch(comps, golds, workers=0) == [float(w) for *_, w in items]
    assert verify.score_batch(comps, golds, workers=2) == [float(w) for *_, w in items]
    # a slow item (two 64-element sets of polynomials, ~1 s in-process with a large cooperative budget) is
    # killed at the hard limit and scores 0.0; the batch goes on and the pool recovers for the next call
    slow_gold = r"\{" + ",".join(f"x^2+{k}x" for k in range(1, 65)) + r"\}"
    slow = r"\boxed{\{" + ",".join(f"x^2+{k}x" for k in range(64, 0, -1)) + r"\}}"
    cfg = verify.VerifyConfig(time_budget_s=60.0, batch_timeout_s=0.3)
    hard = verify.grade_batch([slow, slow, r"\boxed{5}"], [slow_gold, slow_gold, "5"], workers=2, cfg=cfg)
    assert [v.reason for v in hard] == ["worker_timeout", "worker_timeout", "correct"]
    assert verify.score_batch(comps[:4], golds[:4], workers=2) == [float(w) for *_, w in items[:4]]
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        verify.score_batch(["a", "b"], ["a"])


def test_score_batch_survives_a_crashed_worker():
    slow_gold = r"\{" + ",".join(f"x^2+{k}x" for k in range(1, 65)) + r"\}"
    slow = r"\boxed{\{" + ",".join(f"x^2+{k}x" for k in range(64, 0, -1)) + r"\}}"
    cfg = verify.VerifyConfig(time_budget_s=60.0, batch_timeout_s=20.0)
    verify.score_batch(["1"], ["1"], workers=2)                     # pool up
    out = {}
    th = threading.Thread(target=lambda: out.update(v=verify.grade_batch(
        [slow, r"\boxed{5}", r"\boxed{6}"], [slow_gold, "5", "5"], workers=2, cfg=cfg)))
    th.start()
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline:                           # find the worker grading item 0 ...
        busy = [w for w in verify._POOL.workers if w.item == 0]
        if busy:
            busy[0].proc.kill()                                     # ... and crash it (our own child process)
            break
        time.sleep(0.005)
    th.join(60)
    assert [v.reason for v in out["v"]] == ["worker_crash", "correct", "wrong"]
    assert verify.score_batch([r"\boxed{5}"], ["5"], workers=2) == [1.0]


def test_cli_grades_jsonl(tmp_path, capsys):
    path = tmp_path / "g.jsonl"
    rows = [{"completion": r"\boxed{5}", "gold": "5"}, {"completion": r"\boxed{4}", "gold": "5"},
            {"completion": "no answer", "gold": "5"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = verify.main([str(path)])
    assert summary["n"] == 3 and summary["accuracy"] == pytest.approx(1 / 3)
    assert summary["reasons"] == {"correct": 1, "wrong": 1, "no_answer": 1}
    assert json.loads(capsys.readouterr().out.strip())["n"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"completion": "x"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: missing key 'gold'"):
        verify.main([str(bad)])


def test_throughput():
    """Cases/s of score on the corpus (printed; only a generous hang guard is asserted)."""
    t0 = time.perf_counter()
    for _, c, g, _ in CORPUS:
        verify.score(c, g)
    dt = time.perf_counter() - t0
    print(f"\nverify.score: {len(CORPUS) / dt:.0f} cases/s on this CPU ({len(CORPUS)} cases)")
    assert dt < 60


# -- benchmark: python tests/test_verify.py --bench

def _latencies(fn, items):
    lat, correct = [], []
    for _, c, g, w in items:
        t = time.perf_counter()
        ok = fn(c, g)
        lat.append(time.perf_counter() - t)
        correct.append(ok == bool(w))
    lat.sort()
    return correct, statistics.median(lat), lat[int(0.99 * (len(lat) - 1))], len(lat) / sum(lat)


def bench() -> None:
    ours, med, p99, rate = _latencies(lambda c, g: verify.score(c, g) == 1.0, CORPUS)
    print(f"retu verify.score: accuracy {sum(ours) / len(ours):.3f} on {len(CORPUS)} cases, "
          f"median {med * 1e3:.2f} ms, p99 {p99 * 1e3:.1f} ms, {rate:.0f} cases/s")
    comps, golds = [c for _, c, _, _ in CORPUS], [g for _, _, g, _ in CORPUS]
    verify.score_batch(comps[:8], golds[:8], workers=2)               # start the pool outside the timing
    t = time.perf_counter()
    verify.score_batch(comps, golds, workers=2)
    print(f"retu verify.score_batch(workers=2): {len(comps) / (time.perf_counter() - t):.0f} cases/s")
    try:
        from math_verify import parse
        from math_verify import verify as mv_verify
        from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig
    except ImportError:
        print("math_verify not importable: no comparison")
        return

    def mv(c, g):   # the recommended setup: gold wrapped in \boxed{} and parsed as LaTeX
        gold = parse(g if "\\boxed" in g or "####" in g else f"\\boxed{{{g}}}",
                     extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
        try:
            return bool(mv_verify(gold, parse(c)))
        except Exception:
            return False
    theirs, med, p99, rate = _latencies(mv, CORPUS)
    print(f"math_verify: accuracy {sum(theirs) / len(theirs):.3f}, median {med * 1e3:.2f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, {rate:.0f} cases/s")
    for (cat, c, g, w), a, b in zip(CORPUS, ours, theirs):
        if a != b:
            print(f"  disagree [{cat}] expected={w} retu={'ok' if a else 'WRONG'} "
                  f"math_verify={'ok' if b else 'WRONG'}: gold={g!r} completion={c[-70:]!r}")


if __name__ == "__main__" and "--bench" in sys.argv:
    bench()
