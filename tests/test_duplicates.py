"""Merge suggestions (reid.identify.duplicates): pairs of individuals whose photos match each other."""
from __future__ import annotations

import numpy as np
import pytest

from reid.evaluation.evaluate import RerankOptions
from reid.identify.duplicates import DuplicatePair, default_block_rows, duplicate_pairs
from reid.identify.gallery import Galleries, Layout
from reid.store import GalleryRow, vector_to_blob


def unit(*rows) -> np.ndarray:
    vectors = np.array(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(vectors, owners, images, threshold, top_n) -> list[DuplicatePair]:
    """Every image pair scored at once (n x n), each pair of individuals' best kept: what blocks must give."""
    scores = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    best: dict[tuple[int, int], tuple[float, int, int]] = {}
    for i in range(len(vectors)):
        for j in range(len(vectors)):
            if owners[i] < owners[j] and scores[i, j] >= threshold:
                key = (int(owners[i]), int(owners[j]))
                hit = (float(scores[i, j]), int(images[i]), int(images[j]))
                if key not in best or (-hit[0], hit[1], hit[2]) < (-best[key][0], best[key][1], best[key][2]):
                    best[key] = hit
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:top_n]
    return [DuplicatePair(a, b, s, i, j) for (a, b), (s, i, j) in ranked]


def test_a_duplicate_pair_above_the_threshold_is_found_and_one_below_is_not():
    # individuals 10 and 20 share a near-identical photo; 30 resembles 10 only below the threshold
    vectors = unit([1, 0, 0, 0], [0, 1, 0, 0],        # 10: images 1, 2
                   [0.99, 0.05, 0.1, 0], [0, 0, 0, 1],  # 20: images 3, 4 (3 is 1 again)
                   [0.6, 0, 0.8, 0])                  # 30: image 5, cosine 0.6 with image 1
    owners, images = [10, 10, 20, 20, 30], [1, 2, 3, 4, 5]
    pairs = duplicate_pairs(vectors, owners, images, threshold=0.7)
    assert [(p.individual_a, p.individual_b, p.image_a, p.image_b) for p in pairs] == [(10, 20, 1, 3)]
    assert pairs[0].cosine == pytest.approx(float(vectors[0] @ vectors[2]), abs=1e-6) and pairs[0].cosine > 0.99
    # at a lower threshold 30 pairs too, after the closer pair; the images are oriented as the individuals
    pairs = duplicate_pairs(vectors, owners, images, threshold=0.5)
    assert [(p.individual_a, p.individual_b) for p in pairs] == [(10, 20), (20, 30), (10, 30)]
    assert (pairs[2].image_a, pairs[2].image_b) == (1, 5) and pairs[2].cosine == pytest.approx(0.6, abs=1e-6)
    assert pairs[0].cosine >= pairs[1].cosine >= pairs[2].cosine


def test_an_individual_never_pairs_with_itself():
    # two identical photos of one individual, and another individual far away: no pair
    vectors = unit([1, 0, 0], [1, 0, 0], [0, 1, 0])
    assert duplicate_pairs(vectors, [7, 7, 8], [1, 2, 3], threshold=0.5) == []
    # one pair per two individuals, however many of their photos match
    vectors = unit([1, 0, 0], [1, 0, 0], [1, 0.01, 0], [1, 0.02, 0])
    pairs = duplicate_pairs(vectors, [7, 7, 8, 8], [1, 2, 3, 4], threshold=0.5)
    assert [(p.individual_a, p.individual_b) for p in pairs] == [(7, 8)]
    assert pairs[0].image_b == 3  # 8's photo closest to 7's


def test_empty_and_tiny_galleries_and_bad_input():
    assert duplicate_pairs(np.zeros((0, 4), np.float32), [], [], 0.7) == []
    assert duplicate_pairs(unit([1, 0]), [1], [1], 0.7) == []
    with pytest.raises(ValueError, match="one row, individual and image each"):
        duplicate_pairs(unit([1, 0], [0, 1]), [1], [1, 2], 0.7)
    with pytest.raises(ValueError, match="between -1 and 1"):
        duplicate_pairs(unit([1, 0]), [1], [1], 1.5)
    with pytest.raises(ValueError, match="top_n"):
        duplicate_pairs(unit([1, 0]), [1], [1], 0.7, top_n=0)


@pytest.mark.parametrize("block_rows", [1, 2, 7, 64, 1000])
@pytest.mark.parametrize("top_n", [1, 5, 1000])
def test_blocks_give_what_the_whole_matrix_gives(block_rows, top_n):
    rng = np.random.default_rng(3)
    # 60 individuals of 1 to 4 photos in clusters; some enrolled twice (a second individual of the same cluster)
    centres = rng.standard_normal((45, 16))
    clusters = rng.integers(0, 45, 60)
    owners = np.repeat(np.arange(100, 160), rng.integers(1, 5, 60))
    vectors = centres[clusters[owners - 100]] + 0.35 * rng.standard_normal((len(owners), 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    shuffled = rng.permutation(len(owners))  # an individual's photos are not together in a gallery
    vectors, owners = vectors[shuffled], owners[shuffled]
    images = np.arange(1000, 1000 + len(owners))
    expected = brute_force(vectors, owners, images, 0.8, top_n)
    assert len(expected) >= min(top_n, 5)  # the case is not empty
    got = duplicate_pairs(vectors, owners, images, 0.8, top_n=top_n, block_rows=block_rows)
    assert [(p.individual_a, p.individual_b, p.image_a, p.image_b) for p in got] == \
        [(p.individual_a, p.individual_b, p.image_a, p.image_b) for p in expected]
    assert [p.cosine for p in got] == pytest.approx([p.cosine for p in expected], abs=1e-5)


def test_blocks_are_sized_to_the_memory_budget():
    assert default_block_rows(100_000, 64 * 2**20) == 167  # 167 x 100,000 float32 cosines: 64 MiB
    assert default_block_rows(10) == 10 and default_block_rows(0) == 1


@pytest.mark.parametrize("rerank", [RerankOptions(), RerankOptions(k_reciprocal=True, k1=2, k2=1)],
                         ids=["index", "k-reciprocal state"])
def test_the_arrays_of_a_gallery_are_copied_out_of_it(rerank):
    galleries = Galleries(store=None, layout=lambda species: Layout("model-1", 2, rerank))
    vectors = unit([1, 0], [0, 1], [1, 0.01])
    galleries.rebuild([GalleryRow(image_id, "zebra", owner, None, vector_to_blob(vector), "model-1", True)
                       for image_id, owner, vector in zip([5, 6, 7], [1, 1, 2], vectors)], seq=4)
    arrays = galleries.arrays("zebra")
    assert arrays.seq == 4 and arrays.image_ids.tolist() == [5, 6, 7] and arrays.individual_ids.tolist() == [1, 1, 2]
    np.testing.assert_array_equal(arrays.vectors, vectors)
    arrays.vectors[:] = 0  # a copy: the gallery keeps its vectors
    assert galleries.arrays("zebra").vectors[0, 0] == 1
    pairs = duplicate_pairs(galleries.arrays("zebra").vectors, arrays.individual_ids, arrays.image_ids, 0.7)
    assert [(p.individual_a, p.individual_b, p.image_a, p.image_b) for p in pairs] == [(1, 2, 5, 7)]
    empty = galleries.arrays("lion")
    assert empty.vectors.shape == (0, 0) and empty.image_ids.size == 0
