#!/usr/bin/env python3
"""How much of a causal attention kernel's time the program order loses at the end of the grid, in a
simple model (the figures behind HEAVY_FIRST in kernels/flash_attention.py):

    python tools/causal_schedule.py [--batch-heads 128] [--sms 132]

The GPU starts programs in grid order on whichever slot frees first (an SM runs a few programs at once:
its "slots"). Under a causal mask a program's work is the number of tiles it visits: query block m of the
forward (and dq) kernel visits m + 1 key blocks; key block n of the dk/dv kernel visits the query blocks
from n on. With the blocks of one head after another, the heaviest blocks of the last heads start last and
finish alone; started heaviest first across all heads (longest processing time first), the programs left
at the end are the lightest. The model is greedy list scheduling with each slot an independent worker of
equal speed and one tile of fixed cost per program: a real SM runs a lone program faster than it runs one
of several, so the real loss is smaller than the model's. It ranks the orders; a GPU measures them
(benchmarks/attention_profile.py prints both).
"""

from __future__ import annotations

import argparse
import heapq


def makespan(works: list[float], slots: int) -> float:
    """Finish time of programs started in list order, each on the first slot that is free."""
    free = [0.0] * slots
    end = 0.0
    for w in works:
        start = heapq.heappop(free)
        heapq.heappush(free, start + w)
        end = max(end, start + w)
    return end


def efficiency(seq: int, block: int, batch_heads: int, slots: int, heavy_first: bool,
               last_is_heaviest: bool = True) -> float:
    """Ideal time / modelled time for one causal kernel with seq / block blocks per head, the k-th
    heaviest visiting seq / block - k tiles (plus one tile of fixed cost: loading, the epilogue); in
    grid order the last block of a head is the heaviest (forward, dq) or the first is (dk/dv)."""
    work = [i + 2.0 for i in range(seq // block)]  # block i: i + 1 tiles + 1 fixed
    if not last_is_heaviest:
        work.reverse()
    if heavy_first:
        order = [w for w in sorted(work, reverse=True) for _ in range(batch_heads)]
    else:
        order = [w for _ in range(batch_heads) for w in work]
    return sum(order) / slots / makespan(order, slots)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-heads", type=int, default=128, help="batch x heads (default: B8 x H16)")
    ap.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (H100 SXM, H200: 132)")
    args = ap.parse_args(argv)
    for block, per_sm, last, what in ((64, 4, True, "forward 64x64 tiles, 4 programs per SM"),
                                      (128, 2, False, "dk/dv 128-key blocks, 2 programs per SM")):
        for seq in (512, 1024, 2048, 4096):
            old = efficiency(seq, block, args.batch_heads, args.sms * per_sm, False, last)
            new = efficiency(seq, block, args.batch_heads, args.sms * per_sm, True, last)
            print(f"{what}, T={seq}: (blocks, heads) order {old:.0%} of ideal, heaviest first {new:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
