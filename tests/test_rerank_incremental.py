"""OnlineKReciprocal as an incremental, key-addressed state: after any sequence of adds and removes it
answers exactly as a state built at once from the remaining items; snapshots, keys and errors."""
from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reid.rerank import OnlineKReciprocal
from reid.rerank import kreciprocal, online

DIM = 12


def unit_rows(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


def clustered_pool(seed: int = 0, identities: int = 9, views: int = 4) -> np.ndarray:
    """Noisy views of a few identities, plus exact duplicates of two of them: duplicates tie exactly,
    which is what the key tie rule and the bit-exact arithmetic are for."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((identities, DIM)))
    noise = 0.6 * rng.standard_normal((identities * views, DIM)) / np.sqrt(DIM)
    noisy = unit_rows(np.repeat(centres, views, axis=0) + noise)
    return np.vstack([noisy, noisy[[3, 17]]])


POOL = clustered_pool()
# Keys unrelated to pool order (negative ones too), so "sorted by key" is a real permutation.
KEYS = (np.random.default_rng(1).permutation(len(POOL)) * 37 - 500).astype(np.int64)
QUERIES = np.vstack([  # near three views, an exact copy of a duplicated item, and two anywhere
    unit_rows(POOL[[0, 9, 21]] + 0.3 * np.random.default_rng(2).standard_normal((3, DIM)) / np.sqrt(DIM)),
    POOL[[17]], unit_rows(np.random.default_rng(3).standard_normal((2, DIM)))])
SETTINGS = [(20, 6, 0.3), (4, 3, 0.5), (2, 8, 0.0), (1, 1, 1.0), (6, 2, 0.3), (3, 1, 0.0)]


def built_at_once(members: set[int], k1: int, k2: int, lambda_value: float) -> OnlineKReciprocal:
    """The reference: the remaining vectors sorted by key, built in one go."""
    chosen = np.array(sorted(members, key=lambda i: KEYS[i]), dtype=np.int64)
    return OnlineKReciprocal(POOL[chosen], k1, k2, lambda_value, keys=KEYS[chosen], dim=DIM)


def encoded_lists(state: OnlineKReciprocal) -> dict[int, list[tuple[int, float]]]:
    """White-box: each key's list entries that the encoding reads, as (key, distance). The invariant
    behind exactness is that these equal those of a state built at once."""
    width = min(max(state.k1 + 1, state.k2), len(state))
    lists = {}
    for key, slot in zip(state._sorted_keys, state._sorted_slots):
        ids = state._lists.ids[slot, :width]
        lists[int(key)] = list(zip(state._slot_keys[ids].tolist(), state._lists.distances[slot, :width].tolist()))
    return lists


def assert_same_answers(state: OnlineKReciprocal, reference: OnlineKReciprocal) -> None:
    assert len(state) == len(reference)
    np.testing.assert_array_equal(state.keys, reference.keys)
    assert encoded_lists(state) == encoded_lists(reference)
    if len(reference) == 0:
        with pytest.raises(ValueError, match="empty"):
            state.rerank(QUERIES)
        return
    for candidates in (len(POOL), 3):
        got, expected = state.rerank(QUERIES, candidates), reference.rerank(QUERIES, candidates)
        np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[2], expected[2])
    for got, expected in zip(state.search(QUERIES, len(POOL)), reference.search(QUERIES, len(POOL))):
        np.testing.assert_array_equal(got, expected)


@contextlib.contextmanager
def tight_budgets():
    """No spare list entries (every removal from a list refills it), compaction of slots and of the
    V buffer as soon as anything is free, and every chunked loop split into tiny pieces: the paths a
    large gallery rarely takes. The reference is built with the defaults, so this also checks that
    no value depends on how work was batched."""
    with mock.patch.multiple(online, SPARE_NEIGHBOURS=0, COMPACT_MIN_FREE=0, POOL_GARBAGE_MIN=0, SCAN_ELEMENTS=1,
                             ENCODE_ROWS=3, SEARCH_ROWS=2, READ_BYTES=7), \
            mock.patch.object(kreciprocal, "PAIR_CHUNK", 5):
        yield


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parameters=st.sampled_from(SETTINGS), tight=st.booleans(), data=st.data())
def test_any_sequence_of_adds_and_removes_equals_building_at_once(parameters, tight, data):
    """Random adds, removes and re-adds (restores), checked after every step, on galleries from 0 to
    38 items: smaller than k1 + 1 for k1 = 20, removals down to 1 and 0 items included."""
    k1, k2, lambda_value = parameters
    budgets = tight_budgets if tight else contextlib.nullcontext
    members = data.draw(st.sets(st.integers(0, len(POOL) - 1)), label="initial")
    initial = np.array(sorted(members), dtype=np.int64)  # pool order: keys arrive unsorted
    with budgets():
        state = OnlineKReciprocal(POOL[initial], k1, k2, lambda_value, keys=KEYS[initial], dim=DIM)
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        absent = sorted(set(range(len(POOL))) - members)
        if members and (not absent or data.draw(st.booleans(), label="remove")):
            everything = data.draw(st.booleans(), label="remove all") if len(members) <= 3 else False
            leaving = set(members) if everything else data.draw(
                st.sets(st.sampled_from(sorted(members)), min_size=1, max_size=min(len(members), 12)), label="leaving")
            with budgets():
                state.remove(KEYS[sorted(leaving)])
            members -= leaving
        else:
            joining = data.draw(st.sets(st.sampled_from(absent), min_size=1, max_size=min(len(absent), 5)),
                                label="joining")
            order = np.array(sorted(joining), dtype=np.int64)
            with budgets():
                state.add(POOL[order], KEYS[order])
            members |= joining
        assert_same_answers(state, built_at_once(members, k1, k2, lambda_value))


@pytest.mark.parametrize("k1, k2", [(20, 6), (4, 3), (1, 1)])
def test_removing_down_to_one_and_none_then_restoring(k1, k2):
    everything = set(range(len(POOL)))
    state = built_at_once(everything, k1, k2, 0.3)
    rng = np.random.default_rng(4)
    members = set(everything)
    for leaving in np.array_split(rng.permutation(len(POOL)), [20, 30, 37]):  # 38 -> 18 -> 8 -> 1 -> 0
        state.remove(KEYS[leaving])
        members -= set(leaving.tolist())
        assert_same_answers(state, built_at_once(members, k1, k2, 0.3))
    for joining in np.array_split(rng.permutation(len(POOL)), [1, 2, 15]):
        state.add(POOL[joining], KEYS[joining])
        members |= set(joining.tolist())
        assert_same_answers(state, built_at_once(members, k1, k2, 0.3))


def test_an_exact_tie_at_a_lists_end_goes_to_the_lower_key():
    """A newcomer identical to a list's last entry but with a lower key takes its place."""
    far = unit_rows(np.eye(DIM)[2:8] + 0.01)
    a, b = unit_rows(np.eye(DIM)[:1] + 0.3 * np.eye(DIM)[1:2]), unit_rows(np.eye(DIM)[:1])
    with tight_budgets():  # lists exactly k1 + 1 = 2 long
        state = OnlineKReciprocal(np.vstack([a, b, far]), k1=1, k2=1, keys=[10, 20, 30, 31, 32, 33, 34, 35])
        state.add(b, [15])
        assert encoded_lists(state)[10] == [(10, pytest.approx(0.0, abs=1e-6)), (15, encoded_lists(state)[10][1][1])]
        reference = OnlineKReciprocal(np.vstack([a, b, b, far]), k1=1, k2=1, keys=[10, 15, 20, 30, 31, 32, 33, 34, 35])
    assert encoded_lists(state) == encoded_lists(reference)


def test_a_larger_gallery_stays_exact_and_updates_stay_local():
    """1,500 items, 60 single adds and 60 single removes (refills and reused slots included): the
    answers equal a fresh build, and no update rewrites more than a small share of the V rows."""
    rng = np.random.default_rng(5)
    centres = unit_rows(rng.standard_normal((300, 32)))
    vectors = unit_rows(np.repeat(centres, 5, axis=0) + rng.standard_normal((1500, 32)) / np.sqrt(32))
    queries = unit_rows(centres[:20] + rng.standard_normal((20, 32)) / np.sqrt(32))
    keys = rng.choice(10 ** 6, 1500, replace=False).astype(np.int64)
    state = OnlineKReciprocal(vectors[:1400], keys=keys[:1400])
    written = []
    original_write = online.RowPool.write

    def counting_write(pool, rows, owner, columns, values):
        written[-1] += len(rows)
        original_write(pool, rows, owner, columns, values)

    with mock.patch.object(online.RowPool, "write", counting_write):
        for i in range(1400, 1460):
            written.append(0)
            state.add(vectors[i:i + 1], keys[i:i + 1])
        for key in rng.choice(keys[:1460], 60, replace=False):
            written.append(0)
            state.remove([key])
    assert max(written) < 0.05 * len(state)
    present = np.isin(keys, state.keys)
    order = np.argsort(keys[present])
    fresh = OnlineKReciprocal(vectors[present][order], keys=keys[present][order])
    got, expected = state.rerank(queries), fresh.rerank(queries)
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got[1], expected[1])


def test_keys_membership_and_vectors():
    state = OnlineKReciprocal(POOL[:10], k1=4, k2=2, keys=KEYS[:10])
    np.testing.assert_array_equal(state.keys, np.sort(KEYS[:10]))
    assert state.keys.dtype == np.int64 and len(state) == 10
    assert KEYS[3] in state and KEYS[20] not in state and "x" not in state and 1.5 not in state
    np.testing.assert_array_equal(state.vectors_of(KEYS[[7, 2]]), POOL[[7, 2]])
    state.remove(KEYS[[2]])
    assert KEYS[2] not in state and len(state) == 9
    with pytest.raises(ValueError, match=str(KEYS[2])):
        state.vectors_of(KEYS[[2]])
    assert OnlineKReciprocal(POOL[:3]).keys.tolist() == [0, 1, 2]


def test_search_is_exact_cosine_top_k_with_ties_to_the_lower_key():
    gallery = np.vstack([POOL[:5], POOL[[1, 1]]])  # three copies of POOL[1]
    keys = np.array([50, 40, 30, 20, 10, 45, 5])
    state = OnlineKReciprocal(gallery, k1=3, k2=2, keys=keys)
    cosines, found = state.search(POOL[[1]], 4)
    assert found[0, :3].tolist() == [5, 40, 45]
    expected = gallery.astype(np.float64) @ POOL[1].astype(np.float64)
    np.testing.assert_allclose(cosines[0], np.sort(expected)[::-1][:4], rtol=0, atol=1e-12)
    assert state.search(POOL[[1]], 100)[1].shape == (1, 7)


def test_rerank_returns_each_candidates_raw_cosine():
    state = OnlineKReciprocal(POOL, k1=6, k2=3, keys=KEYS)
    distances, keys, cosines = state.rerank(QUERIES, candidates=10)
    assert distances.shape == keys.shape == cosines.shape == (len(QUERIES), 10)
    assert np.all(np.diff(distances, axis=1) >= 0)
    exact = QUERIES.astype(np.float64) @ POOL.astype(np.float64).T
    position = {key: i for i, key in enumerate(KEYS)}
    for row in range(len(QUERIES)):
        np.testing.assert_allclose(cosines[row], exact[row, [position[k] for k in keys[row]]], rtol=0, atol=1e-12)
        # the candidates are the plain top 10, re-ordered
        assert set(keys[row]) == set(state.search(QUERIES[row:row + 1], 10)[1][0])


@pytest.mark.parametrize("compressed, budgets", [(False, contextlib.nullcontext), (True, contextlib.nullcontext),
                                                 (False, tight_budgets)])
def test_save_and_load_give_the_same_state(tmp_path, compressed, budgets):
    state = built_at_once(set(range(30)), 6, 3, 0.4)
    state.remove(KEYS[[4, 9]])  # free slots: the snapshot is compacted
    path = tmp_path / "gallery.npz"
    state.save(path, compressed=compressed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.npz"]  # no temporary left behind
    with budgets():
        loaded = OnlineKReciprocal.load(path)
    assert (loaded.k1, loaded.k2, loaded.lambda_value) == (6, 3, 0.4)
    assert_same_answers(loaded, state)
    for copy in (state, loaded):  # both go on identically
        copy.add(POOL[30:], KEYS[30:])
        copy.remove(KEYS[[0, 31]])
    assert_same_answers(loaded, state)
    assert_same_answers(loaded, built_at_once(set(range(len(POOL))) - {0, 4, 9, 31}, 6, 3, 0.4))


def test_an_empty_state_saves_loads_and_grows(tmp_path):
    state = OnlineKReciprocal(dim=DIM, k1=4, k2=2)
    assert len(state) == 0 and state.dim == DIM
    state.save(tmp_path / "empty.npz")
    loaded = OnlineKReciprocal.load(tmp_path / "empty.npz")
    assert len(loaded) == 0 and loaded.dim == DIM
    loaded.add(POOL[:5], KEYS[:5])
    assert_same_answers(loaded, built_at_once(set(range(5)), 4, 2, 0.3))


def test_load_rejects_other_and_damaged_files(tmp_path):
    np.savez(tmp_path / "other.npz", vectors=POOL)
    (tmp_path / "text.npz").write_text("not a zip archive")
    for name in ("other.npz", "text.npz"):
        with pytest.raises(ValueError, match="OnlineKReciprocal snapshot"):
            OnlineKReciprocal.load(tmp_path / name)
    path = tmp_path / "damaged.npz"
    built_at_once(set(range(20)), 4, 2, 0.3).save(path, compressed=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the compressed vectors: a bad CRC or a broken stream
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        OnlineKReciprocal.load(path)
    with pytest.raises(OSError):
        OnlineKReciprocal.load(tmp_path / "missing.npz")


def test_bad_updates_are_clear_value_errors():
    state = OnlineKReciprocal(POOL[:10], keys=KEYS[:10])
    with pytest.raises(ValueError, match=f"already in the gallery: \\[{KEYS[3]}\\]"):
        state.add(POOL[10:12], [KEYS[3], KEYS[10]])
    with pytest.raises(ValueError, match="duplicate keys"):
        state.add(POOL[10:12], [7, 7])
    with pytest.raises(ValueError, match="expected 2 keys"):
        state.add(POOL[10:12], [7])
    with pytest.raises(ValueError, match="integers"):
        state.add(POOL[10:12], [7.0, 8.0])
    with pytest.raises(ValueError, match="not in the gallery: \\[123456\\]"):
        state.remove([KEYS[0], 123456])
    with pytest.raises(ValueError, match="dimensions do not match"):
        state.add(unit_rows(np.ones((1, DIM + 1))), [1])
    with pytest.raises(ValueError, match="L2-normalised"):
        state.add(2 * POOL[10:11], [1])
    assert len(state) == 10  # nothing above changed the state
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        state.rerank(QUERIES, candidates=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        state.search(QUERIES, 0)


def test_bad_construction_is_a_clear_value_error():
    with pytest.raises(ValueError, match="needs dim"):
        OnlineKReciprocal()
    with pytest.raises(ValueError, match="k1 must be >= 1"):
        OnlineKReciprocal(POOL, k1=0)
    with pytest.raises(ValueError, match="k2 must be >= 1"):
        OnlineKReciprocal(POOL, k2=0)
    with pytest.raises(ValueError, match="lambda_value"):
        OnlineKReciprocal(POOL, lambda_value=-0.1)
    with pytest.raises(ValueError, match="duplicate keys"):
        OnlineKReciprocal(POOL[:3], keys=[1, 2, 1])
    with pytest.raises(ValueError, match="dimensions do not match"):
        OnlineKReciprocal(POOL, dim=DIM + 1)
    with pytest.raises(ValueError, match="empty"):
        OnlineKReciprocal(dim=DIM).rerank(QUERIES)
