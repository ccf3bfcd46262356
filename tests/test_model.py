import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from reid.errors import ConfigError
from reid.model import build_model, preprocessing
from reid.model.build import HUB_ARCHITECTURES
from reid.model.layers import GeM
from tests.conftest import SHARED, tiny_config


def _same_weights(model: torch.nn.Module, state: dict) -> bool:
    return set(model.state_dict()) == set(state) and all(
        torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("backbone, kwargs", [("test_resnet", "{}"), ("test_efficientnet", "{}"),
                                               ("test_vit", "{img_size: 64}"),
                                               ("hf-hub:BVRA/MegaDescriptor-T-224", "{img_size: 64}")])
def test_embeddings_are_unit_vectors_for_cnn_vit_and_swin(backbone, kwargs):
    model = build_model(tiny_config(f"model.backbone={backbone}", f"model.backbone_kwargs={kwargs}")).eval()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_hub_name_builds_its_architecture_offline():
    model = build_model(tiny_config("model.backbone=hf-hub:BVRA/MegaDescriptor-T-224",
                                    "model.backbone_kwargs={img_size: 64}"))
    assert model.backbone.pretrained_cfg["architecture"] == "swin_tiny_patch4_window7_224"
    assert model.backbone.output_fmt == "NHWC"  # the layout ReIDModel.features permutes for


def test_hub_table_names_timm_architectures():
    assert set(HUB_ARCHITECTURES.values()) <= set(timm.list_models())


def test_vit_pools_patch_tokens_only():
    model = build_model(tiny_config("model.backbone=test_vit", "model.backbone_kwargs={img_size: 64}")).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = model.backbone.forward_features(images)
    prefix = model.backbone.num_prefix_tokens
    assert prefix >= 1
    assert torch.allclose(model.features(images), model.pool(tokens[:, prefix:], dims=(1,)))


def test_gem_limits_and_gradient():
    x = torch.rand(2, 5, 4, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x, dims=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(GeM(p=60.0)(x, dims=(2, 3)), x.amax(dim=(2, 3)), rtol=0.05)
    standard = x.pow(3).mean(dim=(2, 3)).pow(1 / 3)  # Radenovic et al. on non-negative maps
    assert torch.allclose(GeM(p=3.0)(x, dims=(2, 3)), standard, atol=1e-5)
    pool = GeM(p=3.0)
    pool(torch.cat([x, torch.zeros_like(x)], dim=2), dims=(2, 3)).sum().backward()  # zeros: ReLU maps have many
    assert torch.isfinite(pool.p.grad) and pool.p.grad != 0


def test_gem_pools_signed_tokens_and_channels_last_maps():
    tokens = torch.tensor([[[-2.0], [-2.0]], [[1.0], [3.0]]])  # B=2, N=2, C=1
    pooled = GeM(p=3.0)(tokens, dims=(1,)).detach()
    assert pooled[0, 0].item() == pytest.approx(-2.0, rel=1e-4)  # negative features survive
    assert pooled[1, 0].item() == pytest.approx(((1 + 27) / 2) ** (1 / 3), rel=1e-4)
    maps = torch.randn(2, 5, 3, 3)
    pool = GeM(p=3.0)
    assert torch.allclose(pool(maps, dims=(2, 3)), pool(maps.permute(0, 2, 3, 1), dims=(1, 2)), atol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    reference = build_model(tiny_config()).backbone.state_dict()
    file = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        save_file(reference, str(file))
    else:
        torch.save(reference, file)
    model = build_model(tiny_config("model.pretrained=true", f"model.weights={file}"))
    assert _same_weights(model.backbone, reference)


def test_weights_file_with_a_classifier_is_loaded(tmp_path):
    classifier = timm.create_model("test_resnet", num_classes=10)
    file = tmp_path / "with_head.safetensors"
    save_file(classifier.state_dict(), str(file))
    model = build_model(tiny_config(f"model.weights={file}"))
    assert _same_weights(model.backbone, {k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")})


def test_vit_weights_load_at_another_image_size(tmp_path):
    reference = timm.create_model("test_vit", num_classes=0).state_dict()  # 160 px
    file = tmp_path / "vit.safetensors"
    save_file(reference, str(file))
    model = build_model(tiny_config("model.backbone=test_vit", "model.backbone_kwargs={img_size: 64}",
                                    f"model.weights={file}"))
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, reference["blocks.0.attn.qkv.weight"])
    assert model.backbone.pos_embed.shape != reference["pos_embed"].shape  # resampled by timm's filter


def test_mismatched_weights_file_is_an_error_not_a_random_backbone(tmp_path):
    # a training checkpoint: keys wrapped in 'model' and prefixed 'backbone.'; timm alone would load nothing
    state = build_model(tiny_config()).state_dict()
    file = tmp_path / "best.pt"
    torch.save({"model": state}, file)
    with pytest.raises(ConfigError, match="does not fit 'test_resnet'"):
        build_model(tiny_config(f"model.weights={file}"))
    # another architecture's weights
    resnet = tmp_path / "resnet.safetensors"
    save_file(build_model(tiny_config()).backbone.state_dict(), str(resnet))
    with pytest.raises(ConfigError, match="does not fit 'test_efficientnet'"):
        build_model(tiny_config("model.backbone=test_efficientnet", f"model.weights={resnet}"))


def test_real_mobilenet_weights_load_offline():
    weights = SHARED / "weights" / "mobilenetv2_100.imagenet.safetensors"
    if not weights.exists():
        pytest.skip("../shared/weights is not present")
    model = build_model(tiny_config("model.backbone=mobilenetv2_100", f"model.weights={weights}"))
    assert _same_weights(model.backbone, load_file(str(weights)))
    assert preprocessing(model) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_preprocessing_follows_the_backbone():
    vit = build_model(tiny_config("model.backbone=test_vit", "model.backbone_kwargs={img_size: 64}"))
    assert preprocessing(vit) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_clear_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.pt' not found"):
        build_model(tiny_config(f"model.weights={tmp_path / 'missing.pt'}"))
    (tmp_path / "junk.pt").write_text("not weights")
    with pytest.raises(ConfigError, match="could not be read"):
        build_model(tiny_config(f"model.weights={tmp_path / 'junk.pt'}"))
    with pytest.raises(ConfigError, match="timm architecture name"):
        build_model(tiny_config("model.backbone=hf-hub:someone/unknown-model", "model.pretrained=false"))
    with pytest.raises(ConfigError, match="not a timm model"):
        build_model(tiny_config("model.backbone=no_such_net"))
    with pytest.raises(ConfigError, match="Invalid pretrained tag"):
        build_model(tiny_config("model.backbone=test_resnet.no_such_tag"))
    with pytest.raises(ConfigError, match="may not set num_classes"):
        build_model(tiny_config("model.backbone_kwargs={num_classes: 5}"))
    with pytest.raises(ConfigError, match="do not fit 'test_resnet'"):
        build_model(tiny_config("model.backbone_kwargs={no_such_option: 1}"))


def test_unreachable_hub_is_a_config_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match="set model.weights"):
        build_model(tiny_config("model.backbone=hf-hub:BVRA/MegaDescriptor-T-224", "model.pretrained=true"))
