"""Checkpoints: written atomically, read with clear errors, loaded leniently across class counts.

`last.pt` holds everything an exact resume needs (model, loss head, optimiser, scheduler, AMP
scaler, RNG states, position in the epoch, early stopping). `best.pt` holds what inference needs:
the model, its config and preprocessing, and the identities of the class head.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reid.errors import ReidError
from reid.io import save_torch

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
    from reid.train.trainer import CHECKPOINT_KIND

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    mean, std = preprocessing(model)
    save_torch(path, {"kind": CHECKPOINT_KIND, "model": model.state_dict(), "config": cfg, "identities": [],
                      "preprocessing": {"image_size": cfg["data"]["image_size"], "mean": list(mean),
                                        "std": list(std)}})
    return Path(path)
