"""Which re-ID model identifies which species: a routing config from species to checkpoint.

    species:
      spotted-cat: {checkpoint: runs/cats/fold_0/best.pt}
      striped-antelope: {checkpoint: runs/antelope/best.pt, tta: hflip, match_threshold: 0.8}
      zebra: runs/zebra/best.pt            # shorthand for {checkpoint: ...}

A checkpoint may be a best.pt or its ONNX export (`reid export`, a .onnx file); relative checkpoint
paths start at the routes file's folder. Species names are compared normalised
(reid/species/names.py: `Spotted-Cat` routes the store's `spotted-cat`). A species that is not
listed has no re-ID model: its animals get a species-only answer. Each route may set `tta` (none,
hflip, flip4; default none) and `match_threshold` / `new_threshold` (default: the checkpoint's
calibration from `reid calibrate`, else the defaults; resolved by reid/identify/decision.py).
Checkpoints are loaded when a species first needs one, and routes that name the same checkpoint
and TTA share one `Embedder`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from reid.errors import ConfigError
from reid.identify.decision import DEFAULT_THRESHOLDS, check_threshold, resolve_thresholds
from reid.species.names import normalise_species

TOP_KEYS = {"species"}
ROUTE_KEYS = {"checkpoint", "tta", "match_threshold", "new_threshold"}
TTA_CHOICES = ("none", "hflip", "flip4")


@dataclass
class Route:
    """One species' re-ID model. `embedder`, `thresholds` and `fingerprint` load the checkpoint on first use."""
    species: str
    checkpoint: Path
    tta: str | None = None  # None: the TTA `reid calibrate` chose for the checkpoint, else none
    match_threshold: float | None = None
    new_threshold: float | None = None
    router: "Router | None" = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str | None]:
        """Routes with the same key share an Embedder."""
        return str(self.checkpoint.resolve()), self.tta

    @property
    def embedder(self):
        return self._router.embedder(self)

    @property
    def fingerprint(self) -> str:
        return self.embedder.fingerprint

    @property
    def thresholds(self) -> dict:
        return self._router.thresholds(self)[0]

    @property
    def threshold_source(self) -> str:
        """`route` (set in the routes file), `checkpoint` (its calibration) or `default`."""
        return self._router.thresholds(self)[1]

    @property
    def _router(self) -> "Router":
        if self.router is None:
            raise RuntimeError(f"route of '{self.species}' was made outside a Router")
        return self.router


class Router:
    """`route(species)`: that species' Route, or None when no re-ID model is configured for it."""

    def __init__(self, mapping: Mapping[str, Any], source: str = "routes", base: str | Path | None = None,
                 defaults: Mapping[str, float] | None = None, defaults_source: str = "default"):
        """`mapping` is the routes file's content ({"species": {...}}), or directly {species: route};
        `defaults` are the thresholds of routes whose checkpoint holds no calibration, reported as
        coming from `defaults_source`."""
        self.source = str(source)
        self.defaults = dict(defaults or DEFAULT_THRESHOLDS)
        self.defaults_source = defaults_source
        base = Path(base) if base is not None else Path.cwd()
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{self.source}: must be a mapping with a 'species' key, not {type(mapping).__name__}")
        if "species" in mapping and isinstance(mapping["species"], Mapping):
            unknown = sorted(set(mapping) - TOP_KEYS)
            if unknown:
                raise ConfigError(f"{self.source}: unknown key '{unknown[0]}'; a routes file has only "
                                  f"{', '.join(sorted(TOP_KEYS))}")
            mapping = mapping["species"]
        if not mapping:
            raise ConfigError(f"{self.source}: 'species' names no species; give species: {{NAME: "
                              "{checkpoint: PATH}}")
        self.routes: dict[str, Route] = {}
        for name, entry in mapping.items():
            route = self._route(name, entry, base)
            if route.species in self.routes:
                raise ConfigError(f"{self.source}: species '{name}' and another name both mean "
                                  f"'{route.species}' (species names are compared in lower case)")
            self.routes[route.species] = route
        self._embedders: dict[tuple[str, str], Any] = {}
        self._thresholds: dict[str, tuple[dict, str]] = {}

    @classmethod
    def from_file(cls, path: str | Path, defaults: Mapping[str, float] | None = None,
                  defaults_source: str = "default") -> "Router":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"routes file '{path}' not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if not isinstance(data, Mapping) or "species" not in data:
            raise ConfigError(f"{path}: a routes file is a mapping with a 'species' key: species: {{NAME: "
                              "{checkpoint: PATH}}")
        if not isinstance(data["species"], Mapping):
            raise ConfigError(f"{path}: species: must map species names to routes, not "
                              f"{type(data['species']).__name__}")
        return cls(data, source=str(path), base=path.parent, defaults=defaults, defaults_source=defaults_source)

    @classmethod
    def single(cls, checkpoint: str | Path, species: str, tta: str | None = None) -> "Router":
        """The one-species shortcut (`--checkpoint CKPT --species NAME`)."""
        if not species or not str(species).strip():
            raise ConfigError("--checkpoint needs --species NAME: the species its model identifies")
        if not Path(checkpoint).is_file():
            raise ConfigError(f"--checkpoint: checkpoint '{checkpoint}' not found")
        return cls({str(species).strip(): {"checkpoint": str(checkpoint), "tta": tta}}, source="--checkpoint")

    def _route(self, name: Any, entry: Any, base: Path) -> Route:
        at = f"{self.source}: species.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{self.source}: species names must be non-empty strings, got {name!r}")
        try:
            species = normalise_species(name)
        except ValueError as exc:
            raise ConfigError(f"{at}: {exc}") from None
        if isinstance(entry, (str, Path)):
            entry = {"checkpoint": str(entry)}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{at}: must be a mapping such as {{checkpoint: PATH}}, not {entry!r}")
        unknown = sorted(set(map(str, entry)) - ROUTE_KEYS)
        if unknown:
            raise ConfigError(f"{at}: unknown key '{unknown[0]}'; a route has {', '.join(sorted(ROUTE_KEYS))}")
        if not isinstance(entry.get("checkpoint"), str) or not entry["checkpoint"].strip():
            raise ConfigError(f"{at}: missing key 'checkpoint' (the best.pt of a `reid train` / `reid cv` run)")
        checkpoint = Path(entry["checkpoint"]).expanduser()
        if not checkpoint.is_absolute():
            checkpoint = base / checkpoint
        if not checkpoint.is_file():
            raise ConfigError(f"{at}.checkpoint: checkpoint '{checkpoint}' not found")
        tta = entry.get("tta")
        if tta is not None and tta not in TTA_CHOICES:
            raise ConfigError(f"{at}.tta: '{tta}' is not one of {', '.join(TTA_CHOICES)}")
        values = {key: check_threshold(entry.get(key), f"{at}.{key}") for key in ("match_threshold", "new_threshold")}
        if None not in values.values() and values["new_threshold"] > values["match_threshold"]:
            raise ConfigError(f"{at}: new_threshold {values['new_threshold']} is above match_threshold "
                              f"{values['match_threshold']}")
        return Route(species, checkpoint, tta, values["match_threshold"], values["new_threshold"], self)

    # ------------------------------------------------------------------ lookups
    def route(self, species: str | None) -> Route | None:
        """The route of a species, by its normalised name; None when none serves it (or the name is not
        one a species can have)."""
        try:
            return self.routes.get(normalise_species(species))
        except ValueError:
            return None

    @property
    def species(self) -> list[str]:
        return list(self.routes)

    def embedder(self, route: Route):
        """The shared Embedder of the route's checkpoint and TTA, built on first use."""
        if route.key not in self._embedders:
            from reid.embedding.embedder import Embedder

            self._embedders[route.key] = Embedder.from_checkpoint(route.checkpoint, tta=route.tta, num_workers=0)
        return self._embedders[route.key]

    def thresholds(self, route: Route) -> tuple[dict, str]:
        """(thresholds, source): the route's own values, else the checkpoint's calibration, else defaults.

        A route that sets only one of the two takes the other from the checkpoint or the defaults."""
        if route.species not in self._thresholds:
            own = {"match_threshold": route.match_threshold, "new_threshold": route.new_threshold}
            self._thresholds[route.species] = resolve_thresholds(own, self.embedder(route).thresholds, self.defaults,
                                                                 self.defaults_source,
                                                                 f"{self.source}: species.{route.species}")
        return self._thresholds[route.species]
