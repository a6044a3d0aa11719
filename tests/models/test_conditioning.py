"""Conditioning plugins: the registry, null conditions for CFG, sparse (foreground) image tokens,
DINOv2 checkpoint compatibility, missing checkpoints, and user images."""

import numpy as np
import pytest
import torch
from PIL import Image

from meshforge.errors import InputError, MeshforgeError
from meshforge.models.conditioning import (
    CONDITIONERS,
    Cond,
    Conditioner,
    ConditionerConfig,
    ImageConditioner,
    ViT,
    ViTConfig,
    build_conditioner,
    foreground_alpha,
    load_image,
    pack_valid,
    patch_coverage,
    read_encoder_checkpoint,
    register_conditioner,
    render_views,
    vit_config_from_state,
)

SMALL_VIT = ViTConfig(dim=32, depth=2, heads=2, patch=8, mlp_hidden=64, pos_grid=4)

# The parameter names of facebookresearch/dinov2's ViT-S/14 hub checkpoint (block 0 stands for all).
DINOV2_KEYS = {
    "cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.ls1.gamma", "blocks.0.norm2.weight",
    "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight",
    "blocks.0.mlp.fc2.bias", "blocks.0.ls2.gamma", "norm.weight", "norm.bias",
}


def image_cfg(**kw) -> ConditionerConfig:
    return ConditionerConfig(kind="image", dim=16, vit=SMALL_VIT, image_size=32, **kw)


def test_registry_builds_every_kind_and_names_the_known_ones():
    assert {"none", "class", "image"} <= set(CONDITIONERS)
    assert build_conditioner(ConditionerConfig()).token_dim == 0
    assert build_conditioner(ConditionerConfig(kind="class", classes=["a", "b"])).token_dim == 256
    with pytest.raises(MeshforgeError, match="unknown conditioner 'text'.*class, image, none"):
        build_conditioner(ConditionerConfig(kind="text"))


def test_a_registered_plugin_is_built_by_kind():
    @register_conditioner("constant-test")
    class Constant(Conditioner):
        token_dim = 4

        def forward(self, condition, drop):
            b = len(drop)
            return Cond(torch.ones(b, 1, 4), torch.ones(b, 1, dtype=torch.bool), torch.ones(b, 4))

    try:
        assert isinstance(build_conditioner(ConditionerConfig(kind="constant-test")), Constant)
    finally:
        del CONDITIONERS["constant-test"]


def test_class_conditioner_null_class_for_dropped_and_unlabelled_items():
    cond = build_conditioner(ConditionerConfig(kind="class", dim=8, classes=["chair", "table", "lamp"]))
    labels = torch.tensor([0, 2, -1, 1])
    out = cond(labels, torch.tensor([False, False, False, True]))
    null = cond.embed.weight[3]
    torch.testing.assert_close(out.vector[0], cond.embed.weight[0])
    torch.testing.assert_close(out.vector[1], cond.embed.weight[2])
    torch.testing.assert_close(out.vector[2], null)  # unlabelled
    torch.testing.assert_close(out.vector[3], null)  # dropped
    assert out.tokens.shape == (4, 1, 8) and out.mask.all()


def test_class_labels_for_sampling():
    cond = build_conditioner(ConditionerConfig(kind="class", classes=["chair", "table", "lamp"]))
    assert cond.for_sampling(5, None, None).tolist() == [0, 1, 2, 0, 1]
    assert cond.for_sampling(2, None, "lamp").tolist() == [2, 2]
    with pytest.raises(MeshforgeError, match="unknown class 'sofa'.*chair, table, lamp"):
        cond.for_sampling(2, None, "sofa")
    with pytest.raises(MeshforgeError, match="unconditional"):
        build_conditioner(ConditionerConfig()).for_sampling(1, None, "lamp")


def test_pack_valid_moves_valid_tokens_first_in_order():
    tokens = torch.arange(12.0).view(2, 6, 1)
    mask = torch.tensor([[True, False, True, False, False, True], [True, False, False, False, False, False]])
    packed, packed_mask = pack_valid(tokens, mask)
    assert packed.shape == (2, 3, 1)
    assert packed[0, :, 0].tolist() == [0.0, 2.0, 5.0] and packed_mask[0].all()
    assert packed[1, 0, 0].item() == 6.0 and packed_mask[1].tolist() == [True, False, False]


def test_patch_coverage_follows_the_vit_patch_order():
    alpha = torch.zeros(1, 16, 24)
    alpha[0, 8:16, 16:24] = 1.0  # the last patch of a 2 x 3 grid
    alpha[0, 0:8, 8:12] = 1.0  # half of patch (0, 1)
    assert patch_coverage(alpha, 8)[0].tolist() == [0.0, 0.5, 0.0, 0.0, 0.0, 1.0]


def test_sparse_conditioning_keeps_cls_and_foreground_patches():
    torch.manual_seed(0)
    cond = build_conditioner(image_cfg())
    images = torch.rand(3, 4, 32, 32)
    images[:, 3] = 0.0
    images[0, 3, :8, :8] = 1.0  # one foreground patch of 16
    images[1, 3, 8:24, 8:24] = 1.0  # four
    images[2, 3, :16, :] = 1.0  # eight, but this item is dropped
    out = cond(images, torch.tensor([False, False, True]))
    assert out.mask.sum(1).tolist() == [2, 5, 1]
    assert out.tokens.shape[1] == 5  # packed: the longest foreground plus CLS
    torch.testing.assert_close(out.vector, out.tokens[:, 0])
    torch.testing.assert_close(out.tokens[2, 0], cond.null_token)
    # The background's colour does not reach the condition (composited on black).
    changed = images.clone()
    changed[0, :3, 16:, 16:] = torch.rand(3, 16, 16)
    again = cond(changed, torch.tensor([False, False, True]))
    torch.testing.assert_close(again.tokens[0, :2], out.tokens[0, :2])


def test_vit_uses_dinov2_parameter_names_and_round_trips_a_checkpoint(tmp_path):
    vit = ViT(ViTConfig(dim=64, depth=2, heads=1, patch=14, mlp_hidden=256, pos_grid=4))
    state = vit.state_dict()
    assert {k for k in state if not k.startswith("blocks.") or k.startswith("blocks.0.")} == DINOV2_KEYS
    path = tmp_path / "dinov2_tiny.pth"
    torch.save({k: v.clone() for k, v in state.items()}, path)
    loaded = read_encoder_checkpoint(path)
    cfg = vit_config_from_state(loaded)
    assert cfg == ViTConfig(dim=64, depth=2, heads=1, patch=14, mlp_hidden=256, registers=0, pos_grid=4)

    conditioner = ImageConditioner(ConditionerConfig(kind="image", encoder="dinov2", encoder_checkpoint=path,
                                                     vit=cfg, image_size=56, dim=8))
    conditioner.load_encoder(path)
    assert not any(p.requires_grad for p in conditioner.encoder.parameters())  # frozen
    assert all(p.requires_grad for p in conditioner.proj.parameters())
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(conditioner.encoder(x), vit(x))


def test_register_tokens_are_read_and_dropped_from_the_output(tmp_path):
    vit = ViT(ViTConfig(dim=64, depth=1, heads=1, patch=14, mlp_hidden=128, registers=4, pos_grid=2))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "reg.pth")
    cfg = vit_config_from_state(read_encoder_checkpoint(tmp_path / "reg.pth"))
    assert cfg.registers == 4 and cfg.pos_grid == 2
    assert vit(torch.randn(1, 3, 42, 28)).shape == (1, 1 + 3 * 2, 64)  # interpolated positions, no registers


def test_missing_or_wrong_encoder_checkpoints_are_clear_errors(tmp_path):
    missing = tmp_path / "nowhere" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(InputError, match=r"nowhere/dinov2_vits14_pretrain\.pth: no such image encoder checkpoint.*never downloads"):
        read_encoder_checkpoint(missing)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not a DINOv2 ViT state dict"):
        read_encoder_checkpoint(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable image encoder checkpoint"):
        read_encoder_checkpoint(tmp_path / "junk.pth")


def test_builtin_encoder_trains():
    cond = build_conditioner(image_cfg())
    assert all(p.requires_grad for p in cond.encoder.parameters())
    images = torch.rand(2, 4, 32, 32)
    cond(images, torch.zeros(2, dtype=torch.bool)).tokens.sum().backward()
    assert cond.encoder.patch_embed.proj.weight.grad is not None


def test_renders_have_exact_alpha_and_view_zero_is_the_grid_view():
    from meshforge.render import render_mesh

    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float) - 0.3
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    views = render_views(vertices, faces, 3, 48, np.random.default_rng(0))
    assert views.shape == (3, 48, 48, 4) and views.dtype == np.uint8
    grid_view = np.round(render_mesh(vertices, faces, 48) * 255)
    assert np.array_equal(views[0, ..., :3], grid_view)
    assert np.array_equal(views[0, ..., 3] > 0, (grid_view < 255).any(-1))
    assert 0.1 < (views[..., 3] > 0).mean() < 0.9


def test_user_images_are_cropped_to_their_foreground(tmp_path):
    rgb = np.full((60, 100, 3), 255, dtype=np.uint8)  # white background, no alpha
    rgb[10:30, 20:60] = (200, 40, 40)  # a 20 x 40 object off-centre
    Image.fromarray(rgb).save(tmp_path / "object.png")
    image = load_image(tmp_path / "object.png", 50)
    assert image.shape == (50, 50, 4)
    rows, cols = np.nonzero(image[..., 3] > 0.5)
    # Framed like the renders: centred, the longer side spans 1 - 2 * 0.06 of the image.
    assert abs((cols.min() + cols.max()) / 2 - 24.5) <= 1 and abs((rows.min() + rows.max()) / 2 - 24.5) <= 1
    assert cols.max() - cols.min() + 1 == pytest.approx(50 * 0.88, abs=2)

    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[5:15, 5:35] = (10, 200, 10, 255)
    assert np.array_equal(foreground_alpha(rgba.astype(np.float32) / 255) > 0, rgba[..., 3] > 0)
    with pytest.raises(InputError, match="no foreground"):
        Image.fromarray(np.full((20, 20, 3), 255, dtype=np.uint8)).save(tmp_path / "blank.png")
        load_image(tmp_path / "blank.png", 32)
    with pytest.raises(InputError, match="unreadable image"):
        (tmp_path / "bad.png").write_bytes(b"nope")
        load_image(tmp_path / "bad.png", 32)
