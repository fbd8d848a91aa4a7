"""Peak memory and time of one forward + backward of the contrastive losses: the dense kinds (clip,
siglip) against the memory-efficient ones (clip_blockwise, siglip_chunked), one process with large
simulated batches, and 2 gloo ranks under torchrun (global batch split, negatives gathered,
local_loss). Each measurement runs in a fresh process; peak memory is the process's peak RSS above
what it held before the loss (ru_maxrss), so it counts the logits and everything autograd keeps.

    python benchmarks/loss_memory.py                       # B = 4096, 8192, 16384; E = 512; block 4096
    python benchmarks/loss_memory.py --batches 32768 --kinds clip_blockwise siglip_chunked

Run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from logs import header

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"clip": "clip_blockwise", "siglip": "siglip_chunked"}


def child(kind: str, batch: int, dim: int, block: int) -> dict:
    """One measurement in this process (under torchrun when WORLD_SIZE is set)."""
    import torch
    import torch.nn.functional as F

    from mmpretrain.losses import LOSSES, DistContext

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    torch.set_num_threads(max(1, 2 // world))
    g = torch.Generator().manual_seed(rank)
    local = batch // world
    a = F.normalize(torch.randn(local, dim, generator=g), dim=1).requires_grad_()
    b = F.normalize(torch.randn(local, dim, generator=g), dim=1).requires_grad_()
    ctx = DistContext(rank, world, True, world > 1, block)
    bias = torch.tensor(-10.0, requires_grad=True) if "siglip" in kind else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = LOSSES.get(kind).builder(a, b, torch.tensor(10.0, requires_grad=True), bias, ctx)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"kind": kind, "batch": batch, "world": world, "rank": rank, "peak_mib": peak / 1024, "seconds": seconds}


def measure(kind: str, batch: int, world: int, dim: int, block: int) -> dict:
    args = ["--child", kind, str(batch), str(dim), str(block)]
    if world == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(world), __file__, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        cause = next((x for x in reversed(lines) if "Error" in x), lines[-1])
        return {"kind": kind, "batch": batch, "world": world, "error": cause.strip()}
    return {**rows[0], "peak_mib": max(r["peak_mib"] for r in rows), "seconds": max(r["seconds"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--kinds", nargs="+", default=["clip", "clip_blockwise", "siglip", "siglip_chunked"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--block", type=int, default=4096)
    args = p.parse_args()
    if not args.child:
        print(header(), flush=True)
    if args.child:
        kind, batch, dim, block = args.child
        print(json.dumps(child(kind, int(batch), int(dim), int(block))), flush=True)
        return
    print(f"one forward + backward, E = {args.dim}, block {args.block}; peak RSS above the start, per rank")
    print(f"{'kind':<16} {'global B':>9} {'ranks':>5} {'peak MiB':>9} {'seconds':>8}  vs dense")
    results = []
    for world in args.worlds:
        for batch in args.batches:
            done = {}
            for kind in args.kinds:
                r = measure(kind, batch, world, args.dim, args.block)
                results.append(r)
                done[kind] = r
                dense = next((done.get(d) for d, e in PAIRS.items() if e == kind), None)
                ok = dense and "error" not in r and "error" not in dense
                x = dense["peak_mib"] / r["peak_mib"] if ok else 0.0
                ratio = "" if not ok else f"{x:.1f}x less memory" if x >= 1 else f"{1 / x:.1f}x more memory"
                if "error" in r:
                    print(f"{kind:<16} {batch:>9} {world:>5}  failed: {r['error']}")
                else:
                    print(f"{kind:<16} {batch:>9} {world:>5} {r['peak_mib']:>9.0f} {r['seconds']:>8.2f}  {ratio}")
    out = ROOT / "runs" / "loss_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
