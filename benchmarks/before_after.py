"""``coom bench`` of earlier trees and of this one, in turns, in one
call: what a before/after comparison of a change records.

Each earlier tree is a copy of its ``coom`` package, e.g.

    mkdir -p .old/base && git archive COMMIT coom | tar -x -C .old/base

Run on the device machine from the repository root (the bench arguments
follow ``--``):

    python3 benchmarks/before_after.py .old/base --rounds 2 -- small \\
        --steps 8 --warmup 3 --set train.micro_batch_size=4 \\
        train.global_batch_size=4 train.compile=true

Several earlier trees (``.old/a .old/b``) compare two changes at once.
Each bench runs in its own tree's folder, so give absolute paths in its
arguments. Each round runs the trees in the order given, then this one,
each in its own process, and prints tokens/s, the median step time and
peak memory; the last lines give each later tree's tokens/s over the
first's, round by round.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(tree: Path, arguments: list[str]) -> dict:
    """The figures of ``coom bench ARGUMENTS`` with tree's coom.

    The bench runs in tree: ``python -m`` puts the working directory
    ahead of PYTHONPATH, so run from the repository root, every tree's
    run would import the repository's coom (as this script's runs did
    before 2026-12-07). It checks which coom it imported."""
    tree = tree.resolve()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        path = os.pathsep.join(filter(None, [str(tree),
                                             os.environ.get("PYTHONPATH")]))
        environment = os.environ | {"PYTHONPATH": path}
        imported = subprocess.run(
            [sys.executable, "-c", "import coom; print(coom.__file__)"],
            cwd=tree, env=environment, check=True, capture_output=True,
            text=True).stdout.strip()
        if not Path(imported).is_relative_to(tree):
            raise SystemExit(f"{tree}'s run imported {imported}")
        subprocess.run([sys.executable, "-m", "coom", "bench", *arguments,
                        "--out", str(out)], check=True, cwd=tree,
                       env=environment)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s BEFORE [BEFORE ...] [--rounds N] -- BENCH "
              "ARGUMENTS")
    parser.add_argument("before", type=Path, nargs="+",
                        help="folders holding earlier coom packages")
    parser.add_argument("--rounds", type=int, default=2)
    ours = sys.argv[1:]
    arguments = []
    if "--" in ours:
        split = ours.index("--")
        ours, arguments = ours[:split], ours[split + 1:]
    args = parser.parse_args(ours)
    for tree in args.before:
        if not (tree / "coom").is_dir():
            parser.error(f"{tree} holds no coom package")
    if len(set(args.before)) < len(args.before):
        parser.error("a tree is named twice")
    trees = [*args.before, Path(".")]
    names = [str(tree) for tree in args.before] + ["this tree"]
    speeds = {name: [] for name in names}
    for round_ in range(1, args.rounds + 1):
        for name, tree in zip(names, trees):
            result = bench(tree, arguments)
            speeds[name].append(result["tokens_per_s"])
            print(f"round {round_} {name}: "
                  f"{result['tokens_per_s']:,.0f} tokens/s, step "
                  f"{result['step_seconds_median'] * 1e3:.1f} ms, peak "
                  f"{result.get('peak_memory_gib', 0):.1f} GiB",
                  flush=True)
    first = speeds[names[0]]
    for name in names[1:]:
        print(f"{name} / {names[0]} tokens/s: " + ", ".join(
            f"{later / base:.3f}x"
            for later, base in zip(speeds[name], first)))


if __name__ == "__main__":
    main()
