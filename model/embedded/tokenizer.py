"""Tokenizers: a patch codebook for images and a closed word vocabulary for text.

Images: a 32x32 RGB image becomes 65 tokens: its background, then 8x8 non-overlapping 4x4 patches in
raster order, each a (foreground mask, colour) pair from a codebook of exact masks. Exact frequent
colour patches (128 of them) kept only a third of world images intact here (3 backgrounds x 6 colours
x jittered edges make ~3,100 distinct patches); factoring out the background and the colour leaves
~225 distinct masks, and 128 of them cover > 99 % of patches.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from PIL import Image

PATCH = 4


def image_to_array(img: Image.Image | np.ndarray, size: int = 32) -> np.ndarray:
    if isinstance(img, np.ndarray):
        arr = img
    else:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.NEAREST)
        arr = np.asarray(img)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def to_patches(arr: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) or (S, S, 3) uint8 -> (N, (S/4)^2, 48) patches in raster order."""
    if arr.ndim == 3:
        arr = arr[None]
    n, s, _, c = arr.shape
    g = s // PATCH
    p = arr.reshape(n, g, PATCH, g, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return p.reshape(n, g * g, PATCH * PATCH * c)


def from_patches(p: np.ndarray, size: int = 32) -> np.ndarray:
    n = p.shape[0]
    g = size // PATCH
    arr = p.reshape(n, g, g, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    return arr.reshape(n, size, size, 3)


class PatchCodebook:
    """Image tokens: one background token, then 64 patch tokens, each (4x4 shape mask, object colour).

    Pixels are first snapped to the world palette (object colours and backgrounds). The background token
    names the image's background; a patch token names which of its 16 pixels are foreground (one of M
    exact masks: the most frequent in world images, the all-background mask first, others snapped to
    the nearest by Hamming distance) and their colour (the majority object colour of the patch). So a
    world image round-trips exactly unless a patch holds a mask outside the codebook or two colours.

    Token ids (relative): 0..B-1 backgrounds; B: empty patch; B + 1 + (m-1)*C + c: mask m >= 1, colour c.
    """

    def __init__(self, masks: np.ndarray, colors: np.ndarray, backgrounds: np.ndarray, size: int = 32):
        self.masks = np.ascontiguousarray(masks, dtype=np.uint8)  # (M, 16) 0/1, masks[0] all zero
        self.colors = np.ascontiguousarray(colors, dtype=np.uint8)  # (C, 3)
        self.backgrounds = np.ascontiguousarray(backgrounds, dtype=np.uint8)  # (B, 3)
        self.size = size
        self._mask_index = {bytes(m): i for i, m in enumerate(self.masks)}
        pal = np.concatenate([self.colors, self.backgrounds]).astype(np.int32)
        q = (np.arange(64) * 4 + 2).astype(np.int32)
        grid = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 1, 3)
        self._lut = ((grid - pal) ** 2).sum(-1).argmin(1).astype(np.uint8).reshape(64, 64, 64)

    # sizes ------------------------------------------------------------------------------------------
    @property
    def n_masks(self) -> int:
        return int(self.masks.shape[0])

    @property
    def n_colors(self) -> int:
        return int(self.colors.shape[0])

    @property
    def n_backgrounds(self) -> int:
        return int(self.backgrounds.shape[0])

    @property
    def k(self) -> int:
        """Number of image token ids."""
        return self.n_backgrounds + 1 + (self.n_masks - 1) * self.n_colors

    @property
    def tokens_per_image(self) -> int:
        return 1 + (self.size // PATCH) ** 2

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """Per image token: (mask factor in 0..M, colour factor in 0..C+B); M = 'background token',
        C+B = 'no colour'. A token's embedding is the sum of its two factor embeddings."""
        C, B, M = self.n_colors, self.n_backgrounds, self.n_masks
        fa = [M] * B + [0] + [m for m in range(1, M) for _ in range(C)]
        fb = [C + b for b in range(B)] + [C + B] + [c for _ in range(1, M) for c in range(C)]
        return np.array(fa, dtype=np.int64), np.array(fb, dtype=np.int64)

    # storage ----------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codebook.masks": torch.from_numpy(self.masks.copy()),
                "codebook.colors": torch.from_numpy(self.colors.copy()),
                "codebook.backgrounds": torch.from_numpy(self.backgrounds.copy())}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], size: int = 32) -> "PatchCodebook":
        return cls(t["codebook.masks"].numpy(), t["codebook.colors"].numpy(), t["codebook.backgrounds"].numpy(),
                   size)

    # fitting ----------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, images, colors: np.ndarray, backgrounds: np.ndarray, n_masks: int = 128,
            size: int = 32) -> "PatchCodebook":
        """The n_masks most frequent exact foreground masks of the images (plus the empty mask)."""
        tmp = cls(np.zeros((1, 16), np.uint8), colors, backgrounds, size)
        arrs = images if isinstance(images, np.ndarray) else np.stack([image_to_array(i, size) for i in images])
        cls_map, _ = tmp._classify(arrs)
        fg = (cls_map < tmp.n_colors).astype(np.uint8)
        m = to_patches(fg[..., None]).reshape(-1, PATCH * PATCH)
        counts = Counter(map(bytes, m))
        empty = bytes(PATCH * PATCH)
        common = [np.frombuffer(b, dtype=np.uint8) for b, _ in counts.most_common() if b != empty][: n_masks - 1]
        return cls(np.stack([np.zeros(PATCH * PATCH, np.uint8)] + common), colors, backgrounds, size)

    # encode / decode --------------------------------------------------------------------------------
    def _classify(self, arrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S) palette indices and (N,) background index per image."""
        px = arrs >> 2
        cls_map = self._lut[px[..., 0], px[..., 1], px[..., 2]]
        C, B = self.n_colors, self.n_backgrounds
        counts = np.stack([(cls_map == C + b).sum((1, 2)) for b in range(B)], 1)
        return cls_map, counts.argmax(1)

    def encode_arrays(self, arrs: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, 65) int64 token ids (relative)."""
        if arrs.ndim == 3:
            arrs = arrs[None]
        n = arrs.shape[0]
        C, B = self.n_colors, self.n_backgrounds
        cls_map, bg = self._classify(arrs)
        p = to_patches(cls_map[..., None]).reshape(n, -1, PATCH * PATCH)  # palette index per pixel
        fg = p < C
        masks = fg.astype(np.uint8).reshape(-1, PATCH * PATCH)
        ids = np.array([self._mask_index.get(bytes(m), -1) for m in masks], dtype=np.int64)
        miss = ids < 0
        if miss.any():  # nearest mask by Hamming distance (never the empty one for a non-empty patch)
            d = (masks[miss, None, :] != self.masks[None]).sum(-1)
            d[:, 0] = 10_000
            ids[miss] = d.argmin(1)
        # majority object colour of each patch's foreground
        onehot = (p[..., None] == np.arange(C)).sum(2).reshape(-1, C)
        col = onehot.argmax(1)
        tok = np.where(ids == 0, B, B + 1 + (ids - 1) * C + col).reshape(n, -1)
        return np.concatenate([bg[:, None], tok], 1).astype(np.int64)

    def encode(self, images) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.tokens_per_image), dtype=np.int64)
        return self.encode_arrays(np.stack([image_to_array(i, self.size) for i in images]))

    def decode_arrays(self, codes: np.ndarray) -> np.ndarray:
        """(N, 65) relative ids -> (N, S, S, 3) uint8. Out-of-place ids decode leniently (a patch id as
        background: white; a background id as a patch: empty)."""
        codes = np.asarray(codes, dtype=np.int64)
        n = codes.shape[0]
        C, B = self.n_colors, self.n_backgrounds
        bgid = codes[:, 0]
        bgcol = self.backgrounds[np.where(bgid < B, bgid, 0).clip(0, B - 1)]  # (n, 3)
        t = codes[:, 1:] - B - 1
        valid = t >= 0
        m = np.where(valid, t // C + 1, 0).clip(0, self.n_masks - 1)
        c = np.where(valid, t % C, 0)
        fgmask = self.masks[m].astype(bool)  # (n, 64, 16)
        pix = np.broadcast_to(bgcol[:, None, None, :], fgmask.shape + (3,)).copy()
        pix[fgmask] = np.broadcast_to(self.colors[c][:, :, None, :], fgmask.shape + (3,))[fgmask]
        return from_patches(pix.reshape(n, -1, PATCH * PATCH * 3), self.size)

    def decode(self, codes: np.ndarray | torch.Tensor) -> list[Image.Image]:
        if isinstance(codes, torch.Tensor):
            codes = codes.cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in self.decode_arrays(codes)]


SPECIALS = ("<pad>", "<unk>", "<gen>", "<und>", "<prop>", "<ref>", "<img>", "<img2>", "<q>", "<a>",
            "<eos>", "<ex>", "<new>")


class Vocab:
    """One id space: specials, category tokens, words, then image codes."""

    def __init__(self, words: list[str], categories: list[str], n_codes: int):
        self.specials = list(SPECIALS)
        self.categories = list(categories)
        self.words = list(words)
        self.n_codes = n_codes
        self.itos = self.specials + [f"<cat:{c}>" for c in self.categories] + self.words
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.text_size = len(self.itos)
        self.img_offset = self.text_size
        self.size = self.text_size + n_codes
        for s in self.specials:
            setattr(self, s.strip("<>").upper(), self.stoi[s])

    def cat(self, category: str) -> int:
        return self.stoi[f"<cat:{category}>"]

    def text_ids(self, words: list[str]) -> list[int]:
        unk = self.stoi["<unk>"]
        return [self.stoi.get(w, unk) for w in words]

    def words_of(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if self.specials.__len__() + len(self.categories) <= i < self.text_size:
                out.append(self.itos[i])
        return out

    def to_json(self) -> dict:
        return {"words": self.words, "categories": self.categories, "n_codes": self.n_codes}

    @classmethod
    def from_json(cls, d: dict) -> "Vocab":
        return cls(d["words"], d["categories"], d["n_codes"])
