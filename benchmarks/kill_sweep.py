"""The long sweep of the kill -9 suite (``tests/train/test_kills.py``):
TRIALS random trials of up to three kills each, plus the kills during
checkpoint writes, then the count of kills and of trials that lost a
completed checkpoint or diverged after resuming. Runs on a CPU, from the
repository root:

    python3 benchmarks/kill_sweep.py --trials 25
"""
import argparse
import os
import re
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=25)
    args = parser.parse_args()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
         "tests/train/test_kills.py"], capture_output=True, text=True,
        env=os.environ | {"COOM_KILL_TRIALS": str(args.trials)})
    kills = len(re.findall(r"^killed; ", result.stdout, re.MULTILINE))
    summary = result.stdout.strip().splitlines()[-1]
    failed = re.search(r"(\d+) failed", summary)
    print(f"{kills} kills in {args.trials} random trials and the "
          f"checkpoint-write case; pytest: {summary}")
    print(f"trials that lost a checkpoint or diverged: "
          f"{failed[1] if failed else 0}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
