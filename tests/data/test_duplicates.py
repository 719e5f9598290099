"""Near-duplicate slides at cohort scale: the inverted index over the patches' sign-code
bands finds what comparing every pair of slides finds, on real MIL bags, and its work
grows with the patches, not with the pairs of slides."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.data.duplicates import (
    PATCH_MATCH_COSINE,
    SLIDE_MIN_SHARE,
    SLIDE_SAMPLE,
    _sample,
    candidate_slide_pairs,
    merge_patients,
    slide_pairs,
)


def _every_pair(feats: list[np.ndarray]) -> set[tuple[int, int]]:
    """The oracle: every pair of slides compared on their sampled patches' embeddings (the
    cohort-centred cosine), no index, no sign bits."""
    raw = [f[_sample(len(f), SLIDE_SAMPLE)].astype(np.float32) for f in feats]
    centre = np.concatenate(raw).mean(axis=0, keepdims=True)
    unit = [(g - centre) / np.maximum(np.linalg.norm(g - centre, axis=1, keepdims=True), 1e-12) for g in raw]
    out = set()
    for i in range(len(unit)):
        for j in range(i + 1, len(unit)):
            c = unit[i] @ unit[j].T
            if min((c.max(axis=1) >= PATCH_MATCH_COSINE).mean(), (c.max(axis=0) >= PATCH_MATCH_COSINE).mean()) >= SLIDE_MIN_SHARE:
                out.add((i, j))
    return out


@pytest.fixture(scope="module")
def corel() -> tuple[list[str], list[np.ndarray]]:
    """Fox and Elephant (Corel): 400 real bags, among them exact copies of shared background
    images under two ids; plus planted copies: one re-embedded with noise, one cropped to its
    first 70 % of patches, one bag copied four times (a group)."""
    from wsi_mil.data.mil_import import load_classic

    bags = load_classic("fox", shared("mil")) + load_classic("elephant", shared("mil"))
    ids, feats = [b.slide_id for b in bags], [np.asarray(b.features, np.float32) for b in bags]
    rng = np.random.default_rng(0)
    planted = [("noisy", feats[17] + rng.normal(0, 1e-3, feats[17].shape).astype(np.float32)),
               ("cropped", feats[250][: int(0.7 * len(feats[250]))])]
    planted += [(f"copy{k}", feats[123] * (1 + rng.normal(0, 1e-5, feats[123].shape)).astype(np.float32)) for k in range(4)]
    for name, f in planted:
        ids.append(name)
        feats.append(f)
    return ids, feats


def test_the_index_finds_every_pair_that_comparing_all_pairs_finds(corel) -> None:
    ids, feats = corel
    truth = _every_pair(feats)
    pairs, _ = slide_pairs(ids, ids, lambda i: feats[i])
    index = {n: k for k, n in enumerate(ids)}
    found = {tuple(sorted((index[p.a], index[p.b]))) for p in pairs}
    # every oracle pair is found or joined through the same group (copies are linked once, not all with all)
    groups = merge_patients(pairs, {i: i for i in ids})
    assert all(groups[ids[i]] == groups[ids[j]] for i, j in truth), "a pair the exhaustive comparison finds is missed"
    assert found <= truth  # and nothing it does not find
    assert {ids[i] for pair in truth for i in pair} >= {"noisy", "cropped", "copy0", "copy3"}
    # the bag copied four times (five slides): one group of four pairs, not ten
    group = [p for p in pairs if {p.a, p.b} & {"copy0", "copy1", "copy2", "copy3"}]
    assert len(group) == 4 and len({groups[x] for p in group for x in (p.a, p.b)}) == 1
    assert any(p.kind == "exact" for p in pairs)  # the Corel background images shared by the two sets


def test_candidates_grow_with_the_patches_not_the_pairs() -> None:
    """Random, unrelated slides: the index proposes almost no pairs (all pairs: ~2 million
    at 2,000 slides), and a planted copy is among them."""
    rng = np.random.default_rng(3)
    codes = [rng.integers(0, 2**63, 128, dtype=np.int64).astype(np.uint64) for _ in range(2000)]
    # a near-copy of slide 7 whose every patch differs in 4 random bits (the most a patch match allows)
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, 4, replace=False).astype(np.uint64)) for _ in range(128)]
    codes.append(codes[7] ^ np.array(flips, dtype=np.uint64))
    cands = candidate_slide_pairs(codes)
    assert (7, 2000) in cands and len(cands) < 50
