"""A backbone whose process dies (as on a GPU fault or an OOM kill) the first time it runs.

Built with ``--model tests.faulty_backbone:create --weights MARKER``: the first process to run it creates
the file MARKER and exits at once; every later run (a restarted actor) works normally.
"""

import os
from pathlib import Path

from tests.custom_backbone import TinyConvViT


class DiesOnceViT(TinyConvViT):
    def __init__(self, marker: str | None):
        super().__init__()
        self.marker = Path(marker) if marker else None

    def patch_features(self, x):
        if self.marker is not None and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().patch_features(x)


def create(weights=None) -> DiesOnceViT:
    return DiesOnceViT(weights)  # without a marker (weights none) it never dies
