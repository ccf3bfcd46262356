"""`reid serve` and `reid keys`: `register(subparsers)` adds them to the `reid` command's parser.

    from service.commands import register
    COMMANDS.update(register(sub))          # in reid/cli.py, after the other sub-parsers

`python -m service serve ...` / `python -m service keys ...` run them without reid/cli.py.
Each command takes the parsed argparse namespace and raises ReidError for a user's mistake.
"""
from __future__ import annotations

import argparse
import os
import sys

from reid.errors import ReidError

TTA_CHOICES = ("none", "hflip", "flip4")


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="store folder (SQLite database and image files)")
    parser.add_argument("--database-url", help="SQLAlchemy URL of a shared database instead of the store's SQLite, "
                                               "e.g. postgresql+psycopg://user:password@host/wildreid")


def register(subparsers) -> dict:
    """Add `serve` and `keys` to an argparse sub-parsers object; return {command name: function}."""
    serve = subparsers.add_parser("serve", help="run the identification web service (FastAPI + uvicorn)")
    _add_store_args(serve)
    serve.add_argument("--checkpoint", help="training checkpoint (best.pt, or its .onnx from `reid export`) that "
                                            "embeds the photos of every species (of those --routes does not name)")
    serve.add_argument("--routes", help="routes file: a re-ID checkpoint per species (see reid/species/routing.py)")
    serve.add_argument("--detector", help="MegaDetector v6 weights (.pt): find the animals of full camera-trap "
                                          "frames (needs wildreid[detector])")
    serve.add_argument("--species-classifier", help="species.pt of `reid train-species`: tell each animal's species "
                                                    "when a request does not")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads the model)")
    serve.add_argument("--tta", choices=TTA_CHOICES, help="test-time augmentation (default: what `reid calibrate` chose for the "
                                                                 "checkpoint, else none)")
    serve.add_argument("--rerank", choices=("checkpoint", "settings", "off"),
                       help="re-ranking of the candidates: what `reid calibrate` chose for each checkpoint (default), "
                            "the rerank_* values of --settings for every species, or off")
    serve.add_argument("--require-key-for-reads", action="store_true", default=None,
                       help="identify and GET requests need an API key too")
    serve.add_argument("--batch-root", action="append", dest="batch_roots", metavar="DIR",
                       help="a folder of this server that the review app's batch jobs may read photos from (and "
                            "what is under it); repeat for several. Without it, jobs take uploaded photos only")
    serve.add_argument("--settings", help="YAML or JSON file of further settings (upload limits, thresholds, "
                                          "batching: see service/settings.py); flags win over it")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    keys = subparsers.add_parser("keys", help="API keys of a store: create (printed once), revoke, list")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; it is printed once, only its hash is stored")
    _add_store_args(create)
    create.add_argument("--name", required=True, help="who holds the key (written in the audit log)")
    revoke = keys_sub.add_parser("revoke", help="revoke the active key of this name")
    _add_store_args(revoke)
    revoke.add_argument("--name", required=True)
    listing = keys_sub.add_parser("list", help="list keys (names and dates, never the keys)")
    _add_store_args(listing)
    return {"serve": cmd_serve, "keys": cmd_keys}


def _settings(args: argparse.Namespace):
    from service.settings import build_settings, Settings

    values = {"store_dir": args.store, "checkpoint": getattr(args, "checkpoint", None),
              "routes": getattr(args, "routes", None), "detector": getattr(args, "detector", None),
              "species_classifier": getattr(args, "species_classifier", None),
              "database_url": args.database_url, "tta": getattr(args, "tta", None),
              "rerank": getattr(args, "rerank", None),
              "require_key_for_reads": getattr(args, "require_key_for_reads", None),
              "batch_roots": getattr(args, "batch_roots", None)}
    if getattr(args, "settings", None):
        return Settings.from_file(args.settings, **values)
    return build_settings(**{k: v for k, v in values.items() if v is not None})


def _is_new_store(settings) -> bool:
    """A SQLite store whose database file is not there yet (a new folder, or a mistyped --store)."""
    return settings.database_url is None and not (settings.store_dir / "wildreid.db").is_file()


def _store(args: argparse.Namespace):
    """The store of --store; only `keys create` starts a new one: listing or revoking reads what is there."""
    from reid.store import Store

    settings = _settings(args)
    if args.keys_command != "create" and _is_new_store(settings):
        raise ReidError(f"no store at '{args.store}' (it has no wildreid.db): check --store; "
                        "`reid keys create --store DIR --name NAME` starts a new store")
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    return Store(settings.url, settings.sqlite_synchronous)


def cmd_keys(args: argparse.Namespace) -> None:
    store = _store(args)
    try:
        if args.keys_command == "create":
            row, secret = store.create_key(args.name)
            print(f"created key '{row['name']}' (id {row['id']}); it is shown only now, store it safely:",
                  file=sys.stderr)
            print(secret)
        elif args.keys_command == "revoke":
            count = store.revoke_key(args.name)
            print(f"revoked {count} key(s) named '{args.name}'")
        else:
            rows = store.list_keys()
            if not rows:
                print("no keys; create one with `reid keys create --store DIR --name NAME`")
            for row in rows:
                state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
                print(f"{row['id']}\t{row['name']}\tcreated {row['created_at']}\t{state}")
    finally:
        store.close()


def check_models(settings) -> None:
    """Clear errors now, rather than a traceback in each worker: every file the models need is there and is
    what it should be (the networks themselves load in the workers)."""
    from reid.embedding.embedder import check_model
    from reid.species.routing import Router

    if settings.checkpoint is None and settings.routes is None:
        raise ReidError("serve needs a re-ID model: --checkpoint CKPT (every species), --routes FILE (a checkpoint "
                        "per species), or both")
    checkpoints = [settings.checkpoint] if settings.checkpoint else []
    if settings.routes:
        checkpoints += [route.checkpoint for route in Router.from_file(settings.routes).routes.values()]
    for checkpoint in dict.fromkeys(checkpoints):
        check_model(checkpoint)  # a checkpoint, or its ONNX export
    for name, path in (("--detector", settings.detector), ("--species-classifier", settings.species_classifier)):
        if path is not None and not path.is_file():
            raise ReidError(f"{name}: file '{path}' not found")


def empty_store_warning(store, store_dir, new: bool) -> str | None:
    """What a user who mistyped --store, or forgot to create a key, should hear before the service starts."""
    if new:
        return (f"'{store_dir}' held no store: a new, empty one was created there (no individuals, no API keys); "
                "if you meant an existing store, stop and check --store")
    problems = []
    if not store.counts()["individuals"]:
        problems.append("no individuals (every identify answers 'new')")
    if not any(row["revoked_at"] is None for row in store.list_keys()):
        problems.append("no active API key (writes are refused; `reid keys create --store DIR --name NAME`)")
    return f"the store '{store_dir}' has " + " and ".join(problems) if problems else None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from reid.store import Store

    settings = _settings(args)
    if args.workers < 1:
        raise ReidError("--workers must be at least 1")
    check_models(settings)
    new = _is_new_store(settings)
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.url, settings.sqlite_synchronous)  # schema created once, before the workers start
    try:
        warning = empty_store_warning(store, args.store, new)
    finally:
        store.close()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    os.environ.update(settings.to_env())
    uvicorn.run("service.app:create_app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, timeout_graceful_shutdown=10,
                http="service.protocol:HeaderTimeoutProtocol")
