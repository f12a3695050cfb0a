"""Line searches: a query on the straight line through two of its client's recent queries.

Decision-based attacks find the decision boundary by searching along a line. HopSkipJump
(Chen, Jordan & Wainwright, IEEE S&P 2020) binary-searches between the image it attacks and
one of another class, then steps from the boundary point along its gradient estimate with a
geometric progression. The Boundary attack (Brendel, Rauber & Bethge, ICLR 2018) starts the
same way, and Sign-OPT and RayS search along rays. Every such query is, to rounding, an affine
combination ``a + t (b - a)`` of two earlier queries ``a`` and ``b``. HopSkipJump's first
binary search lands inside the threat ball on its first or second blend (the seed's half-way
blend with a start of another class), before any fingerprint or k-NN evidence can exist.

Honest photos are not such combinations. For each pair of the client's last ``WINDOW``
queries, the ratio of the query's distance from their line to its distance from the nearer of
the two is the sine of a small angle for a line search: 0 plus rounding, 0.04-0.2 under
OARS-style uniform noise of L-inf 0.02 (Feng et al., CCS 2023); noise of L-inf 0.05 or more
hides a search's finer steps. For honest pictures it is large: at least 0.59 over 4,539
augmented, retried and JPEG re-encoded digits from clients that photograph only five digits
(median 0.84; ``benchmarks.line_geometry``, RESULTS §10e). ``RATIO`` = 0.25 sits between the
two. A pair or a query closer than ``MIN_STEP`` (L2, in 8-bit levels / 255) to an end is
skipped: a re-encode or a retry is no search.

Two honest series lie on lines too, and are let through. A photo's exposure, contrast or
fade series (``c * x``, ``0.5 + c (x - 0.5)``) lies on a line through a uniform picture
(black, grey): such lines are skipped (``intensity_line``); an attack's line between two
digits passes nowhere near one. And a search only matters where it crosses the decision
boundary: a hit is refused only when the two pictures at the ends of its line were answered
differently, or either was refused (what a refusal teaches a search is unknown); the variants
of one photo, which the model answers alike, are not. A hit that is refused is a probe.

A client's rows are its pictures' 8-bit levels (the scale the fingerprints read), at most
``KEPT`` values a row: a larger input keeps ``KEPT`` pixels drawn with the fingerprint salt.
An affine combination stays one under any choice of pixels, so this loses no line search; it
bounds memory at ``WINDOW`` rows of at most ``KEPT`` bytes (with their answers and hashes) a
client and input size, for at most ``clients`` clients (the least recently seen forgotten).
A line search across identities escapes this test (each identity has its own window); the
fingerprints and the k-NN link catch those.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

WINDOW = 8  # a client's recent queries a new one is tested against (28 pairs)
RATIO = 0.25  # distance from the line / distance from the nearer end, at most
MIN_STEP = 0.25  # L2 (levels / 255): nearer than this to an end is a resend, not a step
KEPT = 1024  # values kept of a row; a larger input keeps this many of its pixels
REFUSED = -1  # the answer of a picture that was refused (or had no class to compare)


def line_ratio(query: np.ndarray, window: np.ndarray, min_step: float = MIN_STEP) -> float:
    """The smallest, over pairs ``(a, b)`` of ``window`` rows, of the query's distance from the
    line through ``a`` and ``b`` over its distance from the nearer of them; ``inf`` when no
    pair qualifies (ends closer than ``min_step`` to each other or to the query).

    ``query`` (D,) and ``window`` (W, D) float; distances are L2 in the rows' units."""
    ratios = pair_ratios(query, window, min_step)
    return float(min(ratios.values())) if ratios else float("inf")


def pair_ratios(
    query: np.ndarray, window: np.ndarray, min_step: float = MIN_STEP
) -> dict[tuple[int, int], float]:
    """``line_ratio`` per qualifying pair ``(i, j)`` of window rows, ``i < j``."""
    count = len(window)
    if count < 2:
        return {}
    rows = np.asarray(window, np.float64)
    x = np.asarray(query, np.float64)
    to_row = np.sqrt(np.square(x - rows).sum(axis=1))  # (W,)
    first, second = np.triu_indices(count, k=1)
    span = rows[second] - rows[first]  # (P, D)
    offset = x - rows[first]
    length2 = np.square(span).sum(axis=1)
    along = (offset * span).sum(axis=1) / np.maximum(length2, 1e-12)
    off_line2 = np.square(offset).sum(axis=1) - along**2 * length2
    nearer = np.minimum(to_row[first], to_row[second])
    ok = (length2 >= min_step**2) & (nearer >= min_step)
    ratios = np.sqrt(np.maximum(off_line2, 0.0)) / np.maximum(nearer, 1e-12)
    return {
        (int(i), int(j)): float(r)
        for i, j, r, keep in zip(first, second, ratios, ok, strict=True)
        if keep
    }


def intensity_line(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """Whether the line through ``a`` and ``b`` (D,) passes within ``tolerance`` (L2) of a
    uniform picture ``s * 1``: the line of one photo's exposure, contrast or fade series."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    basis = np.stack([b - a, np.ones_like(a)], axis=1)  # (D, 2): along the line, uniform
    coef, *_ = np.linalg.lstsq(basis, -a, rcond=None)
    return float(np.linalg.norm(a + basis @ coef)) <= tolerance


@dataclass
class Window:
    """One client's last pictures of one input size, and what each was answered."""

    rows: np.ndarray  # (<= WINDOW, K) uint8 levels
    answers: list[int]  # the class each was given, or REFUSED
    contents: list[int]  # each one's picture_hash, to mark it refused after the fact


class LineSearches:
    """Each client's last ``WINDOW`` pictures, to tell a line search's next query, and the
    pictures refused as line searches, with whom they were refused to."""

    def __init__(self, clients: int, salt: int, ratio: float = RATIO) -> None:
        if clients < 1:
            raise ValueError("clients must be at least 1")
        self.clients = clients
        self.salt = salt
        self.ratio = ratio
        self._windows: OrderedDict[str, dict[int, Window]] = OrderedDict()  # client, size
        self._pixels: dict[int, np.ndarray] = {}  # input size -> the pixels kept
        self._refused: OrderedDict[int, str] = OrderedDict()  # picture_hash -> its client

    def _row(self, image: np.ndarray) -> np.ndarray:
        """The picture's 8-bit levels, at most ``KEPT`` of them (salted pixels)."""
        flat = np.asarray(image, np.float32).reshape(-1)
        if flat.size > KEPT:
            pixels = self._pixels.get(flat.size)
            if pixels is None:
                rng = np.random.default_rng(self.salt)
                pixels = np.sort(rng.choice(flat.size, KEPT, replace=False))
                self._pixels[flat.size] = pixels
            flat = flat[pixels]
        return np.rint(np.clip(flat, 0.0, 1.0) * 255.0).astype(np.uint8)

    def check(self, client: str, image: np.ndarray, answer: int, content: int) -> bool:
        """Whether ``image`` (any shape, values in [0, 1]) lies on the line through two of the
        client's recent pictures of its size that were answered differently (``answer``: the
        class it is about to be given, or ``REFUSED``), off the intensity lines; then
        remembers it as the client's newest. A hit is remembered as refused (``content``: its
        picture_hash)."""
        row = self._row(image)
        size = int(np.asarray(image).size)
        sizes = self._windows.setdefault(client, {})
        self._windows.move_to_end(client)
        if len(self._windows) > self.clients:
            self._windows.popitem(last=False)
        window = sizes.get(size)
        hit = window is not None and self._hit(row, window)
        given = REFUSED if hit else answer
        if window is None:
            sizes[size] = Window(row[None, :], [given], [content])
        else:
            window.rows = np.concatenate([window.rows[-(WINDOW - 1) :], row[None, :]])
            window.answers = [*window.answers[-(WINDOW - 1) :], given]
            window.contents = [*window.contents[-(WINDOW - 1) :], content]
        if hit:
            self._refused[content] = client
            self._refused.move_to_end(content)
            if len(self._refused) > self.clients * WINDOW:
                self._refused.popitem(last=False)
        return hit

    def _hit(self, row: np.ndarray, window: Window) -> bool:
        if len(window.rows) < 2:
            return False
        query, rows = row / 255.0, window.rows / 255.0
        for (i, j), ratio in sorted(pair_ratios(query, rows).items(), key=lambda p: p[1]):
            if ratio > self.ratio:
                return False
            ends = (window.answers[i], window.answers[j])
            if REFUSED not in ends and ends[0] == ends[1]:
                continue  # variants of one picture, answered alike: no boundary searched
            nearer = min(np.linalg.norm(query - rows[i]), np.linalg.norm(query - rows[j]))
            if not intensity_line(rows[i], rows[j], self.ratio * nearer):
                return True
        return False

    def refused_to(self, content: int) -> str | None:
        """The client a picture (its picture_hash) was refused to as a line search, if it
        was."""
        return self._refused.get(content)

    def refused(self, client: str, contents: list[int]) -> None:
        """The client's pictures ``contents`` were refused after all (withheld, throttled):
        what a search learned from them is unknown."""
        for window in self._windows.get(client, {}).values():
            window.answers = [
                REFUSED if c in contents else a
                for a, c in zip(window.answers, window.contents, strict=True)
            ]

    def forget(self, client: str) -> None:
        """Drops a client's pictures and its refused line searches (an admin released it)."""
        self._windows.pop(client, None)
        for content in [c for c, owner in self._refused.items() if owner == client]:
            del self._refused[content]

    def __len__(self) -> int:
        return len(self._windows)
