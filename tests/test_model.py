import pytest
import torch
from safetensors.torch import save_file

from reid.errors import ConfigError
from reid.model import build_model, preprocessing
from reid.model.layers import GeM
from tests.conftest import SHARED, tiny_config


@pytest.mark.parametrize("backbone, kwargs", [("test_resnet", "{}"), ("test_vit", "{img_size: 64}"),
                                               ("hf-hub:BVRA/MegaDescriptor-T-224", "{img_size: 64}")])
def test_embeddings_are_unit_vectors_for_cnn_vit_and_swin(backbone, kwargs):
    model = build_model(tiny_config(f"model.backbone={backbone}", f"model.backbone_kwargs={kwargs}")).eval()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_gem_limits_and_gradient():
    x = torch.rand(2, 5, 4, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x, dims=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(GeM(p=60.0)(x, dims=(2, 3)), x.amax(dim=(2, 3)), rtol=0.05)
    pool = GeM(p=3.0)
    pool(x, dims=(2, 3)).sum().backward()
    assert torch.isfinite(pool.p.grad) and pool.p.grad != 0


def test_gem_pools_signed_tokens():
    tokens = torch.tensor([[[-2.0], [-2.0]], [[1.0], [3.0]]])  # B=2, N=2, C=1
    pooled = GeM(p=3.0)(tokens, dims=(1,)).detach()
    assert pooled[0, 0].item() == pytest.approx(-2.0, rel=1e-4)  # negative features survive
    assert pooled[1, 0].item() == pytest.approx(((1 + 27) / 2) ** (1 / 3), rel=1e-4)


def test_local_weights_file_is_loaded(tmp_path):
    reference = build_model(tiny_config())
    file = tmp_path / "backbone.safetensors"
    save_file(reference.backbone.state_dict(), str(file))
    model = build_model(tiny_config("model.pretrained=true", f"model.weights={file}"))
    for name, tensor in reference.backbone.state_dict().items():
        assert torch.equal(tensor, model.backbone.state_dict()[name]), name


def test_real_mobilenet_weights_load_offline():
    weights = SHARED / "weights" / "mobilenetv2_100.imagenet.safetensors"
    if not weights.exists():
        pytest.skip("../shared/weights is not present")
    model = build_model(tiny_config("model.backbone=mobilenetv2_100", f"model.weights={weights}"))
    from safetensors.torch import load_file

    stored = load_file(str(weights))
    assert set(stored) == set(model.backbone.state_dict())
    assert torch.equal(stored["conv_stem.weight"], model.backbone.conv_stem.weight.detach())
    assert preprocessing(model) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_clear_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_model(tiny_config(f"model.weights={tmp_path / 'missing.pt'}"))
    with pytest.raises(ConfigError, match="timm architecture name"):
        build_model(tiny_config("model.backbone=hf-hub:someone/unknown-model", "model.pretrained=false"))
    with pytest.raises(ConfigError, match="not a timm model"):
        build_model(tiny_config("model.backbone=no_such_net"))
