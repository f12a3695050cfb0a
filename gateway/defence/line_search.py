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

from bastion.gateway.defence.jit import JIT, compiled

WINDOW = 8  # a client's recent queries a new one is tested against (28 pairs)
RATIO = 0.25  # distance from the line / distance from the nearer end, at most
# a young identity's query against a suspect campaign's windows: an OARS-style attacker's
# next identity adds noise of L-inf 0.05-0.07 by then (ratios 0.25-0.35); honest ones >= 0.59
SUSPECT_RATIO = 0.35
MIN_STEP = 0.25  # L2 (levels / 255): nearer than this to an end is a resend, not a step
KEPT = 1024  # values kept of a row; a larger input keeps this many of its pixels
REFUSED = -1  # the answer of a picture that was refused (or had no class to compare)
PAIRS = {n: np.triu_indices(n, k=1) for n in range(2, WINDOW + 1)}  # (first, second) < n


def line_ratio(query: np.ndarray, window: np.ndarray, min_step: float = MIN_STEP) -> float:
    """The smallest, over pairs ``(a, b)`` of ``window`` rows, of the query's distance from the
    line through ``a`` and ``b`` over its distance from the nearer of them; ``inf`` when no
    pair qualifies (ends closer than ``min_step`` to each other or to the query).

    ``query`` (D,) and ``window`` (W, D) float; distances are L2 in the rows' units."""
    _, _, ratios = pair_ratios(query, window, min_step)
    return float(ratios.min()) if len(ratios) else float("inf")


def pair_ratios(
    query: np.ndarray, window: np.ndarray, min_step: float = MIN_STEP
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``line_ratio`` per qualifying pair of window rows: ``(first, second, ratios)``, each
    (P,), ``first < second``. Every distance comes from the Gram matrix of the rows and the
    query (one (W+1, D) product), not from (P, D) differences: a few microseconds a query."""
    count = len(window)
    if count < 2:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty.astype(np.int64), empty
    points = np.vstack([np.asarray(window, np.float64), np.asarray(query, np.float64)[None]])
    gram = points @ points.T  # (W+1, W+1); the query is the last point
    norms = np.diag(gram)
    g = gram[:-1, -1]  # rows . query
    xx = norms[-1]
    first, second = PAIRS.get(count) or np.triu_indices(count, k=1)
    ii, jj, ij = norms[first], norms[second], gram[first, second]
    length2 = ii + jj - 2 * ij  # |b - a|^2
    offset2 = xx + ii - 2 * g[first]  # |x - a|^2
    dot = g[second] - g[first] - ij + ii  # (x - a) . (b - a)
    to_row = np.sqrt(np.maximum(xx + norms[:-1] - 2 * g, 0.0))
    nearer = np.minimum(to_row[first], to_row[second])
    off_line2 = offset2 - dot**2 / np.maximum(length2, 1e-12)
    ok = (length2 >= min_step**2) & (nearer >= min_step)
    ratios = np.sqrt(np.maximum(off_line2[ok], 0.0)) / nearer[ok]
    return first[ok], second[ok], ratios


def gram_ratios(gram: np.ndarray, g: np.ndarray, xx: float, min_step: float) -> np.ndarray:
    """``pair_ratios``' ratios from inner products alone, for all pairs in ``PAIRS`` order
    (inf where a pair does not qualify): ``gram`` (W, W) of the window's rows, ``g`` (W,) of
    each row with the query, ``xx`` the query's squared norm; units are the rows' own. The loop
    ``compiled`` runs when numba is installed (the numpy ``pair_ratios`` is its reference)."""
    count = len(g)
    out = np.full(count * (count - 1) // 2, np.inf)
    limit = min_step * min_step
    k = 0
    for i in range(count):
        for j in range(i + 1, count):
            length2 = gram[i, i] + gram[j, j] - 2.0 * gram[i, j]
            to_i = xx + gram[i, i] - 2.0 * g[i]
            to_j = xx + gram[j, j] - 2.0 * g[j]
            nearer2 = min(to_i, to_j)
            if length2 >= limit and nearer2 >= limit:
                dot = g[j] - g[i] - gram[i, j] + gram[i, i]
                off2 = max(to_i - dot * dot / length2, 0.0)
                out[k] = np.sqrt(off2 / nearer2)
            k += 1
    return out


FAST_GRAM_RATIOS = compiled(gram_ratios)  # scan calls it: compiled, scan compiles too


def scan(
    rows: np.ndarray,
    gram: np.ndarray,
    filled: int,
    query: np.ndarray,
    dots: np.ndarray,
    min_step: float,
) -> np.ndarray:
    """A query against a window ring: ``rows`` (W, K) uint8 (the first ``filled`` in use,
    oldest first), ``gram`` (W, W) float64 their inner products, ``query`` (K,) uint8. Fills
    ``dots`` (W + 1,) with the query's inner products with the rows and, last, with itself;
    returns ``gram_ratios`` for the ``filled`` rows. Compiled with numba when installed."""
    xx = 0
    for a in range(query.shape[0]):
        xx += np.int64(query[a]) * np.int64(query[a])
    dots[-1] = xx
    for i in range(filled):
        total = 0
        for a in range(query.shape[0]):
            total += np.int64(rows[i, a]) * np.int64(query[a])
        dots[i] = total
    return FAST_GRAM_RATIOS(gram[:filled, :filled], dots[:filled], dots[-1], min_step)


def push(
    rows: np.ndarray, gram: np.ndarray, filled: int, query: np.ndarray, dots: np.ndarray
) -> int:
    """Appends ``query`` to the ring after ``scan`` (``dots`` as it filled them), dropping
    the oldest row when full; returns the rows now in use."""
    width = rows.shape[0]
    if filled == width:  # shift everything one place towards the oldest end
        for i in range(width - 1):
            rows[i, :] = rows[i + 1, :]
            for j in range(width - 1):
                gram[i, j] = gram[i + 1, j + 1]
            dots[i] = dots[i + 1]
        filled -= 1
    rows[filled, :] = query
    for i in range(filled):
        gram[i, filled] = dots[i]
        gram[filled, i] = dots[i]
    gram[filled, filled] = dots[-1]
    return filled + 1


FAST_SCAN = compiled(scan)
FAST_PUSH = compiled(push)


def numpy_scan(
    rows: np.ndarray,
    gram: np.ndarray,
    filled: int,
    query: np.ndarray,
    dots: np.ndarray,
    min_step: float,
) -> np.ndarray:
    """``scan`` with numpy's products (no numba: the loops would run as Python)."""
    wide = query.astype(np.float64)
    dots[-1] = wide @ wide
    dots[:filled] = rows[:filled] @ wide
    return gram_ratios(gram[:filled, :filled], dots[:filled], dots[-1], min_step)


def numpy_push(
    rows: np.ndarray, gram: np.ndarray, filled: int, query: np.ndarray, dots: np.ndarray
) -> int:
    """``push`` with numpy's slicing."""
    if filled == rows.shape[0]:
        rows[:-1] = rows[1:].copy()
        gram[:-1, :-1] = gram[1:, 1:].copy()
        dots[:-2] = dots[1:-1].copy()
        filled -= 1
    rows[filled] = query
    gram[:filled, filled] = gram[filled, :filled] = dots[:filled]
    gram[filled, filled] = dots[-1]
    return filled + 1


def warm_up() -> None:
    """Compiles (or loads from the disk cache) the loops; a no-op without numba."""
    if JIT:
        rows, gram, dots = np.zeros((2, 2), np.uint8), np.eye(2), np.zeros(3)
        FAST_SCAN(rows, gram, 2, np.zeros(2, np.uint8), dots, 0.1)
        FAST_PUSH(rows, gram, 2, np.zeros(2, np.uint8), dots)


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

    rows: np.ndarray  # (WINDOW, K) uint8 levels, oldest first, the first ``filled`` in use
    gram: np.ndarray  # (WINDOW, WINDOW) float64: their inner products, levels squared
    answers: list[int]  # the class each was given, or REFUSED
    contents: list[int]  # each one's picture_hash, to mark it refused after the fact
    filled: int = 0


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

    def check(
        self,
        client: str,
        image: np.ndarray,
        answer: int,
        content: int,
        suspects: tuple[str, ...] = (),
    ) -> str | None:
        """Whose pictures ``image`` (any shape, values in [0, 1]) continues a line search
        through: the client's own, when it lies on the line through two of its recent
        pictures of its size that were answered differently (``answer``: the class it is about
        to be given, or ``REFUSED``), off the intensity lines; else one of ``suspects``' (a
        young identity's query against the windows of suspect campaigns' recent identities, at
        ``SUSPECT_RATIO``: a rotating attacker's next identity continues its search); else
        None. Then remembers it as the client's newest; a hit is remembered as refused
        (``content``: its picture_hash)."""
        row = self._row(image)
        size = int(np.asarray(image).size)
        sizes = self._windows.setdefault(client, {})
        self._windows.move_to_end(client)
        if len(self._windows) > self.clients:
            self._windows.popitem(last=False)
        window = sizes.get(size)
        if window is None:
            window = Window(
                np.zeros((WINDOW, row.size), np.uint8), np.zeros((WINDOW, WINDOW)), [], []
            )
            sizes[size] = window
        dots = np.empty(WINDOW + 1)
        scanned = FAST_SCAN if JIT else numpy_scan
        ratios = scanned(window.rows, window.gram, window.filled, row, dots, MIN_STEP * 255)
        hit = bool((ratios <= self.ratio).any()) and self._hit(row, window, ratios, self.ratio)
        partner = client if hit else None
        for suspect in suspects:
            if partner is not None:
                break
            theirs = self._windows.get(suspect, {}).get(size)
            if suspect == client or theirs is None or theirs.filled < 2:
                continue
            found = scanned(theirs.rows, theirs.gram, theirs.filled, row, dots, MIN_STEP * 255)
            if (found <= SUSPECT_RATIO).any() and self._hit(row, theirs, found, SUSPECT_RATIO):
                partner, hit = suspect, True
        if suspects:  # the scans above overwrote dots: the products with the client's own rows
            scanned(window.rows, window.gram, window.filled, row, dots, MIN_STEP * 255)
        window.filled = (FAST_PUSH if JIT else numpy_push)(
            window.rows, window.gram, window.filled, row, dots
        )
        window.answers = [*window.answers[-(WINDOW - 1) :], REFUSED if hit else answer]
        window.contents = [*window.contents[-(WINDOW - 1) :], content]
        if hit:
            self._refused[content] = client
            self._refused.move_to_end(content)
            if len(self._refused) > self.clients * WINDOW:
                self._refused.popitem(last=False)
        return partner

    def _hit(self, row: np.ndarray, window: Window, ratios: np.ndarray, limit: float) -> bool:
        """Whether a query on some line (``ratios`` per pair of the window's rows, from
        ``scan``) is a refused line search's next step: the ends answered differently, the
        line no intensity series'."""
        first, second = PAIRS[window.filled]
        query, rows = row / 255.0, window.rows[: window.filled] / 255.0
        for k in np.argsort(ratios):
            if ratios[k] > limit:
                return False
            i, j = int(first[k]), int(second[k])
            ends = (window.answers[i], window.answers[j])
            if REFUSED not in ends and ends[0] == ends[1]:
                continue  # variants of one picture, answered alike: no boundary searched
            nearer = min(np.linalg.norm(query - rows[i]), np.linalg.norm(query - rows[j]))
            if not intensity_line(rows[i], rows[j], limit * nearer):
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
