"""Run every test id alone, each in a fresh pytest process, and list those that fail.

    python tests/run_each_alone.py                       # the whole suite (slow: see below)
    python tests/run_each_alone.py tests/test_store.py -k verify --jobs 2

Not part of CI (it is not named test_*.py): a test that passes in its file but fails alone
relies on another test's side effects. Each id pays the interpreter start (~5 s here) and
rebuilds its module's fixtures, so a whole-suite run on 2 cores takes most of an hour.
Exit status 1 when any id fails.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def collect(args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=REPO, capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def run_one(test_id: str, timeout: float) -> tuple[str, int, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id], cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
        return test_id, p.returncode, (p.stdout + p.stderr)[-3000:], time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return test_id, -1, f"timed out after {timeout:.0f} s", time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pytest_args", nargs="*", help="files or -k filters passed to the collection")
    ap.add_argument("--jobs", type=int, default=1, help="test processes at a time")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test id")
    a, extra = ap.parse_known_args(argv)
    ids = collect(a.pytest_args + extra)
    print(f"{len(ids)} test ids", flush=True)
    t0 = time.perf_counter()
    failed = []
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        for test_id, rc, tail, seconds in pool.map(lambda t: run_one(t, a.timeout), ids):
            status = "ok" if rc in (0, 5) else "FAILED"  # 5: the id was deselected/skipped entirely
            print(f"{status:6s} {seconds:6.1f}s {test_id}", flush=True)
            if status != "ok":
                failed.append((test_id, tail))
    print(f"\n{len(ids) - len(failed)} of {len(ids)} passed alone in {time.perf_counter() - t0:.0f} s")
    for test_id, tail in failed:
        print(f"\n=== {test_id}\n{tail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
