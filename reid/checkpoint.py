"""The checkpoint format, in one place: training writes it, embedding and calibration read and extend it.

`last.pt` holds everything an exact resume needs (model, loss head, optimiser, scheduler, AMP
scaler, RNG states, position in the epoch, early stopping). `best.pt` is an *inference record*
(`inference_record`): the model, its config and preprocessing, and the identities of the class
head; `reid calibrate` adds `calibration` (thresholds) and `postprocessing` (TTA and re-ranking
chosen on out-of-fold embeddings) with `record_calibration`, the trainer adds `whitening`.
Checkpoints are written atomically and read with errors that say which file to use instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reid.errors import ReidError
from reid.io import save_torch

CHECKPOINT_KIND = "wildreid-reid"
INFERENCE_KEYS = ("model", "config", "preprocessing")

save_checkpoint = save_torch


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ReidError(f"'{path}' is a folder, not a checkpoint file{_checkpoints_in(path)}")
    if not path.is_file():
        raise ReidError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ReidError(f"checkpoint '{path}' is unreadable ({type(exc).__name__}: {exc}); "
                        "use the run's other checkpoint (best.pt / last.pt) or retrain") from None


def load_inference(path: str | Path) -> dict:
    """An inference record (best.pt, or last.pt which holds one too), checked to have what embedding needs."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or any(key not in state for key in INFERENCE_KEYS):
        raise ReidError(f"'{path}' is not a reid training checkpoint (it lacks model, config or preprocessing); "
                        "use the best.pt of a `reid train` or `reid cv` run")
    return state


def inference_model(state: dict) -> nn.Module:
    """The model of an inference record, built offline from its config and loaded with its weights."""
    import copy

    from reid.model.build import build_model

    cfg = copy.deepcopy(state["config"])
    # the checkpoint holds every weight: nothing to download or read besides it
    cfg["model"].update(pretrained=False, weights=None)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def inference_record(model: dict, cfg: dict, mean, std, identities=(), class_mode: str | None = None,
                     **extra) -> dict:
    """What best.pt holds: `model` (a state dict), the config it was built from, its preprocessing and
    the identities of its class head; `extra` adds training's records (loss, epoch, metrics)."""
    return {"kind": CHECKPOINT_KIND, "model": model, "config": cfg, "identities": list(identities),
            "class_mode": class_mode,
            "preprocessing": {"image_size": cfg["data"]["image_size"], "mean": list(mean), "std": list(std)},
            **extra}


def record_calibration(path: str | Path, calibration: dict, postprocessing: dict) -> None:
    """Store `reid calibrate`'s thresholds and chosen post-processing in a checkpoint (atomically)."""
    state = load_checkpoint(path)
    state["calibration"] = calibration
    state["postprocessing"] = postprocessing
    save_checkpoint(path, state)


def _checkpoints_in(folder: Path) -> str:
    """The checkpoints a user who named a run folder most likely meant."""
    found = sorted(folder.glob("best.pt")) or sorted(folder.glob("fold_*/best.pt"))
    if not found:
        return "; give the best.pt of a `reid train` or `reid cv` run"
    kind = "a `reid cv` run folder" if found[0].parent != folder else "a run folder"
    return f" ({kind}): give one of its checkpoints, e.g. {', '.join(map(str, found[:5]))}"


def load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every tensor whose name and shape match; return what was skipped, and why.

    A checkpoint trained on another set of identities has an ArcFace head of another size: its
    backbone and neck still transfer, its class centres cannot.
    """
    own = module.state_dict()
    usable, skipped = {}, []
    for name, tensor in state.items():
        if name not in own:
            skipped.append(f"{name} (not in this model)")
        elif own[name].shape != tensor.shape:
            skipped.append(f"{name} (shape {tuple(tensor.shape)} in checkpoint, {tuple(own[name].shape)} here)")
        else:
            usable[name] = tensor
    missing = [name for name in own if name not in usable and name not in state]
    skipped += [f"{name} (not in checkpoint: left as initialised)" for name in missing]
    module.load_state_dict(usable, strict=False)
    return skipped


def save_random_backbone(path: str | Path, backbone: str, image_size: int, batch_size: int) -> Path:
    """`save_untrained` of a random-init `backbone` on the cpu-small recipe: what benchmarks time."""
    from reid.config import load_config

    cfg = load_config("cpu-small", [f"model.backbone={backbone}", "model.pretrained=false", "model.weights=null",
                                    f"data.image_size={image_size}", f"eval.batch_size={batch_size}",
                                    "data.num_workers=0"])
    return save_untrained(path, cfg)


def save_untrained(path: str | Path, cfg: dict, seed: int = 0) -> Path:
    """An inference checkpoint (what best.pt holds) of the config's model as built, untrained.

    For benchmarks and tests, where speed or plumbing matters and weights do not; and to score a
    pretrained backbone before any fine-tuning.
    """
    from reid.model.build import build_model, preprocessing

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    mean, std = preprocessing(model)
    save_checkpoint(path, inference_record(model.state_dict(), cfg, mean, std))
    return Path(path)
