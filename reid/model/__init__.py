"""Models: one factory (`build_model`) over any timm backbone, and the small layers it uses."""
from reid.model.build import ReIDModel, build_model, preprocessing

__all__ = ["ReIDModel", "build_model", "preprocessing"]
