"""stages.py: the resumable study runner, sequential and on worker processes."""
import json
import sys
import textwrap
import time

import pytest

import stages as S


def test_sequential_runner_resumes_and_fails_loudly(tmp_path):
    calls, lines = [], []
    runner = S.StageRunner(tmp_path, log=lines.append)
    plan = [S.Stage("a", lambda: calls.append("a")),
            S.Stage("b", [sys.executable, "-c", f"open({str(tmp_path / 'b.txt')!r}, 'w').write('ok')"], needs=("a",)),
            S.Stage("c", lambda: calls.append("c"))]
    runner.run(plan)
    assert calls == ["a", "c"] and (tmp_path / "b.txt").read_text() == "ok"
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["a.done", "b.done", "c.done"]
    assert json.loads((tmp_path / "stages" / "b.done").read_text())["commands"] == [" ".join(plan[1].run)]
    assert any("stage 2/3 b" in s and "ETA" in s for s in lines)
    runner.run(plan)                                                # everything done: nothing runs again
    assert calls == ["a", "c"] and "3 of 3 stages already done" in lines[-2]

    def boom():
        raise RuntimeError("boom")
    plan2 = plan + [S.Stage("d", boom), S.Stage("e", lambda: calls.append("e"))]
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(plan2)
    assert not (tmp_path / "stages" / "d.done").exists() and calls == ["a", "c"]
    with pytest.raises(RuntimeError, match=r"stage f failed \(exit 3\)"):
        runner.run([S.Stage("f", [sys.executable, "-c", "raise SystemExit(3)"])])
    assert not (tmp_path / "stages" / "f.done").exists()


def test_plan_checks_and_chain_lengths():
    with pytest.raises(ValueError, match="unique"):
        S.check_plan([S.Stage("x", list), S.Stage("x", list)])
    with pytest.raises(ValueError, match=r"'b' needs \['c'\], which come after it"):
        S.check_plan([S.Stage("a", list), S.Stage("b", list, needs=("c",)), S.Stage("c", list)])
    S.check_plan([S.Stage("b", list, needs=("outside",))])          # a need outside the plan counts as met
    #   a(1) -> b(5) -> d(1)      longest chain from a: 1 + 5 + 1 = 7
    #   a    -> c(2)
    plan = [S.Stage("a", list, 1), S.Stage("b", list, 5, ("a",)), S.Stage("c", list, 2, ("a",)),
            S.Stage("d", list, 1, ("b", "c")), S.Stage("e", list, 3)]
    assert S.chain_lengths(plan) == {"a": 7, "b": 6, "c": 3, "d": 1, "e": 3}


# A study whose stages record when they ran; `python plan.py OUT serve` is its worker, `... run W` its parent.
PLAN = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r})
    import stages as S
    out = sys.argv[1]

    def job(name, seconds, fail=False):
        def run():
            t0 = time.time()
            print("step 1/1 of", name, flush=True)  # a progress line, for the heartbeat
            time.sleep(seconds)
            if fail:
                raise ValueError("planned failure in " + name)
            with open(out + "/times.jsonl", "a") as f:
                f.write(json.dumps({{"name": name, "start": t0, "end": time.time()}}) + "\\n")
            return {{"ran": name}}
        return run

    fail = len(sys.argv) > 3 and sys.argv[3] == "fail"
    plan = [S.Stage("prep", job("prep", 0.1)),
            S.Stage("long", job("long", 1.5), 10, ("prep",)),
            S.Stage("short1", job("short1", 0.3), 1, ("prep",)),
            S.Stage("short2", job("short2", 0.3, fail), 1, ("prep",)),
            S.Stage("after", job("after", 0.1), 1, ("short1", "short2"))]
    runner = S.StageRunner(out, log=lambda s: print(s, flush=True))
    if sys.argv[2] == "serve":
        S.serve(runner, plan)
    else:
        runner.run_parallel(plan, [sys.executable, __file__, out, "serve", *sys.argv[3:]], workers=2, heartbeat_s=0.5)
""")


def _run_plan(tmp_path, *args):
    import subprocess
    from pathlib import Path
    script = tmp_path / "plan.py"
    script.write_text(PLAN.format(root=str(Path(S.__file__).resolve().parent)))
    return subprocess.run([sys.executable, str(script), str(tmp_path), "run", *args], capture_output=True, text=True,
                          timeout=120)


def test_parallel_runner_respects_needs_overlaps_and_resumes(tmp_path):
    res = _run_plan(tmp_path)
    assert res.returncode == 0, res.stderr
    times = {r["name"]: r for r in map(json.loads, open(tmp_path / "times.jsonl"))}
    assert set(times) == {"prep", "long", "short1", "short2", "after"}
    plan_needs = {"long": ["prep"], "short1": ["prep"], "short2": ["prep"], "after": ["short1", "short2"]}
    for name, needs in plan_needs.items():
        assert all(times[name]["start"] >= times[n]["end"] for n in needs), name
    # two workers: the long stage (longest chain first) runs while the short ones run one after the other
    assert times["short1"]["start"] < times["long"]["end"] and times["short2"]["start"] < times["long"]["end"]
    assert json.loads((tmp_path / "stages" / "after.done").read_text())["ran"] == "after"
    assert "all 5 stages done" in res.stdout and "[demo] running: long (step 1/1 of long)" in res.stdout
    assert (tmp_path / "logs" / "worker0.log").exists()
    res = _run_plan(tmp_path)                                       # resume: nothing left to run
    assert res.returncode == 0 and "5 of 5 stages already done" in res.stdout
    assert len(open(tmp_path / "times.jsonl").readlines()) == 5


def test_parallel_runner_stops_on_a_failed_stage_with_its_log(tmp_path):
    t0 = time.time()
    res = _run_plan(tmp_path, "fail")
    assert res.returncode != 0
    assert "stage short2 failed: failed short2: ValueError: planned failure in short2" in res.stderr
    assert "--- last lines of" in res.stderr and "Traceback" in res.stderr
    assert not (tmp_path / "stages" / "short2.done").exists() and not (tmp_path / "stages" / "after.done").exists()
    assert (tmp_path / "stages" / "prep.done").exists()
    assert time.time() - t0 < 60


def test_eta_scales_estimates_by_measured_speed(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(S.time, "time", lambda: now[0])
    a, b, c = S.Stage("a", list, 10), S.Stage("b", list, 10), S.Stage("c", list, 20)
    clock = S._Clock([a, b, c])
    assert clock.eta(workers=2) == 20.0                             # nothing measured yet: estimates / workers
    clock.start(a)
    now[0] = 20.0
    clock.finish(a)                                                 # took twice its estimate
    assert clock.eta(workers=1) == 60.0                             # 2 x (10 + 20)
    clock.start(b)
    now[0] = 25.0                                                   # b (expected 20 s at this speed) 5 s in
    assert clock.eta(workers=1) == 15.0 + 40.0
    assert clock.eta(workers=2) == 27.5
