"""Simulated users replaying real query streams against live orchestrators.

Modules: :mod:`.queries` (query sources built from ``shared/data/music``), :mod:`.users`
(click models), :mod:`.policies` (the compared selection policies, epsilon-greedy, the
oracle), :mod:`.metrics`, :mod:`.ope` (IPS / SNIPS / DR), :mod:`.runner` (the loop) and
:mod:`.report` (JSON + PNG plots). ``ltrr simulate`` and ``ltrr evaluate ope`` drive them.
"""

from __future__ import annotations

__all__: list[str] = []
