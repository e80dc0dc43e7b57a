"""The developer tools whose figures the code and README quote."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import causal_schedule  # noqa: E402


def test_makespan_is_greedy_list_scheduling():
    # two slots: 3 and 3 start at 0; 1 goes where the first slot frees (3); 5 at 3 too -> ends at 8
    assert causal_schedule.makespan([3, 3, 1, 5], 2) == 8
    assert causal_schedule.makespan([5, 3, 3, 1], 2) == 6  # longest first
    assert causal_schedule.makespan([2.0] * 6, 3) == 4


def test_heaviest_first_schedule_figures():
    # the figures kernels/flash_attention.py quotes for B8 H16 on 132 SMs (4 forward programs per SM)
    eff = {seq: (causal_schedule.efficiency(seq, 64, 128, 528, False),
                 causal_schedule.efficiency(seq, 64, 128, 528, True)) for seq in (512, 1024, 2048)}
    assert [round(old, 2) for old, _ in eff.values()] == [0.63, 0.77, 0.86]
    assert all(0.97 <= round(new, 2) <= 1.0 for _, new in eff.values())
