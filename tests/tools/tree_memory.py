"""Wall time and peak memory of a command and every process it starts, taken together.

    python tests/tools/tree_memory.py -- .venv/bin/xray-edge export --model M --out /tmp/x

`/usr/bin/time -v` reports the largest single process's peak (ru_maxrss), which understates a
command that runs two processes at once, as `export` does when it quantizes int8 aside. This
samples every 0.1 s (`--interval`) the proportional set size (PSS, from /proc/PID/smaps_rollup) of the command
and all its descendants and prints the largest sum seen: the physical memory the command held,
with shared library pages counted once across processes. Linux only. Sampling can miss a peak
shorter than the interval, so the figure is a floor; RSS sums (which count shared pages twice,
an upper bound) are printed beside it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB, zeros for a process that just ended."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between samples (reading smaps costs CPU)")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_pss = peak_rss = most = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        sizes = [_kib(p) for p in pids]
        peak_pss = max(peak_pss, sum(s[0] for s in sizes))
        peak_rss = max(peak_rss, sum(s[1] for s in sizes))
        most = max(most, len(pids))
        time.sleep(args.interval)
    wall = time.perf_counter() - start
    print(f"tree_memory: exit {proc.returncode}, wall {wall:.1f} s, peak PSS of the process tree "
          f"{peak_pss / 2**20:.2f} GiB (RSS sum {peak_rss / 2**20:.2f} GiB), up to {most} processes",
          file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
