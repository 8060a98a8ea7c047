"""Run every test alone, each in a fresh pytest process, to prove that no test depends on
another having run first (module- and session-scoped fixtures, files left in a shared tmp
folder, global state, seeds).

Not collected by pytest (the name does not match test_*.py) and not run in CI: run it by hand
after changing fixtures or adding tests::

    .venv/bin/python tests/run_each_alone.py                       # the whole suite, one at a time
    .venv/bin/python tests/run_each_alone.py --jobs 2              # two processes at once
    .venv/bin/python tests/run_each_alone.py tests/test_store.py   # some files or node ids only
    .venv/bin/python tests/run_each_alone.py -k "resume or cli"    # a -k expression
    .venv/bin/python tests/run_each_alone.py --ids-file failed.txt # rerun a list of ids

It collects the ids with ``pytest --collect-only -q``, then runs each one as
``pytest -q -p no:cacheprovider <id>`` with a per-test timeout, prints one line per test as it
finishes, and at the end the ids that failed (or timed out, or were not found) with the tail of
their output. Exit status 1 if any failed or a file could not be collected, 0 otherwise.

Cost: every test pays the interpreter start, the imports (torch, triton, transformers) and
every fixture it uses, so tests that share a heavy module fixture (tests/test_main_job.py's
smoke run, the teacher stores of tests/test_align_assemble.py) rebuild it once per test.
A full run of the suite (355 tests) took 41 min wall with --jobs 2 on the 2-core CPU machine
without CUDA (Triton interpreter) where it was written; expect about twice that with --jobs 1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    node_id: str
    status: str  # passed | failed | timeout | not found
    seconds: float
    output: str


def _pytest(python: str) -> list[str]:
    return [python, "-m", "pytest"]


def collect(python: str, targets: list[str], keyword: str | None) -> tuple[list[str], int, str]:
    """The node ids pytest would run, the collection's exit status and its output."""
    cmd = _pytest(python) + ["--collect-only", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    if keyword:
        cmd += ["-k", keyword]
    proc = subprocess.run(cmd + targets, cwd=ROOT, capture_output=True, text=True)
    ids = [line.strip() for line in proc.stdout.splitlines()
           if "::" in line and not line.startswith((" ", "\t")) and not line.startswith(("ERROR", "FAILED"))]
    return ids, proc.returncode, proc.stdout + proc.stderr


def run_one(python: str, node_id: str, timeout: float, extra: list[str]) -> Result:
    cmd = _pytest(python) + ["-q", "-p", "no:cacheprovider", *extra, node_id]
    start = time.monotonic()
    # a new session, so that a timeout kills the test's own children too
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = {0: "passed", 5: "not found"}.get(proc.returncode, "failed")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        status = "timeout"
        out += f"\n[run_each_alone: killed after {timeout:.0f} s]"
    return Result(node_id, status, time.monotonic() - start, out)


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help="test files, folders or node ids (default: the configured testpaths)")
    ap.add_argument("-k", dest="keyword", help="only the tests matching this pytest -k expression")
    ap.add_argument("--ids-file", type=Path, help="run the node ids listed in this file (one a line) instead of collecting")
    ap.add_argument("--jobs", "-j", type=int, default=1, help="pytest processes at once (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one test may take (default 900)")
    ap.add_argument("--tail", type=int, default=30, help="lines of each failure's output to print (default 30)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest (default: this one)")
    ap.add_argument("--failed-file", type=Path, help="write the failed ids here, one a line (for --ids-file)")
    ap.add_argument("--pytest-arg", action="append", default=[], help="an extra argument for every test's pytest (repeatable)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")

    t0 = time.monotonic()
    collect_failed = False
    if args.ids_file:
        ids = [s.strip() for s in args.ids_file.read_text().splitlines() if s.strip() and not s.startswith("#")]
    else:
        ids, rc, text = collect(args.python, args.targets, args.keyword)
        if rc not in (0, 5):
            collect_failed = True
            print(f"collection exited {rc}:\n{tail(text, args.tail)}\n", flush=True)
    if not ids:
        print("no tests collected", flush=True)
        return 1
    print(f"{len(ids)} tests, each alone, {args.jobs} at a time (timeout {args.timeout:.0f} s)", flush=True)

    results: list[Result] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args.python, i, args.timeout, args.pytest_arg) for i in ids]
        for fut in as_completed(futures):  # on this thread only: the workers just run pytest
            r = fut.result()
            results.append(r)
            mark = "ok  " if r.status == "passed" else r.status.upper()
            print(f"[{len(results):>{len(str(len(ids)))}}/{len(ids)}] {mark} {r.seconds:6.1f}s  {r.node_id}", flush=True)

    wall = time.monotonic() - t0
    order: dict[str, int] = {}
    for i, node_id in enumerate(ids):
        order.setdefault(node_id, i)  # a repeated id (--ids-file) sorts where it first appears
    bad = sorted((r for r in results if r.status != "passed"), key=lambda r: order[r.node_id])
    print("\n" + "=" * 78)
    for r in bad:
        print(f"--- {r.status}: {r.node_id} ({r.seconds:.1f} s)\n{tail(r.output, args.tail)}\n")
    slowest = sorted(results, key=lambda r: -r.seconds)[:5]
    print("slowest: " + ", ".join(f"{r.node_id} {r.seconds:.0f}s" for r in slowest))
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed alone"
          f"{' (and collection errors)' if collect_failed else ''}; wall {wall / 60:.1f} min")
    if bad:
        print("failed alone:\n" + "\n".join(f"  {r.node_id}" for r in bad))
    if args.failed_file:
        args.failed_file.write_text("".join(r.node_id + "\n" for r in bad))
    return 1 if bad or collect_failed else 0


if __name__ == "__main__":
    sys.exit(main())
