"""Near-duplicate samples and label disagreements, found before training.

The same image (or slide) under two patient ids is the same leak as one patient in two
sets: a model is tested on what it trained on. Each modality gives every sample a compact
signature and the pairs are found by similarity:

- images and volumes: a perceptual signature, the picture shrunk to 32x32 grey pixels
  and normalised (for a volume, its mean projections along the three axes), compared by
  correlation: copies, re-encodes, resizes and brightness / contrast changes correlate
  above 0.99, different patients' chest X-rays at most 0.961 and follow-ups of one patient
  0.982 on the NIH sample. (A 64-bit difference hash was too coarse on chest X-rays: 2,613
  pairs of the 1,000 NIH images within 4 bits, nearly all of different patients.)
- slides: the cached patch embeddings, each reduced to 64 random-hyperplane sign bits
  (cosine-preserving); two slides are duplicates when most of one's sampled patches have
  a near-identical patch in the other. The pairs to compare come from an inverted index
  over the bits (locality-sensitive hashing), so the cost grows with the slides, not with
  their pairs (1,000 slides: seconds). Within a slide, patches whose embeddings are
  nearly identical (cosine >= 0.999) are flagged too.

:func:`leaking_pairs` lists the duplicate pairs that cross train / validation / test under
different patient ids; :func:`merge_patients` makes each duplicate group one patient.
:func:`label_conflicts` compares two label sources of a manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

#: side of the grey thumbnail that makes an image's perceptual signature
SIGNATURE_SIDE = 32
#: images whose signatures correlate at least this much are near-duplicates (on NIH chest
#: X-rays different patients reach 0.961 at most, follow-ups of one patient 0.982)
IMAGE_MIN_CORRELATION = 0.99
#: candidate matches: a sampled patch within this many sign bits (of 64) of another slide's patch ...
PATCH_MAX_BITS = 4
#: ... confirmed when their (cohort-centred) embeddings' cosine reaches this
PATCH_MATCH_COSINE = 0.99
#: two slides are near-duplicates when this share of each one's sampled patches match the other
SLIDE_MIN_SHARE = 0.5
#: patches sampled per slide for the slide-level comparison
SLIDE_SAMPLE = 128
#: cosine above which two patches of one slide are the same patch
PATCH_SAME_COSINE = 0.999

POLICIES = ("refuse", "merge", "allow")


@dataclass
class DuplicatePair:
    a: str
    b: str
    patient_a: str
    patient_b: str
    distance: float  # 1 - correlation (images), or 1 - matched share (slides)
    kind: str  # exact | near | same file (slides whose stores record one file fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def picture_signature(grey: npt.NDArray[Any], side: int = SIGNATURE_SIDE) -> npt.NDArray[np.float32]:
    """Perceptual signature of a 2-D picture: shrunk (box filter) to ``side`` x ``side``
    grey pixels, zero mean, unit norm; two signatures' dot product is their correlation,
    which ignores brightness, contrast, re-encoding and resizing."""
    from PIL import Image

    a = np.asarray(grey, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=-1)
    a = np.nan_to_num(a, nan=float(np.nanmean(a)) if np.isfinite(a).any() else 0.0)
    small = np.array(Image.fromarray(a).resize((side, side), Image.Resampling.BOX), dtype=np.float32).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small


def volume_signature(volume: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """:func:`picture_signature` of a 3-D volume's mean projections along its three axes."""
    v = np.asarray(volume, dtype=np.float32)
    return (np.concatenate([picture_signature(v.mean(axis=k)) for k in range(3)]) / np.sqrt(3)).astype(np.float32)


def signature_pairs(ids: list[str], patients: list[str], signatures: list[npt.NDArray[np.float32]], *,
                    min_correlation: float = IMAGE_MIN_CORRELATION) -> list[DuplicatePair]:
    """Pairs of samples whose signatures correlate at ``min_correlation`` or more
    (``distance`` = 1 - correlation; ``exact`` when the signatures are identical)."""
    if len(signatures) < 2:
        return []
    sig = np.stack(signatures).astype(np.float32)
    n = len(sig)
    pairs: list[DuplicatePair] = []
    step = max(1, 8_000_000 // n)
    for i0 in range(0, n, step):
        corr = sig[i0:i0 + step] @ sig.T
        for ii, j in zip(*np.nonzero(corr >= min_correlation), strict=True):
            i, j = i0 + int(ii), int(j)
            if j > i:
                c = float(corr[ii, j])
                exact = bool(np.array_equal(sig[i], sig[j]))
                pairs.append(DuplicatePair(ids[i], ids[j], patients[i], patients[j], round(1 - c, 6),
                                           "exact" if exact else "near"))
    return pairs


@lru_cache(maxsize=8)
def _planes(dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    planes = np.random.default_rng(seed).standard_normal((dim, 64)).astype(np.float32)
    planes.flags.writeable = False  # shared by every caller
    return planes


def _sign_codes(centred: npt.NDArray[np.float32], planes: npt.NDArray[np.float32]) -> npt.NDArray[np.uint64]:
    """The 64 random-hyperplane sign bits of each (centred) embedding, packed in a uint64."""
    return np.packbits((centred @ planes) > 0, axis=1).view(">u8")[:, 0].astype(np.uint64)


def patch_codes(features: npt.NDArray[np.float32], planes: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.uint64]:
    """64 random-hyperplane sign bits per patch embedding (near-identical embeddings share
    almost all bits: a bit differs with probability angle / pi)."""
    f = np.asarray(features, dtype=np.float32)
    f = f - f.mean(axis=0, keepdims=True) if len(f) > 1 else f
    return _sign_codes(f, _planes(f.shape[1]) if planes is None else planes)


def _sample(n: int, k: int) -> npt.NDArray[np.int64]:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def slide_pairs(ids: list[str], patients: list[str], features: Callable[[int], npt.NDArray[np.float32]], *,
                min_share: float = SLIDE_MIN_SHARE, max_bits: int = PATCH_MAX_BITS) -> tuple[list[DuplicatePair], dict[str, Any]]:
    """Near-duplicate slides from their patch embeddings (``features(i)`` gives slide i's),
    and the slides with duplicated patches inside them.

    Sub-quadratic: each slide keeps only its sampled patches' 64-bit sign codes (1 KB; the
    embeddings are read twice, once for the cohort's centre, once for the codes), an
    inverted index over the codes proposes the slide pairs that share enough of them
    (:func:`candidate_slide_pairs`), and only those are compared patch by patch as before:
    sign bits, then the embeddings' cosine. A group of copies is reported as its first
    slide paired with each other one (linear in the group), the others not compared again."""
    if not ids:
        return [], {}
    within: dict[str, Any] = {}
    total: npt.NDArray[np.float64] | None = None
    count = 0
    for i in range(len(ids)):  # pass 1: the cohort's centre (codes must compare across slides) and within-slide copies
        f = np.asarray(features(i), dtype=np.float32)
        sample = f[_sample(len(f), SLIDE_SAMPLE)].astype(np.float64)
        total = sample.sum(axis=0) if total is None else total + sample.sum(axis=0)
        count += len(sample)
        dup = _within_slide_duplicates(f)
        if dup["n_patches_duplicated"]:
            within[ids[i]] = dup
    if total is None or not count:
        return [], within
    centre = (total / count).astype(np.float32)[None]
    planes = _planes(centre.shape[1])
    codes = []
    for i in range(len(ids)):  # pass 2: 1 KB per slide
        f = np.asarray(features(i), dtype=np.float32)
        codes.append(_sign_codes(f[_sample(len(f), SLIDE_SAMPLE)] - centre, planes))
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs: list[DuplicatePair] = []
    for i, j in candidate_slide_pairs(codes):
        if root(i) == root(j) or not len(codes[i]) or not len(codes[j]):
            continue  # already one group through another copy
        d = np.bitwise_count(codes[i][:, None] ^ codes[j][None, :])
        share = min(float((d.min(axis=1) <= max_bits).mean()), float((d.min(axis=0) <= max_bits).mean()))
        if share < min_share:  # the sign bits say no: no need to compare the embeddings themselves
            continue
        fi, fj = (np.asarray(features(k), dtype=np.float32) for k in (i, j))
        raw_i, raw_j = fi[_sample(len(fi), SLIDE_SAMPLE)], fj[_sample(len(fj), SLIDE_SAMPLE)]
        a, b = (g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12) for g in (raw_i - centre, raw_j - centre))
        c = a @ b.T
        share = min(float((c.max(axis=1) >= PATCH_MATCH_COSINE).mean()), float((c.max(axis=0) >= PATCH_MATCH_COSINE).mean()))
        if share >= min_share:
            exact = raw_i.shape == raw_j.shape and np.array_equal(raw_i, raw_j)
            first = min(root(i), root(j))
            parent[root(i)] = parent[root(j)] = first
            a_id, b_id = (i, j) if i < j else (j, i)
            pairs.append(DuplicatePair(ids[a_id], ids[b_id], patients[a_id], patients[b_id], round(1 - share, 4),
                                       "exact" if exact else "near"))
    return pairs, within


#: the index's hash tables (classic LSH over the 64 sign bits): each keys a patch by 24 of
#: its bits, drawn at random (fixed seed). A patch and its near-copy with d differing bits
#: share a table's key with probability C(64 - d, 24) / C(64, 24): 1 for d = 0, 0.39 for
#: d = 2, 0.14 for d = 4 (the most a match allows), so two slides with 64 matched patches
#: share about 73 keys even when every match differs in 4 bits, and 400 when they are copies
INDEX_TABLES = 8
INDEX_BITS = 24
#: a key held by more slides than this proposes no pairs (a pattern common in the cohort's
#: tissue, not a copy: a search engine's stop word)
TOKEN_MAX_SLIDES = 32
#: a slide pair is compared when it shares at least this many keys (two unrelated slides
#: share ~0: a 24-bit key is held by one patch in 16 million by chance)
CANDIDATE_KEYS = 16


@lru_cache(maxsize=1)
def _index_bits() -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(64)
    return np.stack([np.sort(rng.choice(64, INDEX_BITS, replace=False)) for _ in range(INDEX_TABLES)])


def index_keys(codes: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """The distinct (table, 24-bit key) tokens of a slide's patch codes, as int64."""
    c = np.asarray(codes, dtype=np.uint64)
    if not len(c):
        return np.zeros(0, np.int64)
    bits = ((c[:, None] >> np.arange(64, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.int64)  # (n, 64)
    weights = np.int64(1) << np.arange(INDEX_BITS, dtype=np.int64)
    keys = [(bits[:, sel] * weights).sum(axis=1) | (t << INDEX_BITS) for t, sel in enumerate(_index_bits())]
    return np.unique(np.concatenate(keys))


def candidate_slide_pairs(codes: list[npt.NDArray[np.uint64]]) -> list[tuple[int, int]]:
    """Slide pairs worth comparing, from an inverted index over their patches' codes
    (locality-sensitive hashing: :data:`INDEX_TABLES` tables of :data:`INDEX_BITS` random
    bits each): every key a slide's patches hold, the slides holding each key, and the
    pairs of slides sharing at least :data:`CANDIDATE_KEYS` keys. Work and memory grow with
    the number of patches, not of slide pairs (keys held by more than
    :data:`TOKEN_MAX_SLIDES` slides are skipped). Sorted by how many keys they share."""
    n = len(codes)
    if n < 2:
        return []
    toks = [index_keys(c) for c in codes]
    tok = np.concatenate(toks)
    own = np.concatenate([np.full(len(t), i, np.int64) for i, t in enumerate(toks)])
    order = np.argsort(tok, kind="stable")
    tok, own = tok[order], own[order]
    starts = np.flatnonzero(np.r_[True, tok[1:] != tok[:-1]])
    sizes = np.diff(np.r_[starts, len(tok)])
    keys = []
    for m in np.unique(sizes[(sizes >= 2) & (sizes <= TOKEN_MAX_SLIDES)]):
        members = own[starts[sizes == m][:, None] + np.arange(m)[None, :]]  # (keys held by m slides, m), in slide order
        a, b = np.triu_indices(int(m), 1)
        keys.append(members[:, a].ravel() * n + members[:, b].ravel())
    if not keys:
        return []
    pair, shared = np.unique(np.concatenate(keys), return_counts=True)
    keep = shared >= CANDIDATE_KEYS
    best = np.argsort(-shared[keep], kind="stable")
    return [(int(p // n), int(p % n)) for p in pair[keep][best]]


def fingerprint_pairs(ids: list[str], patients: list[str], fingerprints: list[str]) -> list[DuplicatePair]:
    """Slides whose stores record one slide-file content fingerprint: one file under
    several ids, an exact duplicate whatever the embeddings say. Each group gives the pairs
    of its first slide with every other one (linear in the group: enough for a group that
    spans two sets to cross them, and for merging it into one patient)."""
    first: dict[str, int] = {}
    pairs: list[DuplicatePair] = []
    for i, fp in enumerate(fingerprints):
        if not fp:
            continue
        if fp not in first:
            first[fp] = i
            continue
        k = first[fp]
        pairs.append(DuplicatePair(ids[k], ids[i], patients[k], patients[i], 0.0, "same file"))
    return pairs


def _within_slide_duplicates(f: npt.NDArray[np.float32]) -> dict[str, Any]:
    """Patches of one slide whose embedding is nearly identical (cosine >= 0.999) to another's."""
    if len(f) < 2:
        return {"n_patches_duplicated": 0, "examples": []}
    norm = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    codes = patch_codes(norm)
    _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    dup: set[int] = set()
    examples: list[list[int]] = []
    for g in np.flatnonzero(counts > 1):
        members = np.flatnonzero(inverse == g)
        sims = norm[members] @ norm[members].T
        np.fill_diagonal(sims, -1)
        hit = members[(sims >= PATCH_SAME_COSINE).any(axis=1)]
        dup.update(int(m) for m in hit)
        if len(hit) > 1 and len(examples) < 5:
            examples.append([int(m) for m in hit[:4]])
    return {"n_patches": len(f), "n_patches_duplicated": len(dup), "examples": examples}


def leaking_pairs(pairs: Iterable[DuplicatePair], sets: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The pairs of different patients that land in different sets in some fold (``sets``:
    one {sample id: train | val | test} map per fold)."""
    out = []
    for pr in pairs:
        if pr.patient_a == pr.patient_b:
            continue
        where = [(k, s.get(pr.a), s.get(pr.b)) for k, s in enumerate(sets)]
        crossed = [(k, a, b) for k, a, b in where if a and b and a != b]
        if crossed:
            k, a, b = crossed[0]
            out.append({**pr.to_dict(), "fold": k, "set_a": a, "set_b": b})
    return out


def merge_patients(pairs: Iterable[DuplicatePair], patients: dict[str, str]) -> dict[str, str]:
    """Sample id -> patient id where every duplicate group (connected through pairs) shares
    one patient id (the smallest of the group's ids), so splits keep the group together."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pr in pairs:
        ra, rb = find(pr.patient_a), find(pr.patient_b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {sid: find(pid) for sid, pid in patients.items()}


_NEGATIVE = {"", "0", "0.0", "false", "no", "none", "normal", "negative", "no finding", "nofinding", "benign", "healthy"}


def as_binary(value: str) -> int | None:
    """A label value as 0 (negative: 0, no, normal, No Finding ...) or 1 (anything else);
    None for a value that cannot be read (NaN)."""
    v = str(value).strip().lower()
    if v in ("nan", "na", "n/a"):
        return None
    return 0 if v in _NEGATIVE else 1


def label_conflicts(ids: list[str], first: list[str], second: list[str], *, names: tuple[str, str]) -> dict[str, Any]:
    """Rows whose two label sources disagree once both are read as negative / positive."""
    rows = []
    for sid, a, b in zip(ids, first, second, strict=True):
        x, y = as_binary(a), as_binary(b)
        if x is not None and y is not None and x != y:
            rows.append({"id": sid, names[0]: a, names[1]: b})
    return {"sources": list(names), "n": len(ids), "n_conflicts": len(rows), "conflicts": rows,
            "rule": "each source read as negative (0, no, none, normal, negative, No Finding, benign, healthy, blank) "
                    "or positive (anything else)"}
