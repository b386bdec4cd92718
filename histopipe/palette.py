"""The tissue-type colours, shared by maps, overlays, montages and evaluation figures.

Fixed, so that type t has the same colour in every slide, figure and report: twenty
well-separated colours (Tableau-20; the coarse hierarchy levels use only these), then
golden-angle hues.
"""

from __future__ import annotations

import colorsys

import numpy as np

_BASE_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)


def palette(num_labels: int, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """uint8 ``(num_labels, 3)`` RGB colours of labels ``0..num_labels-1``; label 0 is the
    background (white by default), label t+1 is tissue type t."""
    out = np.zeros((max(num_labels, 1), 3), dtype=np.uint8)
    out[0] = background
    for label in range(1, num_labels):
        t = label - 1
        if t < len(_BASE_COLOURS):
            out[label] = _BASE_COLOURS[t]
        else:
            h = (t * 0.618033988749895) % 1.0
            s = 0.55 + 0.4 * ((t * 7) % 5) / 4
            v = 0.6 + 0.35 * ((t * 3) % 4) / 3
            out[label] = [round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)]
    return out
