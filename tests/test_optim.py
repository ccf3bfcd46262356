"""Layer-wise LR decay puts each depth of the backbone, and the head, at the expected LR."""
import pytest
import torch

from reid.model.build import build_model
from reid.train.losses import ReIDLoss
from reid.train.optim import backbone_layer_ids, build_optimizer, build_scheduler, param_groups
from tests.conftest import tiny_config


def _lr_of(groups, param):
    return next(g["lr"] for g in groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("backbone, top_block, first_block, stem", [
    # ViT: one LR per transformer block; the final norm sits one level above the last block
    ("test_vit", "blocks.3.mlp.fc1.weight", "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight"),
    # CNN: one LR per stage, not per residual block
    ("test_resnet", "layer4.0.conv1.weight", "layer1.0.conv1.weight", "conv1.0.weight"),
])
def test_llrd_learning_rates(backbone, top_block, first_block, stem):
    cfg = tiny_config(f"model.backbone={backbone}", "train.lr=1e-3", "train.layer_decay=0.5", "train.head_lr_mult=10",
                      *(["model.backbone_kwargs={img_size: 64}"] if "vit" in backbone else []))
    model = build_model(cfg)
    loss = ReIDLoss(5, cfg["model"]["embedding_dim"], cfg["loss"])
    groups = param_groups(model.backbone, [model.pool, model.neck, loss], cfg["train"])
    params = dict(model.backbone.named_parameters())
    layers = backbone_layer_ids(model.backbone)
    top = max(layers.values())
    for name, param in params.items():
        assert _lr_of(groups, param) == pytest.approx(1e-3 * 0.5 ** (top - layers[name])), name
    assert layers[stem] == 0
    assert layers[first_block] < layers[top_block]
    if backbone == "test_resnet":
        assert layers["layer4.0.conv1.weight"] == layers["layer4.0.conv2.weight"]  # same stage, same LR
        assert layers[top_block] - layers[first_block] == 3
    else:
        assert layers["blocks.3.mlp.fc1.weight"] - layers["blocks.2.mlp.fc1.weight"] == 1
    for head_param in [*model.neck.parameters(), *model.pool.parameters(), *loss.parameters()]:
        assert _lr_of(groups, head_param) == pytest.approx(1e-2)
    # biases, norms and GeM's p are not weight-decayed
    for g in groups:
        if any(p.ndim <= 1 for p in g["params"]):
            assert g["weight_decay"] == 0.0
    # every trainable parameter is in exactly one group
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters())) + len(list(loss.parameters()))


def test_warmup_then_cosine():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([{"params": [param], "lr": 1.0, "weight_decay": 0.0}])
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.05
