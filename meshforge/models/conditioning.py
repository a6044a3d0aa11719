"""Conditioning plugins of the SS-DiT: what a shape is generated *from*.

A conditioner turns a batch of raw conditions into :class:`Cond`: ``tokens [B, L, D]`` with a
validity ``mask [B, L]`` (the DiT cross-attends to the valid ones) and a pooled ``vector [B, D]``
(added to the timestep embedding that drives AdaLN). Each one also knows its *null* condition,
the input of the unconditional branch of classifier-free guidance: ``forward(condition, drop)``
replaces the items flagged in ``drop`` by it (condition dropout in training, the negative branch
at sampling), always through ``torch.where`` so every parameter takes part in every step (DDP).

Registered kinds (:func:`register_conditioner` adds more):

``none``   unconditional: no tokens, the DiT has no cross-attention.
``class``  a label embedding (one token, and the vector); index ``classes`` is the null class.
``image``  patch tokens of a ViT, DINOv2 (frozen, loaded from a local checkpoint) or a small
           built-in ViT trained from scratch, projected to ``dim``. Sparse conditioning
           (Direct3D-S2 section 4.2): only foreground patches are kept (alpha coverage above
           ``min_coverage``), plus the CLS token, which is always valid and is the pooled vector.
           Kept tokens are packed to the front, so the cross-attention runs over the longest
           foreground of the batch rather than over every patch.

Images are RGBA floats ``[B, 4, H, W]`` in [0, 1]; the colour is composited on black and
normalised with ImageNet statistics, as DINOv2 expects. Training images are renders of the
dataset's meshes (:func:`render_views`); a user's image is cropped to its foreground and padded
square (:func:`load_image`) so that it is framed like them. Nothing is ever downloaded: a missing
encoder checkpoint is an :class:`InputError` naming the path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from meshforge.errors import InputError, MeshforgeError
from meshforge.kernels.attention import sdpa

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViTConfig:
    """A plain pre-norm ViT with LayerScale: DINOv2's architecture (ViT-S/14: 384, 12, 6, 14, 1536)."""

    dim: int = 192
    depth: int = 4
    heads: int = 3
    patch: int = 14
    mlp_hidden: int = 768
    registers: int = 0  # DINOv2 "with registers" checkpoints have 4
    pos_grid: int = 16  # patches per side of the stored position embedding (interpolated to the input)

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "patch", "mlp_hidden", "pos_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"vit.{name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"vit.dim {self.dim} is not divisible by vit.heads {self.heads}")
        if self.registers < 0:
            raise ValueError("vit.registers must be non-negative")


@dataclass
class ConditionerConfig:
    kind: str = "none"  # a registered conditioner: none, class, image
    dim: int = 256  # width of the condition tokens
    classes: list[str] = field(default_factory=list)  # class: label names (train-dit takes them from the data)
    encoder: Literal["builtin", "dinov2"] = "builtin"  # image: ViT trained from scratch, or frozen DINOv2
    encoder_checkpoint: Path | None = None  # image + dinov2: a local state dict (.pth / .safetensors)
    vit: ViTConfig = field(default_factory=ViTConfig)  # image: the encoder (dinov2: read from the checkpoint)
    image_size: int = 224  # image: input side in pixels, a multiple of vit.patch
    min_coverage: float = 0.0  # image: a patch is foreground when its mean alpha exceeds this

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be at least 1, got {self.dim}")
        if self.image_size < self.vit.patch or self.image_size % self.vit.patch:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the ViT patch {self.vit.patch}")
        if not 0 <= self.min_coverage < 1:
            raise ValueError(f"min_coverage must be in [0, 1), got {self.min_coverage}")


@dataclass
class Cond:
    """A batch of conditions as the DiT consumes them."""

    tokens: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] bool, at least one True per row
    vector: torch.Tensor  # [B, D]

    @staticmethod
    def cat(parts: list[Cond]) -> Cond:
        """Batch concatenation (the two branches of classifier-free guidance in one pass)."""
        length = max(p.tokens.shape[1] for p in parts)
        tokens = torch.cat([F.pad(p.tokens, (0, 0, 0, length - p.tokens.shape[1])) for p in parts])
        mask = torch.cat([F.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts])
        return Cond(tokens, mask, torch.cat([p.vector for p in parts]))


# ---------------------------------------------------------------------------------------------
# Registry


class Conditioner(nn.Module):
    """Base of the conditioning plugins.

    ``data`` names the dataset field a conditioner consumes (``"label"``: int64 class ids with -1
    for unlabelled; ``"image"``: RGBA images; None: nothing); ``token_dim`` is the width of its
    tokens (0: no tokens, the DiT builds no cross-attention).
    """

    data: str | None = None
    token_dim: int = 0

    def __init__(self, cfg: ConditionerConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, condition: torch.Tensor | None, drop: torch.Tensor) -> Cond | None:
        raise NotImplementedError

    def for_sampling(self, n: int, image: Path | None, class_label: str | None) -> torch.Tensor | None:
        """The raw condition of ``n`` samples from the user's ``--image`` / ``--class-label``."""
        raise NotImplementedError


CONDITIONERS: dict[str, type[Conditioner]] = {}


def register_conditioner(kind: str) -> Callable[[type[Conditioner]], type[Conditioner]]:
    def add(cls: type[Conditioner]) -> type[Conditioner]:
        CONDITIONERS[kind] = cls
        return cls

    return add


def build_conditioner(cfg: ConditionerConfig) -> Conditioner:
    if cfg.kind not in CONDITIONERS:
        raise MeshforgeError(f"unknown conditioner {cfg.kind!r} (known: {', '.join(sorted(CONDITIONERS))})")
    return CONDITIONERS[cfg.kind](cfg)


@register_conditioner("none")
class Unconditional(Conditioner):
    def forward(self, condition: torch.Tensor | None, drop: torch.Tensor) -> None:
        return None

    def for_sampling(self, n: int, image: Path | None, class_label: str | None) -> None:
        if image is not None or class_label is not None:
            raise MeshforgeError("this checkpoint is unconditional: drop --image / --class-label")


@register_conditioner("class")
class ClassConditioner(Conditioner):
    data = "label"

    def __init__(self, cfg: ConditionerConfig) -> None:
        super().__init__(cfg)
        if not cfg.classes:
            raise MeshforgeError("a class conditioner needs its list of classes (train-dit takes them from the data)")
        self.token_dim = cfg.dim
        self.embed = nn.Embedding(len(cfg.classes) + 1, cfg.dim)  # the last row is the null class
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, condition: torch.Tensor, drop: torch.Tensor) -> Cond:
        null = torch.full_like(condition, len(self.cfg.classes))
        vector = self.embed(torch.where(drop | (condition < 0), null, condition))
        return Cond(vector[:, None], torch.ones(len(vector), 1, dtype=torch.bool, device=vector.device), vector)

    def for_sampling(self, n: int, image: Path | None, class_label: str | None) -> torch.Tensor:
        """Every sample of ``class_label``, or the classes in turn when none is given."""
        if image is not None:
            raise MeshforgeError("this checkpoint is class-conditioned: use --class-label, not --image")
        classes = self.cfg.classes
        if class_label is None:
            return torch.arange(n) % len(classes)
        if class_label not in classes:
            raise MeshforgeError(f"unknown class {class_label!r} (this checkpoint knows: {', '.join(classes)})")
        return torch.full((n,), classes.index(class_label))


# ---------------------------------------------------------------------------------------------
# Image encoder: a ViT with DINOv2's parameter names


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(sdpa(q, k, v).transpose(1, 2).reshape(b, n, d))


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6), nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = ViTAttention(cfg.dim, cfg.heads)
        self.mlp = ViTMlp(cfg.dim, cfg.mlp_hidden)
        self.ls1, self.ls2 = LayerScale(cfg.dim), LayerScale(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """DINOv2's ViT (``state_dict`` keys as in facebookresearch/dinov2's hub checkpoints), without
    the SwiGLU variant of ViT-g. Returns the final-normed CLS and patch tokens ``[B, 1 + P, dim]``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.pos_grid**2, cfg.dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, cfg.dim)) if cfg.registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))  # DINOv2's masked-patch token, unused here
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)

    def position(self, rows: int, cols: int) -> torch.Tensor:
        """The position embedding resized (bicubic) to a ``rows x cols`` patch grid."""
        g, pos = self.cfg.pos_grid, self.pos_embed
        if (rows, cols) == (g, g):
            return pos
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows, cols = images.shape[-2] // self.cfg.patch, images.shape[-1] // self.cfg.patch
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.position(rows, cols)
        if self.register_tokens is not None:  # registers sit between CLS and the patches, without position
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return torch.cat([x[:, :1], x[:, 1 + self.cfg.registers :]], dim=1)


def read_encoder_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A DINOv2 state dict from a local ``.pth`` / ``.pt`` / ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such image encoder checkpoint (meshforge never downloads weights: give the path "
                               "of a DINOv2 state dict you have, e.g. dinov2_vits14_pretrain.pth, or use encoder=builtin)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load and safetensors raise many types; one clear line
        raise InputError(path, f"unreadable image encoder checkpoint ({type(exc).__name__}: {exc})") from None
    for wrapper in ("teacher", "model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {re.sub(r"^(module\.|backbone\.)+", "", k): v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise InputError(path, "not a DINOv2 ViT state dict (no patch_embed.proj.weight / blocks.0.attn.qkv.weight)")
    if "blocks.0.mlp.w12.weight" in state:
        raise InputError(path, "SwiGLU ViT (DINOv2 ViT-g) checkpoints are not supported; use ViT-S/B/L")
    return state


def vit_config_from_state(state: dict[str, torch.Tensor]) -> ViTConfig:
    """The architecture of a DINOv2 state dict (DINOv2 heads are always 64 wide)."""
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    positions = state["pos_embed"].shape[1] - 1
    return ViTConfig(
        dim=dim, depth=depth, heads=max(dim // 64, 1), patch=state["patch_embed.proj.weight"].shape[-1],
        mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
        registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        pos_grid=math.isqrt(positions),
    )


# ---------------------------------------------------------------------------------------------
# Image conditioning


def patch_coverage(alpha: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean alpha of every patch, ``[B, H, W] -> [B, (H / patch) * (W / patch)]`` in the ViT's order."""
    return F.avg_pool2d(alpha[:, None], patch).flatten(1)


def pack_valid(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the front (order kept) and cut the columns no row needs."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    length = int(mask.sum(1).max())
    order = order[:, :length]
    return tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1])), mask.gather(1, order)


@register_conditioner("image")
class ImageConditioner(Conditioner):
    data = "image"

    def __init__(self, cfg: ConditionerConfig) -> None:
        super().__init__(cfg)
        self.token_dim = cfg.dim
        self.encoder = ViT(cfg.vit)
        self.frozen = cfg.encoder == "dinov2"
        self.encoder.requires_grad_(not self.frozen)
        self.proj = nn.Linear(cfg.vit.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.null_token = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_encoder(self, path: Path) -> None:
        """Load frozen DINOv2 weights from ``path`` (its architecture must be ``cfg.vit``)."""
        state = read_encoder_checkpoint(path)
        if vit_config_from_state(state) != self.cfg.vit:
            raise InputError(path, f"encoder architecture {vit_config_from_state(state)} differs from the model's {self.cfg.vit}")
        # DINOv2's masked-patch token plays no part here; exports that drop it load all the same.
        missing, unexpected = self.encoder.load_state_dict(state, strict=False)
        if [k for k in missing if k != "mask_token"] or unexpected:
            raise InputError(path, f"weights do not fit the ViT (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT tokens ``[B, 1 + P, vit.dim]`` and patch coverage ``[B, P]`` of RGBA images."""
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        alpha = images[:, 3].clamp(0, 1)
        rgb = (images[:, :3] * alpha[:, None] - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens = self.encoder(rgb)
        return tokens, patch_coverage(alpha, self.cfg.vit.patch)

    def forward(self, condition: torch.Tensor, drop: torch.Tensor) -> Cond:
        features, coverage = self.encode(condition)
        tokens = self.norm(self.proj(features))
        fg = coverage > self.cfg.min_coverage
        mask = torch.cat([torch.ones_like(fg[:, :1]), fg], dim=1)  # CLS is always valid
        # A dropped item keeps only the CLS slot, holding the learned null token.
        first = torch.zeros_like(mask)
        first[:, 0] = True
        mask = torch.where(drop[:, None], first, mask)
        tokens = torch.where(drop[:, None, None] & first[..., None], self.null_token.to(tokens.dtype), tokens)
        tokens, mask = pack_valid(tokens, mask)
        return Cond(tokens, mask, tokens[:, 0])

    def for_sampling(self, n: int, image: Path | None, class_label: str | None) -> torch.Tensor:
        if class_label is not None:
            raise MeshforgeError("this checkpoint is image-conditioned: use --image, not --class-label")
        if image is None:
            raise MeshforgeError("this checkpoint is image-conditioned: pass --image IMG")
        return torch.from_numpy(load_image(image, self.cfg.image_size)).permute(2, 0, 1)[None].expand(n, -1, -1, -1)


# ---------------------------------------------------------------------------------------------
# Images: renders for training, user images for sampling


def render_views(vertices: np.ndarray, faces: np.ndarray, views: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGBA uint8 ``[views, size, size, 4]`` renders of a mesh by :func:`meshforge.render.render_mesh`.

    View 0 is the render grid's own three-quarter view; the others turn the mesh about the up axis
    by a random angle, so a model trained on them accepts a shape seen from any side. Alpha is
    exact: the renderer's background is pure white, which its shading never produces.
    """
    from meshforge.render import render_mesh

    out = np.empty((views, size, size, 4), dtype=np.uint8)
    for i in range(views):
        angle = 0.0 if i == 0 else rng.uniform(0, 2 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        turned = np.asarray(vertices, dtype=np.float64) @ np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
        rgb = render_mesh(turned, faces, size)
        alpha = (rgb < 1).any(axis=-1)
        out[i, ..., :3] = np.round(rgb * 255)
        out[i, ..., 3] = alpha * 255
    return out


def foreground_alpha(rgba: np.ndarray, tolerance: float = 0.08) -> np.ndarray:
    """Alpha of an image in [0, 1]: its own alpha channel when it has a meaningful one, otherwise
    pixels whose colour differs from the median border colour (a plain background) by more than
    ``tolerance``."""
    if rgba.shape[-1] == 4 and rgba[..., 3].min() < 1:
        return rgba[..., 3]
    border = np.concatenate([rgba[0, :, :3], rgba[-1, :, :3], rgba[:, 0, :3], rgba[:, -1, :3]])
    distance = np.abs(rgba[..., :3] - np.median(border, axis=0)).max(axis=-1)
    return (distance > tolerance).astype(np.float32)


def load_image(path: Path, size: int, margin: float = 0.06) -> np.ndarray:
    """A user's image as float32 RGBA ``[size, size, 4]``: cropped to its foreground, padded square
    with ``margin`` on each side and resized, the framing of :func:`render_views`."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable image ({exc})") from None
    alpha = foreground_alpha(rgba)
    rows, cols = np.nonzero(alpha > 0.5)
    if len(rows) == 0:
        raise InputError(path, "no foreground found (give an RGBA image, or an object on a plain background)")
    rgba = np.concatenate([rgba[..., :3], alpha[..., None]], axis=-1)[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    side = round(max(rgba.shape[:2]) / (1 - 2 * margin))
    canvas = np.zeros((side, side, 4), dtype=np.float32)
    top, left = (side - rgba.shape[0]) // 2, (side - rgba.shape[1]) // 2
    canvas[top : top + rgba.shape[0], left : left + rgba.shape[1]] = rgba
    resized = F.interpolate(torch.from_numpy(canvas).permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).clamp(0, 1).numpy()
