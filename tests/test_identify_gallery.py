"""Galleries re-ranked online: kept in step with the store, they answer what re-ranking offline answers."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reid.errors import ConfigError, ReidError
from reid.evaluation.evaluate import RerankOptions
from reid.identify.gallery import Galleries, Layout, choose_rerank, individuals_of
from reid.rerank import OnlineKReciprocal
from reid.store import NewImage, Store, blob_to_vector

DIM = 8
RERANK = RerankOptions(k_reciprocal=True, k1=4, k2=2, lambda_value=0.3)
LAYOUT = Layout("m", DIM, RERANK, "settings", candidates=20)
VIEWPOINTS = ("left", "right", None)


def unit(rng: np.random.Generator, centre: np.ndarray, noise: float = 0.6) -> np.ndarray:
    v = centre + noise * rng.standard_normal(DIM) / np.sqrt(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


class World:
    """A store of one species whose individuals' photos cluster around their own centre."""

    def __init__(self, url: str, seed: int):
        self.store, self.rng = Store(url), np.random.default_rng(seed)
        self.centres: dict[int, np.ndarray] = {}
        self.images = 0

    def photos(self, centre: np.ndarray, count: int) -> list[NewImage]:
        """`count` photos of an individual, showing either flank or one not recorded."""
        out = []
        for _ in range(count):
            self.images += 1
            out.append(NewImage(f"{self.images:064x}", f"images/{self.images}.jpg", "image/jpeg", 8, 8, 100,
                                unit(self.rng, centre), viewpoint=VIEWPOINTS[self.images % len(VIEWPOINTS)]))
        return out

    def live(self) -> list[int]:
        _, rows = self.store.gallery_rows(None)
        return sorted({r.individual_id for r in rows})

    def apply(self, op: str, pick: int, count: int) -> None:
        live, every = self.live(), sorted(self.centres)
        if op == "enroll" or not live:
            centre = self.rng.standard_normal(DIM)
            made = self.store.enroll(f"ind{len(self.centres)}", "zebra", self.photos(centre, count), "m", "k")
            self.centres[made["individual_id"]] = centre
        elif op == "sighting":
            target = live[pick % len(live)]
            self.store.add_sighting(target, self.photos(self.centres[target], count), "m", "k")
        elif op == "merge" and len(live) > 1:
            target, source = live[pick % len(live)], live[(pick + 1) % len(live)]
            self.store.merge(target, source, "k")
        elif op == "delete":
            self.store.set_deleted(live[pick % len(live)], True, "k")
        elif op == "restore":
            deleted = [i for i in every if i not in live and self.store.get_individual(i)["merged_into"] is None]
            if deleted:
                self.store.set_deleted(deleted[pick % len(deleted)], False, "k")

    def offline(self, query: np.ndarray, top_k: int) -> list:
        """The answer of re-ranking built at once from the store's visible images (the reference)."""
        _, rows = self.store.gallery_rows(None)
        rows = sorted(rows, key=lambda r: r.image_id)
        vectors = np.stack([blob_to_vector(r.embedding) for r in rows])
        state = OnlineKReciprocal(vectors, k1=RERANK.k1, k2=RERANK.k2, lambda_value=RERANK.lambda_value,
                                  keys=np.array([r.image_id for r in rows]))
        distances, keys, cosines = state.rerank(query[None, :], candidates=min(len(rows), LAYOUT.candidates))
        hits = [(int(k), 1.0 - float(d), float(c)) for d, k, c in zip(distances[0], keys[0], cosines[0])]
        return individuals_of(hits, {r.image_id: r.individual_id for r in rows},
                              {r.image_id: r.viewpoint for r in rows}, top_k)


OPS = st.lists(st.tuples(st.sampled_from(["enroll", "sighting", "merge", "delete", "restore"]),
                         st.integers(0, 50), st.integers(1, 3)), min_size=1, max_size=14)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, seed=st.integers(0, 1000))
def test_reranked_answers_equal_offline_reranking_after_any_curation(tmp_path_factory, ops, seed):
    world = World(f"sqlite:///{tmp_path_factory.mktemp('store') / 'wildreid.db'}", seed)
    galleries = Galleries(world.store, lambda species: LAYOUT)
    galleries.rebuild()
    for op in ops:
        world.apply(*op)
        galleries.sync()  # as the service does after each write: incremental updates
    restarted = Galleries(world.store, lambda species: LAYOUT)
    restarted.rebuild()
    if not world.live():
        assert galleries.search("zebra", unit(world.rng, np.ones(DIM)), 3) == []
        return
    for centre in [*world.centres.values(), world.rng.standard_normal(DIM)]:
        query = unit(world.rng, centre)
        expected = world.offline(query, 3)
        assert galleries.search("zebra", query, 3) == expected
        assert restarted.search("zebra", query, 3) == expected
    world.store.close()


@pytest.mark.parametrize("layout", [Layout("m", DIM), LAYOUT], ids=["cosine", "reranked"])
def test_each_image_keeps_its_viewpoint_through_merge_delete_and_restore(tmp_path, layout):
    """A candidate says the flank of its best image: the one recorded with it, wherever merges, deletes,
    restores, a restart or a re-ranking snapshot have taken the image since."""
    world = World(f"sqlite:///{tmp_path / 'wildreid.db'}", seed=3)
    left, right = world.rng.standard_normal(DIM), world.rng.standard_normal(DIM)
    a = world.store.enroll("A", "zebra", [NewImage("a" * 64, "images/a.jpg", "image/jpeg", 8, 8, 100,
                                                   unit(world.rng, left, 0.0), viewpoint="left")], "m", "k")
    b = world.store.enroll("B", "zebra", [NewImage("b" * 64, "images/b.jpg", "image/jpeg", 8, 8, 100,
                                                   unit(world.rng, right, 0.0), viewpoint="right")], "m", "k")
    a, b = a["individual_id"], b["individual_id"]
    galleries = Galleries(world.store, lambda species: layout, snapshot_dir=tmp_path / "snapshots")
    galleries.rebuild()

    def flanks(query: np.ndarray) -> list[tuple[int, str | None, list[str | None]]]:
        return [(c.individual_id, c.viewpoint, [i.viewpoint for i in c.images])
                for c in galleries.search("zebra", unit(world.rng, query, 0.0), 2)]

    assert flanks(right) == [(b, "right", ["right"]), (a, "left", ["left"])]
    world.store.merge(a, b, "k")  # B's right flank is now A's
    galleries.sync()
    assert flanks(right) == [(a, "right", ["right", "left"])]
    assert flanks(left) == [(a, "left", ["left", "right"])]
    world.store.set_deleted(a, True, "k")
    galleries.sync()
    assert flanks(right) == []
    world.store.set_deleted(a, False, "k")
    galleries.sync()
    assert flanks(right) == [(a, "right", ["right", "left"])]
    galleries.save_snapshots()
    restarted = Galleries(world.store, lambda species: layout, snapshot_dir=tmp_path / "snapshots")
    restarted.rebuild()  # from the snapshot when re-ranked
    assert restarted.search("zebra", unit(world.rng, right, 0.0), 2) == galleries.search(
        "zebra", unit(world.rng, right, 0.0), 2)
    world.store.close()


def test_reranking_changes_the_answer_where_the_nearest_image_misleads(tmp_path):
    """The trap of tests/test_rerank.py in a store: the nearest image is another individual's outlier, the
    k-reciprocal structure points at the right one; plain cosine answers the outlier's owner."""
    from tests.test_rerank import trap

    query, gallery = trap(np.eye(32, dtype=np.float32))
    store = Store(f"sqlite:///{tmp_path / 'wildreid.db'}")
    owner_of = {}
    seed = 0

    def photos(rows):
        nonlocal seed
        out = []
        for row in rows:
            seed += 1
            out.append(NewImage(f"{seed:064x}", f"images/{seed}.jpg", "image/jpeg", 8, 8, 100, row))
        return out

    distractor_cluster = store.enroll("cluster", "zebra", photos([gallery[0], *gallery[5:]]), "m", "k")
    truth = store.enroll("truth", "zebra", photos(gallery[1:5]), "m", "k")
    owner_of.update(cluster=distractor_cluster["individual_id"], truth=truth["individual_id"])
    options = RerankOptions(k_reciprocal=True, k1=5, k2=3, lambda_value=0.3)
    firsts = {}
    for layout, expected in [(Layout("m", 32), "cluster"), (Layout("m", 32, options, "settings"), "truth")]:
        galleries = Galleries(store, lambda species, layout=layout: layout)
        galleries.rebuild()
        firsts[expected] = galleries.search("zebra", query, 2)[0]
        assert firsts[expected].individual_id == owner_of[expected]
    # each answer gives the raw cosine beside its ranking score: the re-ranked first is the less similar one
    assert firsts["cluster"].score == firsts["cluster"].cosine
    assert firsts["truth"].cosine < firsts["cluster"].cosine and firsts["truth"].score != firsts["truth"].cosine


def test_reranking_settings_come_from_the_checkpoint_or_the_settings_and_can_be_turned_off():
    chosen = {"tta": "none", "rerank": {"dba": 0, "qe": 2, "qe_alpha": 3.0, "k_reciprocal": True, "k1": 10, "k2": 3,
                                         "lambda_value": 0.3}}
    options, source = choose_rerank("checkpoint", chosen, RerankOptions())
    assert (options.k1, options.qe, source) == (10, 2, "checkpoint")
    assert choose_rerank("checkpoint", None, RerankOptions())[0] == RerankOptions()
    assert choose_rerank("off", chosen, RerankOptions())[0] == RerankOptions()
    configured = RerankOptions(k_reciprocal=True, k1=7)
    assert choose_rerank("settings", chosen, configured) == (configured, "settings")
    with pytest.raises(ConfigError, match="k1 0"):
        choose_rerank("settings", None, RerankOptions(k_reciprocal=True, k1=0))
    with pytest.raises(ConfigError, match="lambda 1.5"):
        choose_rerank("checkpoint", {"rerank": {**chosen["rerank"], "lambda_value": 1.5}}, RerankOptions())
    with pytest.raises(ReidError, match="use one of"):
        choose_rerank("sometimes", None, RerankOptions())


@pytest.mark.parametrize("layout", [Layout("m", DIM), LAYOUT], ids=["cosine", "reranked"])
def test_concurrent_searches_are_answered_together_as_each_would_be_alone(tmp_path, monkeypatch, layout):
    """Queries waiting for the galleries' lock are searched in one batch per species and top_k by whoever takes
    it; each gets the answer it would get alone, and a query that fails (a vector of the wrong size) fails
    its own batch only."""
    import threading
    import time

    from reid.identify.gallery import SpeciesGallery

    world = World(f"sqlite:///{tmp_path / 'wildreid.db'}", seed=5)
    for _ in range(6):
        world.apply("enroll", 0, 3)
    galleries = Galleries(world.store, lambda species: layout)
    galleries.rebuild()
    queries = [unit(world.rng, centre) for centre in world.centres.values()]
    alone = [galleries.search("zebra", query, 3) for query in queries]
    batches = []
    search = SpeciesGallery.search
    monkeypatch.setattr(SpeciesGallery, "search",
                        lambda self, vectors, top_k: batches.append(len(vectors)) or search(self, vectors, top_k))
    asked = [("zebra", q, 3) for q in queries] + [("zebra", queries[0], 1), ("zebra", np.ones(DIM + 1, np.float32), 2)]
    answers: list = [None] * len(asked)

    def ask(n):
        try:
            answers[n] = galleries.search(*asked[n])
        except Exception as exc:  # noqa: BLE001 - the test looks at what each caller got
            answers[n] = exc

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(asked))]
    with galleries.lock:  # everyone queues behind a search in progress
        for thread in threads:
            thread.start()
        while len(galleries._queue) < len(asked):
            time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert sorted(batches) == [1, 1, len(queries)]  # one pass for the six top-3 queries
    assert answers[:len(queries)] == alone
    assert answers[len(queries)] == alone[0][:1]
    assert isinstance(answers[-1], Exception) and str(DIM) in str(answers[-1])
    world.store.close()
