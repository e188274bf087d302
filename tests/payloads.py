"""A planted pickle for the tests of safe loading: unpickled without ``weights_only`` it runs a
shell command that creates a marker file, so a test can assert that it never ran."""

from __future__ import annotations

import os

import torch


class Payload:
    """A pickle that runs ``touch <marker>`` when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: str, marker: str) -> None:
    """Overwrite ``path`` with a torch file that looks like a state dict and holds the payload."""
    torch.save({"module": {"w": torch.zeros(2)}, "x": Payload(marker)}, path)
