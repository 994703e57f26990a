"""What every benchmark prints about the machine it ran on (imported by the scripts in bench/)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line: CPU model, usable and online cores, and the load average when the line is made."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return f"{cpu_model()}, {usable} cores usable ({os.cpu_count()} online), load average {load}"


def say(**fields) -> None:
    """Worker side: one ``@@{json}`` line to the parent (:func:`reply` reads it)."""
    import json

    print("@@" + json.dumps(fields), flush=True)


def serve_rounds(run_round, steps: int, batch: int) -> None:
    """Worker side: answer each ``run`` line on stdin with the images/s of ``run_round(steps)``
    (which must return only once its steps are done), until stdin closes."""
    import sys
    import time

    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        run_round(steps)
        say(img_s=steps * batch / (time.perf_counter() - t))


def reply(proc) -> dict | None:
    """The next ``@@{json}`` line of a worker process (libraries print other lines to stdout)."""
    import json

    for line in proc.stdout:
        if line.startswith("@@"):
            return json.loads(line[2:])
    return None


def interleaved_rounds(variants: list[str], command, env, rounds: int, cwd: str | None = None, on_reply=None):
    """Start one worker process per variant, one after another, then run ``rounds`` interleaved rounds.

    ``command(v)`` and ``env(v)`` give a variant's argv and environment. A worker prints
    ``@@{"ready": ..., ...}`` once it has taken its first step (started one at a time, so that its
    time to the first step is measured on an otherwise idle machine), then answers each ``run`` line
    on its stdin with ``@@{"img_s": ...}``; the order of the variants rotates from round to round.
    Returns ({variant: ready reply}, {variant: [img/s per round]}); ``on_reply(variant, reply)``, when
    given, also sees each round's whole reply.
    """
    import subprocess

    procs, ready = {}, {}
    try:
        for v in variants:
            p = subprocess.Popen(command(v), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env(v), cwd=cwd)
            procs[v] = p
            ready[v] = reply(p)
            if ready[v] is None:
                raise SystemExit(f"variant {v} failed to start (exit {p.wait()})")
            print(f"  {v}: first step after {ready[v]['first_step_s']:.1f} s", flush=True)
        speeds = {v: [] for v in variants}
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                procs[v].stdin.write("run\n")
                procs[v].stdin.flush()
                answer = reply(procs[v])
                if answer is None:
                    raise SystemExit(f"variant {v} stopped in round {r + 1} (exit {procs[v].wait()})")
                speeds[v].append(answer["img_s"])
                if on_reply:
                    on_reply(v, answer)
    finally:
        for p in procs.values():
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    return ready, speeds
