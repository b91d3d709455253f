"""Named scalars reported from anywhere in a step, averaged over steps and ranks in one place."""

from __future__ import annotations

import torch


class StatsCollector:
    """Sums and counts on the device (no host sync per report); `reduce` all-reduces once per log."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._counts[name] = self._counts.get(name, 0) + 1

    def add_dict(self, stats: dict[str, torch.Tensor | float], prefix: str = "") -> None:
        for name, value in stats.items():
            self.add(prefix + name, value)

    def state(self) -> dict:
        """This rank's sums and counts since the last log (float32 values are exact as JSON floats)."""
        return {"sums": {n: float(v.item()) for n, v in self._sums.items()}, "counts": dict(self._counts)}

    def load_state(self, state: dict) -> None:
        """Go on from `state`: the next log row then averages the same steps as an uninterrupted run's."""
        self._sums = {n: torch.tensor(v, dtype=torch.float32) for n, v in state["sums"].items()}
        self._counts = {n: int(c) for n, c in state["counts"].items()}

    def reduce(self, accelerator) -> dict[str, float]:
        """Mean of each stat over its reports on all ranks; resets. Every rank must call it."""
        names = sorted(self._sums)
        if not names:
            return {}
        device = accelerator.device
        sums = torch.stack([self._sums[n].to(device) for n in names])
        counts = torch.tensor([float(self._counts[n]) for n in names], device=device)
        totals = accelerator.reduce(torch.cat([sums, counts]), reduction="sum")
        self._sums.clear()
        self._counts.clear()
        sums, counts = totals[: len(names)], totals[len(names) :]
        return {n: (sums[i] / counts[i]).item() for i, n in enumerate(names) if counts[i] > 0}
