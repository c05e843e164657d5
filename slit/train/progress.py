"""A terminal progress bar with ETA (tqdm), quiet on non-zero processes."""

from __future__ import annotations

import tqdm


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm.tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, smoothing=0.1
        )
        self._last = initial

    def update(self, step: int) -> None:
        self.bar.update(step - self._last)
        self._last = step

    def set_postfix(self, **values: float) -> None:
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
