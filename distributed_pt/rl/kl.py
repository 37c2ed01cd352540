"""KL coefficient controllers (the per-token estimators are in `losses.kl`)."""

from __future__ import annotations

import math


class FixedKLController:
    def __init__(self, coef: float) -> None:
        self.value = coef

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: nudge beta so the observed KL tracks `target` (proportional error clipped to ±0.2)."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        if not math.isfinite(self.value):
            raise ValueError(f"adaptive KL coefficient became {self.value} (observed KL {kl})")
