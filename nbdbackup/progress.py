"""The do-nothing progress bar, shared by the layers that report progress.

Library code takes an optional `progress(total, desc[, unit])` factory (the CLI
passes one that makes tqdm bars); without one it updates a NoBar.
"""

from __future__ import annotations


class NoBar:
    """Quacks like the part of tqdm we use, and does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
