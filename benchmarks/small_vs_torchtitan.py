"""COOM against torchtitan's DeepSeek-V3 at the `small` shape, one GPU.

Runs, one after the other in this process's GPU:
  1. SDPA backends at MLA's head dims (qk 192, v 128), forward + backward;
  2. `coom bench small`, batch B x 4096: eager, compiled, and compiled
     without COOM's Triton kernels;
  3. torchtitan 0.2.2 (peer script, compiled), same batch;
and prints the tokens/s ratio. Each run writes its output under $OUT.

Run on the device machine from the repository root, with the peer script
copied into .peers/ and the wheels of ../shared/peers/README.md in .whl/:

    python3 benchmarks/small_vs_torchtitan.py --batch 4
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional
from torch.nn.attention import SDPBackend, sdpa_kernel

OUT = Path(os.environ.get("OUT", "bench-out"))
# COOM runs: eager or torch.compile per block, with COOM's Triton kernels
# or (reference) with the plain PyTorch layers.
MODES = ("eager", "compiled", "compiled-reference")


def time_sdpa(batch: int) -> None:
    warnings.filterwarnings("ignore", module="torch")
    shape = (batch, 12, 4096)
    q = torch.randn(*shape, 192, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn(*shape, 128, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                for _ in range(2):
                    functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True).sum().backward()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(5):
                    functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True).sum().backward()
                torch.cuda.synchronize()
            ms = (time.perf_counter() - started) / 5 * 1e3
            print(f"sdpa {backend.name:20s} fwd+bwd {ms:7.2f} ms")
        except RuntimeError as error:
            print(f"sdpa {backend.name:20s} unavailable: "
                  f"{str(error).splitlines()[0][:80]}")
    # The runs below are other processes: leave them the memory.
    del q, k, v
    torch.cuda.empty_cache()


def run(name: str, command: list[str], timeout: int) -> str:
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=timeout)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        output = f"{error.stdout or ''}{error.stderr or ''}\nTIMEOUT"
    (OUT / f"{name}.log").write_text(output)
    print(output[-1500:], flush=True)
    print(f"== {name} took {time.perf_counter() - started:.0f} s", flush=True)
    return output


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=240,
                        help="seconds each run may take")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="parts to skip: sdpa, peer, or a COOM "
                        "mode: " + ", ".join(MODES))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if "sdpa" not in args.skip:
        time_sdpa(args.batch)
    figures = {}
    for mode in MODES:
        if mode in args.skip:
            continue
        out = OUT / f"coom_{mode}.json"
        run(f"coom_{mode}", [
            sys.executable, "-m", "coom", "bench", "small", "--steps",
            str(args.steps), "--warmup", "3", "--out", str(out), "--set",
            f"train.micro_batch_size={args.batch}",
            f"train.global_batch_size={args.batch}",
            f"train.compile={mode.startswith('compiled')}",
            f"train.kernels={not mode.endswith('reference')}"],
            timeout=args.timeout)
        if out.exists():
            figures[mode] = json.loads(out.read_text())["tokens_per_s"]
    if "peer" not in args.skip:
        text = run("torchtitan", [sys.executable, ".peers/torchtitan_small.py",
                                  str(args.batch)], timeout=args.timeout)
        found = re.search(r"([\d,]+) tok/s", text)
        if found:
            figures["torchtitan"] = float(found.group(1).replace(",", ""))
    print(json.dumps(figures))
    if "torchtitan" in figures:
        for mode in MODES:
            if mode in figures:
                print(f"COOM {mode} / torchtitan compiled: "
                      f"{figures[mode] / figures['torchtitan']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
