"""Statistics: an accuracy with its Wilson interval, and two models compared image by image
(a paired bootstrap interval and the exact McNemar test); a few lines of numpy, no package."""
import math

import numpy as np


class Score:
    """An accuracy on a fixed list of images, kept as per-image correctness (and, where
    measured, per-image cross-entropy) so that two models can be compared image by image."""

    def __init__(self, correct, key=None, losses=None):
        self.correct = np.asarray(correct, dtype=bool)
        self.key = key  # names_key of the images, so that only like is paired with like
        self.losses = None if losses is None else np.asarray(losses, dtype=np.float64)

    @property
    def loss(self):
        return float(self.losses.mean())

    @property
    def n(self):
        return len(self.correct)

    @property
    def acc(self):
        return float(self.correct.mean())

    def interval(self, z=1.96):
        """Wilson's 95% interval: honest near 0 and 1 and for a few hundred images."""
        n, p = self.n, self.acc
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def __str__(self):
        lo, hi = self.interval()
        return f"{self.acc:.4f} [{lo:.3f}, {hi:.3f}]"

    def to_text(self):
        return np.packbits(self.correct).tobytes().hex()

    @classmethod
    def from_text(cls, text, n, key=None):
        return cls(np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8), count=n).astype(bool), key)


def mcnemar_p(only_a, only_b):
    """Exact two-sided McNemar test: P(a split of the discordant images this uneven or more)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired(a, b, resamples=10_000, seed=0):
    """Score b minus score a on the same images: the difference, its 95% bootstrap interval
    (images resampled in pairs), the exact McNemar p, and the images only a / only b got right."""
    if a.key != b.key or a.n != b.n:
        raise ValueError(f"paired scores need the same images ({a.n} vs {b.n} images)")
    a, b = a.correct, b.correct
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    pb, pa = only_b / n, only_a / n
    draws = np.random.default_rng(seed).multinomial(n, [pb, pa, max(0.0, 1 - pa - pb)], size=resamples)
    lo, hi = np.percentile((draws[:, 0] - draws[:, 1]) / n, [2.5, 97.5])
    return {"diff": pb - pa, "ci": (float(lo), float(hi)), "p": mcnemar_p(only_a, only_b),
            "only_a": only_a, "only_b": only_b}
