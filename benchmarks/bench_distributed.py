"""Time per ResAlign outer step with 1 process and with N ``torchrun`` processes (J simulations split).

Usage::

    python benchmarks/bench_distributed.py [--nproc 2] [-J 4] [--outer-steps 4] [--rounds 1]
                                           [--model DIR] [--set KEY=VALUE ...]

Each round runs ``resalign run`` (the toy preset, J = 4, one thread per process) once in one process
and once under ``torchrun --nproc-per-node N`` with the same seed, so both compute the same sampled
configurations. The time of an outer step is the ``time_s`` that rank 0 records in ``metrics.jsonl``
(the whole step, the collectives included); the first step of each run is a warm-up and is not
counted, nor is data generation or start-up. Prints the median step time of each mode and their ratio
(1-process time / N-process time), and the ratio of the total time of the timed steps (both modes
compute the same steps, so this is the speed-up of the whole run once it has started). ``--set`` items go to both runs (e.g. ``pool.steps=[5]`` for a
quick check).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_times(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["time_s"] for r in rows[1:]]


def run(nproc: int, out: Path, args: argparse.Namespace) -> list[float]:
    flags = ["run", "--out", str(out), "--no-progress", "--threads", "1", "-J", str(args.J),
             "--outer-steps", str(args.outer_steps), "--seed", str(args.seed)]
    if args.model:
        flags += ["--model", args.model]
    for item in args.set or []:
        flags += ["--set", item]
    launcher = [sys.executable, "-m", "resalign"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "resalign"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*launcher, *flags], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{nproc}-process run failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return step_times(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("-J", type=int, default=4)
    ap.add_argument("--outer-steps", type=int, default=4, help="per run, the first one a warm-up")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a model folder (default: the shipped toy model)")
    ap.add_argument("--set", action="append", help="a RunConfig setting KEY=VALUE for both runs (repeatable)")
    args = ap.parse_args()
    if args.outer_steps < 2:
        ap.error("--outer-steps must be >= 2 (the first step is a warm-up)")

    times: dict[int, list[float]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for k in range(args.rounds):
            for nproc in times:
                times[nproc] += run(nproc, Path(tmp) / f"round{k}-np{nproc}", args)
    one, many = statistics.median(times[1]), statistics.median(times[args.nproc])
    print(f"J = {args.J}, {len(times[1])} timed outer steps per mode, 1 thread per process")
    print(f"1 process:    {one:8.2f} s per outer step (median)")
    print(f"{args.nproc} processes:  {many:8.2f} s per outer step (median)")
    print(f"speed-up:     {one / many:8.2f}x (medians)")
    print(f"total:        {sum(times[1]):8.1f} s against {sum(times[args.nproc]):.1f} s of timed steps, "
          f"{sum(times[1]) / sum(times[args.nproc]):.2f}x")
    print("per step (1 process / N processes, s):",
          " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(times[1], times[args.nproc])))


if __name__ == "__main__":
    main()
