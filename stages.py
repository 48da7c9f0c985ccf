"""stages.py -- a resumable runner for a study made of stages (`retu.py demo`), sequential or on worker processes.

A stage is a `retu.py` command or an in-process function. A finished stage leaves `DIR/stages/<name>.done` (JSON:
seconds taken, finish time, its commands, the function's notes) and is skipped when the study runs again, so an
interrupted study resumes where it stopped; the marker is written atomically after the stage's work.

`StageRunner.run` runs stages one after the other in list order. `StageRunner.run_parallel` runs them on W worker
processes, each a long-lived `retu.py demo --worker` that runs the stages named on its stdin in-process (so the
interpreter and torch start once per worker, not once per command) and answers one line per stage on its stdout.
The parent dispatches a stage once every stage in its `needs` has finished, longest remaining chain first, and
shows progress (stages done, what runs, the last training line of each, ETA). The toy model's matrices are too
small to gain from a second thread in one process, so two one-thread workers use the 2-core machine twice as well.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Stage:
    name: str                                      # unique; also the marker file's name
    # a command, or an in-process function returning None or a dict of notes for the marker; a "commands" entry
    # (a list of commands) is run by the runner afterwards, which is how a stage decides its commands at run time
    run: Callable[[], dict | None] | list[str]
    est_s: float = 1.0                             # expected seconds, for the ETA and the dispatch order
    needs: tuple[str, ...] = ()                    # stages that must have finished before this one starts


def fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def check_plan(stages: list[Stage]) -> None:
    """Names unique, and a stage's needs that are in the plan come before it (so list order is a valid sequential
    order). A need outside the plan counts as met: running part of a study by hand is allowed."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {sorted({n for n in names if names.count(n) > 1})} repeated")
    seen: set[str] = set()
    for s in stages:
        later = [n for n in s.needs if n in names and n not in seen]
        if later:
            raise ValueError(f"stage {s.name!r} needs {later}, which come after it")
        seen.add(s.name)


def chain_lengths(stages: list[Stage]) -> dict[str, float]:
    """Estimated seconds from a stage's start to the end of the longest chain of stages that need it (itself
    included): the parallel runner starts the stage with the longest chain first (critical path scheduling)."""
    dependents: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for n in s.needs:
            dependents.get(n, []).append(s.name)
    est = {s.name: s.est_s for s in stages}
    length: dict[str, float] = {}
    for s in reversed(stages):                     # dependents come later in a checked plan
        length[s.name] = est[s.name] + max((length[d] for d in dependents[s.name]), default=0.0)
    return length


class StageRunner:
    """Runs stages and keeps their markers in `DIR/stages/`. `execute(cmd) -> exit code` runs one command; the
    default is a subprocess, and a caller that is itself the driver runs `retu.py` commands in-process instead."""

    def __init__(self, out_dir: str | os.PathLike, log: Callable[[str], None] = lambda s: print(s, flush=True),
                 execute: Callable[[list[str]], int] | None = None):
        self.out_dir = Path(out_dir)
        self.marker_dir = self.out_dir / "stages"
        self.log = log
        self.execute = execute or (lambda cmd: subprocess.run(cmd).returncode)

    def marker(self, stage: Stage) -> Path:
        return self.marker_dir / f"{stage.name}.done"

    def is_done(self, stage: Stage) -> bool:
        return self.marker(stage).exists()

    def run_stage(self, stage: Stage) -> None:
        """Run one stage (its function, then its commands) and write its marker; raise if a command fails."""
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        info = dict((stage.run() or {}) if callable(stage.run) else {"commands": [stage.run]})
        for cmd in info.get("commands", []):
            cmd = [str(c) for c in cmd]
            code = self.execute(cmd)
            if code != 0:
                raise RuntimeError(f"stage {stage.name} failed (exit {code}): {' '.join(cmd)}")
        info["commands"] = [" ".join(map(str, c)) for c in info.get("commands", [])]
        record = {"stage": stage.name, "seconds": round(time.time() - t0, 3), "finished": time.time(), **info}
        tmp = self.marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.marker(stage))        # the marker appears only once the stage has finished

    def _todo(self, stages: list[Stage]) -> list[Stage]:
        check_plan(stages)
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        todo = [s for s in stages if not self.is_done(s)]
        if len(todo) < len(stages):
            self.log(f"[demo] {len(stages) - len(todo)} of {len(stages)} stages already done, skipped")
        return todo

    def run(self, stages: list[Stage]) -> None:
        """All stages not done yet, one after the other in list order."""
        todo = self._todo(stages)
        clock = _Clock(todo)
        t_start = time.time()
        for k, stage in enumerate(todo):
            elapsed = time.time() - t_start
            eta = clock.eta(workers=1)
            self.log(f"[demo] stage {len(stages) - len(todo) + k + 1}/{len(stages)} {stage.name} "
                     f"| elapsed {fmt_s(elapsed)} | ETA {fmt_s(eta)}")
            clock.start(stage)
            self.run_stage(stage)
            clock.finish(stage)
        self.log(f"[demo] all {len(stages)} stages done in {fmt_s(time.time() - t_start)}")

    def run_parallel(self, stages: list[Stage], worker_cmd: list[str], workers: int,
                     heartbeat_s: float = 30.0) -> None:
        """All stages not done yet on `workers` processes started with `worker_cmd` (which must call `serve` on the
        same plan). Their output goes to DIR/logs/worker{i}.log. A failed stage stops the study with its log tail."""
        todo = self._todo(stages)
        if not todo:
            return
        done = {s.name for s in stages if self.is_done(s)}
        done |= {n for s in stages for n in s.needs} - {s.name for s in stages}     # outside the plan: met
        chain = chain_lengths(stages)
        log_dir = self.out_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        procs, logs = [], []
        sel = selectors.DefaultSelector()
        for i in range(min(workers, len(todo))):
            logs.append(log_dir / f"worker{i}.log")
            with open(logs[i], "ab") as log_file:  # the child keeps its own handle
                p = subprocess.Popen(worker_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                     text=True, bufsize=1)
            procs.append(p)
            sel.register(p.stdout, selectors.EVENT_READ, i)
        running: dict[int, Stage] = {}
        waiting = list(todo)
        clock = _Clock(todo)
        t_start = last_beat = time.time()
        try:
            while waiting or running:
                for i in range(len(procs)):        # dispatch: an idle worker takes the ready stage of longest chain
                    ready = [s for s in waiting if all(n in done for n in s.needs)]
                    if i in running or not ready:
                        continue
                    stage = max(ready, key=lambda s: chain[s.name])
                    waiting.remove(stage)
                    running[i] = stage
                    clock.start(stage)
                    procs[i].stdin.write(stage.name + "\n")
                    procs[i].stdin.flush()
                    self.log(f"[demo] start {stage.name} (worker {i}) | {len(done)}/{len(stages)} done "
                             f"| elapsed {fmt_s(time.time() - t_start)} "
                             f"| ETA {fmt_s(clock.eta(len(procs)))}")
                if not running:
                    raise RuntimeError(f"stages {[s.name for s in waiting]} wait for stages that never finish")
                for key, _ in sel.select(timeout=min(5.0, heartbeat_s)):
                    i = key.data
                    line = procs[i].stdout.readline()
                    stage = running.pop(i)
                    if not line.startswith(f"ok {stage.name}"):
                        why = line.strip() or f"worker {i} exited with code {procs[i].wait()}"
                        raise RuntimeError(f"stage {stage.name} failed: {why}\n--- last lines of {logs[i]}:\n"
                                           + _tail(logs[i], 20))
                    done.add(stage.name)
                    clock.finish(stage)
                    self.log(f"[demo] done  {stage.name} | {len(done)}/{len(stages)} done "
                             f"| elapsed {fmt_s(time.time() - t_start)}")
                if time.time() - last_beat >= heartbeat_s and running:
                    last_beat = time.time()
                    self.log("[demo] running: " + "; ".join(
                        f"{s.name} {_last_progress(logs[i])}".rstrip() for i, s in sorted(running.items())))
        finally:
            for p in procs:
                if running:                        # stopping on an error: do not wait for the other stages
                    p.kill()
                else:
                    p.stdin.close()                # end of input: the worker exits
                p.wait()
                p.stdout.close()
        self.log(f"[demo] all {len(stages)} stages done in {fmt_s(time.time() - t_start)} on {len(procs)} workers")


def serve(runner: StageRunner, stages: list[Stage]) -> None:
    """The worker side of `run_parallel`: for each stage name read from stdin, run that stage and answer
    `ok NAME` or `failed NAME: why` on the original stdout; everything the stages print goes to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)                                  # the stages' prints go to the worker's log, not the reply pipe
    by_name = {s.name: s for s in stages}
    for line in sys.stdin:
        name = line.strip()
        try:
            runner.run_stage(by_name[name])
        except Exception as e:                     # reported to the parent, which stops the study with it
            traceback.print_exc()
            sys.stderr.flush()
            reply.write(f"failed {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n")
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        reply.write(f"ok {name}\n")


class _Clock:
    """Time left: the estimates of the stages not finished, scaled by how long the finished stages took against
    their estimates (once they are a tenth of the work: the first, tiny stages say nothing about the speed of
    training), less what the running stages have done already, spread over the workers."""

    def __init__(self, todo: list[Stage]):
        self.left_est = sum(s.est_s for s in todo)
        self.est_done = self.took = 0.0
        self.started: dict[str, float] = {}
        self.est = {s.name: s.est_s for s in todo}

    def start(self, stage: Stage) -> None:
        self.started[stage.name] = time.time()

    def finish(self, stage: Stage) -> None:
        self.took += time.time() - self.started.pop(stage.name)
        self.est_done += stage.est_s
        self.left_est -= stage.est_s

    def eta(self, workers: int) -> float:
        scale = self.took / self.est_done if self.est_done >= 0.1 * (self.left_est + self.est_done) else 1.0
        now = time.time()
        running = sum(max(0.0, scale * self.est[n] - (now - t0)) for n, t0 in self.started.items())
        waiting = scale * (self.left_est - sum(self.est[n] for n in self.started))
        return (waiting + running) / workers


def _tail(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])


def _last_progress(path: Path) -> str:
    """The last training progress line ("step 1200/2000 ...") in a worker's log, shortened; '' if none."""
    for line in reversed(_tail(path, 40).splitlines()):
        if line.startswith("step "):
            return "(" + line[:72] + ")"
    return ""
