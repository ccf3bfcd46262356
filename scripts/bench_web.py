"""Review app benchmark: a page of 50 individuals, loaded as a browser loads it.

    python scripts/bench_web.py                    # 50 individuals, two 1600 x 1200 photos each (left, right)
    python scripts/bench_web.py --photo-size 800   # a quick look

A server (`reid serve`, a random-init model: the page does not run it) gets 50 individuals enrolled
through the API, each with a left and a right flank photo. A page load is GET /individuals, then every
thumbnail it shows (two per individual), six at a time as a browser fetches them:

  * cold_ms: the first load, which makes each thumbnail from its photo and caches it;
  * warm_ms: later loads (median of --rounds), served from the cache (target < 1000 ms on 2 cores);
  * api_ms: the API's own listing of the same 50 individuals (GET /v1/individuals, median), the
    reference measured in the same run: `warm_ratio` = warm_ms / api_ms.

The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.checkpoint import save_random_backbone  # noqa: E402
from reid.data.synth import make_synthetic_dataset  # noqa: E402

BROWSER_CONNECTIONS = 6  # what browsers open per host


def page_load(client, url: str) -> tuple[float, int]:
    """Seconds to fetch the individuals page and every thumbnail on it; and how many thumbnails."""
    started = time.perf_counter()
    html = client.get(f"{url}/individuals")
    html.raise_for_status()
    thumbs = re.findall(r'src="(/photos/\d+/thumb)"', html.text)
    with ThreadPoolExecutor(BROWSER_CONNECTIONS) as pool:
        for response in pool.map(lambda path: client.get(url + path), thumbs):
            response.raise_for_status()
    return time.perf_counter() - started, len(thumbs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--individuals", type=int, default=50)
    parser.add_argument("--photo-size", type=int, default=1600, help="longest side of the synthetic photos")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    import httpx

    from reid.store import Store
    from service.testing import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = save_random_backbone(tmp / "best.pt", "mobilenetv2_100", 64, 16)
        csv = make_synthetic_dataset(tmp / "photos", identities=args.individuals, images_per_identity=2, seed=0,
                                     image_size=args.photo_size, progress=False)
        photos = sorted((csv.parent / "images").rglob("*.jpg"))
        store_dir = tmp / "store"
        store = Store(f"sqlite:///{store_dir / 'wildreid.db'}")
        key = store.create_key("bench")[1]
        store.close()
        with ServerProcess(store_dir, checkpoint) as server, httpx.Client(timeout=120) as client:
            for i in range(args.individuals):
                left, right = photos[2 * i], photos[2 * i + 1]
                made = client.post(f"{server.url}/v1/individuals", headers={"Authorization": f"Bearer {key}"},
                                   data={"name": f"ind-{i:03d}", "species": "zebra", "viewpoint": ["left", "right"]},
                                   files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in (left, right)])
                made.raise_for_status()
            cold, thumbs = page_load(client, server.url)
            warm = [page_load(client, server.url)[0] for _ in range(args.rounds)]
            api = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                client.get(f"{server.url}/v1/individuals", params={"per_page": args.individuals}).raise_for_status()
                api.append(time.perf_counter() - started)
    figures = {"individuals": args.individuals, "thumbnails": thumbs, "photo_size": args.photo_size,
               "cold_ms": round(1000 * cold, 1), "warm_ms": round(1000 * statistics.median(warm), 1),
               "warm_p90_ms": round(1000 * sorted(warm)[int(0.9 * (len(warm) - 1))], 1),
               "api_ms": round(1000 * statistics.median(api), 1)}
    figures["warm_ratio"] = round(figures["warm_ms"] / figures["api_ms"], 2)
    figures["target_met"] = figures["warm_ms"] < 1000
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
