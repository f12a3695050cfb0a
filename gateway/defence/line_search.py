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

A client's rows are its pictures' 8-bit levels (the scale the fingerprints read), at most
``KEPT`` values a row: a larger input keeps ``KEPT`` pixels drawn with the fingerprint salt.
An affine combination stays one under any choice of pixels, so this loses no line search; it
bounds memory at ``WINDOW * KEPT`` bytes a client, for at most ``clients`` clients (the least
recently seen forgotten). A line search across identities escapes this test (each identity
has its own window); the fingerprints and the k-NN link catch those.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

WINDOW = 8  # a client's recent queries a new one is tested against (28 pairs)
RATIO = 0.25  # distance from the line / distance from the nearer end, at most
MIN_STEP = 0.25  # L2 (levels / 255): nearer than this to an end is a resend, not a step
KEPT = 1024  # values kept of a row; a larger input keeps this many of its pixels


def line_ratio(query: np.ndarray, window: np.ndarray, min_step: float = MIN_STEP) -> float:
    """The smallest, over pairs ``(a, b)`` of ``window`` rows, of the query's distance from the
    line through ``a`` and ``b`` over its distance from the nearer of them; ``inf`` when no
    pair qualifies (ends closer than ``min_step`` to each other or to the query).

    ``query`` (D,) and ``window`` (W, D) float; distances are L2 in the rows' units."""
    count = len(window)
    if count < 2:
        return float("inf")
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
    if not ok.any():
        return float("inf")
    ratios = np.sqrt(np.maximum(off_line2[ok], 0.0)) / nearer[ok]
    return float(ratios.min())


class LineSearches:
    """Each client's last ``WINDOW`` pictures, to tell a line search's next query."""

    def __init__(self, clients: int, salt: int, ratio: float = RATIO) -> None:
        if clients < 1:
            raise ValueError("clients must be at least 1")
        self.clients = clients
        self.salt = salt
        self.ratio = ratio
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()  # client -> (<=W, K) uint8
        self._pixels: dict[int, np.ndarray] = {}  # input size -> the pixels kept

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

    def check(self, client: str, image: np.ndarray) -> bool:
        """Whether ``image`` (any shape, values in [0, 1]) lies on the line through two of the
        client's recent pictures; then remembers it as the client's newest."""
        row = self._row(image)
        window = self._rows.get(client)
        on_line = False
        if window is not None and len(window) >= 2 and window.shape[1] == row.size:
            on_line = line_ratio(row / 255.0, window / 255.0) <= self.ratio
        if window is None or window.shape[1] != row.size:
            window = row[None, :]
        else:
            window = np.concatenate([window[-(WINDOW - 1) :], row[None, :]])
        self._rows[client] = window
        self._rows.move_to_end(client)
        if len(self._rows) > self.clients:
            self._rows.popitem(last=False)
        return on_line

    def forget(self, client: str) -> None:
        """Drops a client's pictures (an admin released it)."""
        self._rows.pop(client, None)

    def __len__(self) -> int:
        return len(self._rows)
