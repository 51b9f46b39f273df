"""Shared plumbing of the printed benchmarks: each measurement runs in a child process of the same script
(so RSS is per framework and one framework's threads never linger in the other's timings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def rss_now() -> float:
    """This process's resident set size now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args, timeout: float, environ=None) -> dict:
    """Run ``python script *args`` (in ``environ``, default this process's environment); return the last
    JSON line it printed, or exit with its stderr tail."""
    cmd = [sys.executable, os.path.abspath(script), *args]
    env = dict(os.environ if environ is None else environ, TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"child {' '.join(args[:2])} failed with exit code {p.returncode}")
    last = [line for line in p.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)


def ms(s: float) -> str:
    return f"{1000 * s:.0f} ms" if s < 10 else f"{s:.1f} s"
