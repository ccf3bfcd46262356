"""`reid sweep`: cross-validated recipe search with Optuna, resumable, pruning bad trials early.

A search space is a YAML file:

    metric: mAP                 # cv_summary key to maximise (mAP, identity_balanced_mAP, top1)
    trials: 20                  # trials in all, counting those of earlier runs of the sweep
    seed: 0                     # of Optuna's TPE sampler
    baseline: true              # trial 0 is the config as it is (each parameter at its config value)
    enqueue:                    # hand-picked trials run first (any parameter left out is sampled)
      - {train.lr: 1.0e-4, train.freeze_bn: true}
    params:
      train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}
      train.freeze_bn: {choices: [false, true]}
      data.image_size: {choices: [224, 256]}
      sampler.min_batches_per_epoch: {low: 10, high: 60, step: 10}

Every trial is a `reid cv` run in `OUT/trials/<key>`, its folder named by its parameters, so a
sweep killed mid-trial re-runs that trial from its last checkpoint. Optuna's journal file
(`OUT/optuna.journal`) holds the study; each finished fold reports the running mean of the metric,
and the median pruner stops a trial whose first folds fall below the median of earlier trials.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage

from reid.config import dump_config, with_values
from reid.errors import ConfigError, ReidError
from reid.io import write_json, write_text

METRICS = ("mAP", "identity_balanced_mAP", "top1")
SPACE_KEYS = {"metric", "trials", "seed", "baseline", "enqueue", "params", "startup_trials"}
STUDY = "wildreid-sweep"


# ------------------------------------------------------------------------------------ space
def _distribution(name: str, spec: Any) -> optuna.distributions.BaseDistribution:
    if not isinstance(spec, dict):
        raise ConfigError(f"params.{name}: give {{choices: [...]}} or {{low: ..., high: ...[, log: true, step: ...]}}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"params.{name}.choices must be a non-empty list")
        return optuna.distributions.CategoricalDistribution(choices)
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"params.{name}: a range needs low and high")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ConfigError(f"params.{name}: low and high must be numbers") from None
    if low >= high:
        raise ConfigError(f"params.{name}: low ({low}) must be below high ({high})")
    integer = all(float(v).is_integer() for v in (low, high)) and (step is None or float(step).is_integer()) \
        and not isinstance(spec["low"], float)
    if integer:
        return optuna.distributions.IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return optuna.distributions.FloatDistribution(low, high, log=log, step=None if step is None else float(step))


class SearchSpace:
    """The parsed space file: parameters (dotted config keys) and how the sweep runs."""

    def __init__(self, spec: dict, cfg: dict, source: str = "space"):
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: the top level must be a mapping (metric, trials, params, ...)")
        unknown = sorted(set(spec) - SPACE_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SPACE_KEYS))}")
        self.metric = spec.get("metric", "mAP")
        if self.metric not in METRICS:
            raise ConfigError(f"{source}: metric '{self.metric}'; use one of {', '.join(METRICS)}")
        self.trials = int(spec.get("trials", 20))
        self.seed = int(spec.get("seed", 0))
        self.startup_trials = int(spec.get("startup_trials", 2))
        params = spec.get("params") or {}
        if not isinstance(params, dict) or not params:
            raise ConfigError(f"{source}: params must map config keys to their ranges or choices")
        self.distributions: dict[str, optuna.distributions.BaseDistribution] = {}
        for name, dist_spec in params.items():
            try:  # a key the config does not have is a typo: say so now, not after hours of trials
                _lookup(cfg, name)
            except (KeyError, TypeError):
                raise ConfigError(f"{source}: params.{name} is not a config key") from None
            self.distributions[name] = _distribution(name, dist_spec)
        self.enqueued = [self._checked_trial(t, source) for t in spec.get("enqueue") or []]
        if spec.get("baseline", True):
            self.enqueued.insert(0, self._checked_trial({name: _lookup(cfg, name) for name in self.distributions},
                                                        f"{source}: baseline (the config's own values)"))

    def _checked_trial(self, params: Any, source: str) -> dict:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: each enqueued trial is a mapping of parameter values")
        for name, value in params.items():
            if name not in self.distributions:
                raise ConfigError(f"{source}: enqueued parameter '{name}' is not in params")
            if not _within(self.distributions[name], value):
                raise ConfigError(f"{source}: {name}={value!r} lies outside its range or choices")
        return params


def _within(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dist.low <= value <= dist.high


def _suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _lookup(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def load_space(path: str | Path, cfg: dict) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space '{path}' not found; give a YAML file (see `reid sweep --help`)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return SearchSpace(spec, cfg, str(path))


# ----------------------------------------------------------------------------------- trials
def trial_key(params: dict) -> str:
    """A folder name that is a function of the parameters alone, so a re-run trial finds its folds."""
    text = json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]




class FoldPruned(Exception):
    """Raised from the fold callback when the pruner stops a trial."""


Runner = Callable[[dict, Path, Callable[[int, dict], None]], dict]


def _default_runner(table: pd.DataFrame, data: str, progress: bool) -> Runner:
    from reid.train.cv import cross_validate

    def run(cfg: dict, out: Path, on_fold: Callable[[int, dict], None]) -> dict:
        return cross_validate(cfg, table, data, out, resume=True, progress=progress, on_fold=on_fold)

    return run


class Sweep:
    def __init__(self, cfg: dict, space: SearchSpace, out: str | Path, runner: Runner):
        self.cfg, self.space, self.out, self.runner = cfg, space, Path(out), runner
        self.out.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(self.out / "optuna.journal")))
        self.study = optuna.create_study(
            study_name=STUDY, storage=storage, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=space.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=0))
        self._record()

    def _record(self) -> None:
        write_text(self.out / "config.yaml", dump_config(self.cfg))
        write_json(self.out / "space.json", {"metric": self.space.metric, "trials": self.space.trials,
                                             "seed": self.space.seed, "enqueued": self.space.enqueued,
                                             "params": {k: repr(v) for k, v in self.space.distributions.items()}})

    def _requeue_interrupted(self) -> None:
        """A trial still RUNNING in the journal was killed with its process: mark it failed and queue
        its parameters again; the new trial resumes the same folder from its last checkpoint."""
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
            print(f"trial {trial.number} was interrupted: queued again, resuming its folds")

    def _enqueue_planned(self) -> None:
        """The baseline and hand-picked trials, once per sweep (not again on resume)."""
        if self.study.user_attrs.get("planned_enqueued"):
            return
        for params in self.space.enqueued:
            self.study.enqueue_trial(params, skip_if_exists=True)
        self.study.set_user_attr("planned_enqueued", True)

    def _objective(self, trial: optuna.Trial) -> float:
        params = {name: _suggest(trial, name, dist) for name, dist in self.space.distributions.items()}
        key = trial_key(params)
        trial.set_user_attr("folder", f"trials/{key}")
        cfg = with_values(self.cfg, params)
        metric, values = self.space.metric, []
        started = time.perf_counter()
        print(f"--- trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()) + f" ({key}) ---")

        def on_fold(fold: int, metrics: dict) -> None:
            values.append(metrics[metric])
            trial.report(float(np.mean(values)), step=fold)
            if trial.should_prune():
                raise FoldPruned()

        try:
            summary = self.runner(cfg, self.out / "trials" / key, on_fold)
        except FoldPruned:
            trial.set_user_attr("folds_done", len(values))
            trial.set_user_attr("fold_values", values)
            print(f"trial {trial.number} pruned after {len(values)} fold(s): {metric} {np.mean(values):.4f}")
            raise optuna.TrialPruned() from None
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("folds_done", len(summary["folds"]))
        for name in METRICS:
            trial.set_user_attr(name, summary[name])
            for split in ("same_flank", "cross_flank"):
                if split in summary:
                    trial.set_user_attr(f"{split}_{name}", summary[split][name])
        print(f"trial {trial.number}: {metric} {summary[metric]['mean']:.4f} ± {summary[metric]['std']:.4f}")
        return summary[metric]["mean"]

    def run(self) -> pd.DataFrame:
        self._requeue_interrupted()
        self._enqueue_planned()
        while True:
            finished = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()
                        and t.state != optuna.trial.TrialState.FAIL]
            if len(finished) >= self.space.trials:
                break
            self.study.optimize(self._objective, n_trials=1, catch=(), gc_after_trial=True)
            self.write_outputs()
        return self.write_outputs()

    # ---------------------------------------------------------------------------- outputs
    def table(self) -> pd.DataFrame:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING):
                continue
            if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("folds_done") is None:
                continue  # an interrupted attempt, re-run as a later trial
            row = {"trial": t.number, "state": t.state.name.lower(), "folds": t.user_attrs.get("folds_done"),
                   **{f"param.{k}": v for k, v in t.params.items()}}
            for name in METRICS:
                stats = t.user_attrs.get(name)
                row[f"{name}_mean"], row[f"{name}_std"] = (stats["mean"], stats["std"]) if stats else (None, None)
                for split in ("same_flank", "cross_flank"):
                    stats = t.user_attrs.get(f"{split}_{name}")
                    if stats:
                        row[f"{split}_{name}_mean"], row[f"{split}_{name}_std"] = stats["mean"], stats["std"]
            if t.state == optuna.trial.TrialState.PRUNED:
                values = t.user_attrs.get("fold_values") or []
                row[f"{self.space.metric}_first_folds"] = float(np.mean(values)) if values else None
            row["seconds"] = t.user_attrs.get("seconds")
            row["folder"] = t.user_attrs.get("folder")
            rows.append(row)
        return pd.DataFrame(rows)

    def write_outputs(self) -> pd.DataFrame:
        table = self.table()
        write_text(self.out / "trials.csv", table.to_csv(index=False))
        records = json.loads(table.to_json(orient="records"))  # NaN -> null: strict JSON
        complete = table[table["state"] == "complete"] if len(table) else table
        best = None
        if len(complete):
            best_row = complete.loc[complete[f"{self.space.metric}_mean"].idxmax()]
            params = {k[len("param."):]: _plain(v) for k, v in best_row.items() if k.startswith("param.")
                      and not _missing(v)}
            best = {"trial": int(best_row["trial"]), "params": params,
                    self.space.metric: {"mean": best_row[f"{self.space.metric}_mean"],
                                        "std": best_row[f"{self.space.metric}_std"]}}
            write_text(self.out / "best.yaml", dump_config(with_values(self.cfg, params)))
        write_json(self.out / "trials.json", {"metric": self.space.metric, "best": best, "trials": records})
        if len(table):
            _plot_trials(table, self.space.metric, self.out / "trials.png")
        return table


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _plot_trials(table: pd.DataFrame, metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    from reid.train.curves import save_figure  # sets the Agg backend

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(table) + 3), 4))
    for state, color in (("complete", "tab:blue"), ("pruned", "tab:gray"), ("fail", "tab:red")):
        rows = table[table["state"] == state]
        if not len(rows):
            continue
        if state == "complete":
            ax.errorbar(rows["trial"], rows[f"{metric}_mean"], yerr=rows[f"{metric}_std"], fmt="o", color=color,
                        capsize=3, label="complete (mean ± std over folds)")
        elif f"{metric}_first_folds" in rows:
            ax.scatter(rows["trial"], rows[f"{metric}_first_folds"], marker="x", color=color,
                       label="pruned (mean of its first folds)")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"sweep: held-out {metric} per trial")
    fig.tight_layout()
    save_figure(fig, path)


def run_sweep(cfg: dict, table: pd.DataFrame, data: str, space_path: str | Path, out: str | Path,
              progress: bool = True, runner: Runner | None = None) -> pd.DataFrame:
    space = load_space(space_path, cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if len(table) == 0:
        raise ReidError(f"'{data}' has no images to sweep over")
    return Sweep(cfg, space, out, runner or _default_runner(table, data, progress)).run()
