"""Vision-language policies: prompts with images as token ids, and the image inputs of a batch.

Contract
--------
- ``is_vision_language(config) -> bool``: the model has a vision tower (``config.vision_config``).
- ``ImageTextProcessor``: the text tokenizer (every tokenizer attribute reads through, so it goes wherever rlfr
  passes a tokenizer) plus the image processor. ``encode(prompts, images) -> (ids, VisionBatch)``;
  ``prompt_length(prompt, images)``; ``save_pretrained(dir)`` writes both, so a checkpoint's ``policy/``
  loads again as a vision-language model. ``load_processor(path, tokenizer, config, min_pixels,
  max_pixels)`` builds it.
- ``VisionBatch``: the image inputs of B rows. Qwen2/2.5-VL image processors flatten each image into
  ``t*h*w`` patches (``image_grid_thw`` row (t, h, w)), concatenated over the images of all rows in row order;
  so selecting rows (micro-batches, minibatch permutations, the n samples of a prompt) slices
  ``pixel_values`` by each row's patch count. ``select``, ``repeat_interleave``, ``cat``, ``to``.
- ``expand_image_tokens(ids, image_token_id, tokens_per_image) -> ids``: each image placeholder becomes as many
  placeholders as the image has merged patches, ``t*h*w / merge_size**2`` (the rule of the Qwen2-VL family).
- ``vision_inputs(vision, input_ids) -> dict | None``: the forward's keyword arguments. Position ids are the
  model's own: ``mm_token_type_ids`` (1 at image tokens) lets Qwen2.5-VL compute its 3-D rotary positions from
  the image grid (``get_rope_index``), so no ``position_ids`` are passed; ``None`` when no row has an image
  (the caller then passes ordinary 1-D positions, which the model broadcasts to its three rotary axes).
- ``freeze_vision_tower(model) -> int``: freezes the parameters under a ``visual`` / ``vision_tower`` /
  ``vision_model`` module (the authors' ``--freeze_prefix visual``); returns how many.
- ``images_of(tokenizer, examples)``: the per-example images when ``tokenizer`` is an ``ImageTextProcessor``,
  else None (and an error when a text-only model gets examples with images).

Why not transformers' ``AutoProcessor``: in transformers 5 the Qwen2/2.5-VL processor needs torchvision for
its video processor even for still images; rlfr needs only the tokenizer (and its chat template) and the
image processor (PIL backend), and expands the placeholders itself by the rule above. Supported families are
those whose image processor returns ``image_grid_thw`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); others (SmolVLM,
Idefics3: tiled ``pixel_values`` with a ``pixel_attention_mask``) are refused when loading, naming the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlfr.errors import ModelLoadError

_VISION_MODULES = ("visual", "vision_tower", "vision_model")
_VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def is_vision_language(config) -> bool:
    """True for a vision-language model's config (it has a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def expand_image_tokens(
    ids: Sequence[int], image_token_id: int, tokens_per_image: Sequence[int]
) -> list[int]:
    """Replace the i-th ``image_token_id`` of ``ids`` by ``tokens_per_image[i]`` copies of it.

    ``[5, I, 6, I]`` with counts ``[2, 3]`` -> ``[5, I, I, 6, I, I, I]``. The number of placeholders must
    equal the number of images."""
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(tokens_per_image):
        raise ValueError(f"the prompt holds {found} image placeholders for {len(tokens_per_image)} images")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_token_id:
            out += [t] * int(tokens_per_image[k])
            k += 1
        else:
            out.append(t)
    return out


@dataclass
class VisionBatch:
    """Image inputs of B rows: pixel_values (P, D) patches of every image, row by row; image_grid_thw (N, 3)
    long, one row per image; images_per_row (B,) long; image_token_id and merge_size of the model."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    images_per_row: torch.Tensor
    image_token_id: int
    merge_size: int

    @property
    def patches_per_image(self) -> torch.Tensor:
        """(N,) long: t * h * w."""
        return self.image_grid_thw.prod(-1)

    @property
    def patches_per_row(self) -> torch.Tensor:
        """(B,) long: the patches of each row's images."""
        row_of_image = torch.repeat_interleave(
            torch.arange(len(self.images_per_row)), self.images_per_row.cpu()
        )
        out = torch.zeros(len(self.images_per_row), dtype=torch.long)
        return out.index_add_(0, row_of_image, self.patches_per_image.cpu())

    @property
    def tokens_per_row(self) -> torch.Tensor:
        """(B,) long: the image tokens each row's prompt holds (patches / merge_size**2)."""
        return self.patches_per_row // self.merge_size**2

    def select(self, rows: torch.Tensor | slice | Sequence[int]) -> VisionBatch:
        """The image inputs of ``rows`` (in that order)."""
        n_rows = len(self.images_per_row)
        idx = list(range(n_rows))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).tolist()
        img_start = torch.cat([torch.zeros(1, dtype=torch.long), self.images_per_row.cpu().cumsum(0)])
        patch_start = torch.cat([torch.zeros(1, dtype=torch.long), self.patches_per_image.cpu().cumsum(0)])
        images: list[int] = []
        patches: list[torch.Tensor] = []
        for r in idx:
            a, b = int(img_start[r]), int(img_start[r + 1])
            images += range(a, b)
            if b > a:
                patches.append(torch.arange(int(patch_start[a]), int(patch_start[b])))
        image_idx = torch.tensor(images, dtype=torch.long)
        patch_idx = torch.cat(patches) if patches else torch.zeros(0, dtype=torch.long)
        dev = self.pixel_values.device
        return VisionBatch(
            self.pixel_values[patch_idx.to(dev)], self.image_grid_thw[image_idx.to(dev)],
            self.images_per_row[torch.as_tensor(idx, dtype=torch.long).to(self.images_per_row.device)],
            self.image_token_id, self.merge_size,
        )  # fmt: skip

    def repeat_interleave(self, n: int) -> VisionBatch:
        """Every row n times in a row (the n samples of a prompt)."""
        return self.select(torch.arange(len(self.images_per_row)).repeat_interleave(n))

    def to(self, device) -> VisionBatch:
        return VisionBatch(
            self.pixel_values.to(device), self.image_grid_thw.to(device), self.images_per_row.to(device),
            self.image_token_id, self.merge_size,
        )  # fmt: skip

    @staticmethod
    def cat(batches: Sequence[VisionBatch]) -> VisionBatch:
        first = batches[0]
        return VisionBatch(
            torch.cat([b.pixel_values for b in batches]), torch.cat([b.image_grid_thw for b in batches]),
            torch.cat([b.images_per_row for b in batches]), first.image_token_id, first.merge_size,
        )  # fmt: skip


def vision_inputs(vision: VisionBatch | None, input_ids: torch.Tensor) -> dict | None:
    """Forward kwargs for the image inputs of ``input_ids`` (B, T), or None without any image (docstring)."""
    if vision is None or len(vision.image_grid_thw) == 0:
        return None
    return {
        "pixel_values": vision.pixel_values,
        "image_grid_thw": vision.image_grid_thw,
        "mm_token_type_ids": (input_ids == vision.image_token_id).int(),
    }


class ImageTextProcessor:
    """The tokenizer of a vision-language model plus its image processor (module docstring).

    Attributes: ``tokenizer``, ``image_processor``, ``image_token`` / ``image_token_id`` (the placeholder the
    chat template writes once per image), ``merge_size``, ``suppress_ids`` (vision special tokens a response
    must never contain: a generated image placeholder would have no image behind it)."""

    def __init__(self, tokenizer, image_processor, image_token_id: int, suppress_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = int(image_processor.merge_size)
        self.suppress_ids = sorted({int(i) for i in suppress_ids} | {self.image_token_id})

    def __getattr__(self, name: str):
        # only reached for attributes not defined here: the tokenizer's (pad_token_id, decode, ...)
        if name in ("tokenizer", "image_processor"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def _encode_one(
        self, prompt: str, images: Sequence
    ) -> tuple[list[int], torch.Tensor | None, torch.Tensor]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not images:
            if self.image_token_id in ids:
                raise ValueError("a prompt without images holds an image placeholder")
            return ids, None, torch.zeros(0, 3, dtype=torch.long)
        out = self.image_processor(images=list(images), return_tensors="pt")
        grid = out["image_grid_thw"].long()
        ids = expand_image_tokens(ids, self.image_token_id, (grid.prod(-1) // self.merge_size**2).tolist())
        return ids, out["pixel_values"], grid

    def encode(
        self, prompts: Sequence[str], images: Sequence[Sequence]
    ) -> tuple[list[list[int]], VisionBatch]:
        """Token ids (image placeholders expanded) of each prompt and the image inputs of all of them."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        all_ids, pixels, grids, counts = [], [], [], []
        for prompt, imgs in zip(prompts, images):
            ids, pv, grid = self._encode_one(prompt, imgs)
            all_ids.append(ids)
            if pv is not None:
                pixels.append(pv)
            grids.append(grid)
            counts.append(len(grid))
        width = pixels[0].shape[1] if pixels else 0
        pv = torch.cat(pixels) if pixels else torch.zeros(0, width)
        vision = VisionBatch(pv, torch.cat(grids), torch.tensor(counts, dtype=torch.long), self.image_token_id,
                             self.merge_size)  # fmt: skip
        return all_ids, vision

    def prompt_length(self, prompt: str, images: Sequence) -> int:
        """Tokens of the prompt with its image placeholders expanded."""
        return len(self._encode_one(prompt, images)[0])

    def save_pretrained(self, directory, **kwargs):
        self.tokenizer.save_pretrained(directory, **kwargs)
        self.image_processor.save_pretrained(directory)


def load_processor(
    path: str, tokenizer, config, min_pixels: int | None = None, max_pixels: int | None = None
):
    """The ``ImageTextProcessor`` of the vision-language model at ``path`` (config: its ``AutoConfig``)."""
    from transformers import AutoImageProcessor  # lazy: its import takes seconds; only VL models need it

    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load the image processor of {path!r}: {e}") from e
    token_id = getattr(config, "image_token_id", None)
    if token_id is None or not hasattr(image_processor, "merge_size"):
        raise ModelLoadError(
            f"{path!r}: rlfr's vision path supports image processors with image_grid_thw and a merge_size "
            f"(Qwen2-VL, Qwen2.5-VL, Qwen3-VL); {type(image_processor).__name__} of a "
            f"{type(config).__name__} is not one"
        )
    if token_id >= len(tokenizer):
        raise ModelLoadError(
            f"{path!r}: image_token_id {token_id} is outside the tokenizer ({len(tokenizer)})"
        )
    suppress = [getattr(config, k) for k in _VISION_TOKEN_KEYS if getattr(config, k, None) is not None]
    return ImageTextProcessor(
        tokenizer, image_processor, token_id, [i for i in suppress if i < len(tokenizer)]
    )


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze every parameter under a vision module (``_VISION_MODULES``); -> how many were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if any(part in _VISION_MODULES for part in name.split(".")):
            p.requires_grad_(False)
            n += 1
    if n == 0:
        raise ModelLoadError(
            f"{type(model).__name__}: no parameter under {list(_VISION_MODULES)} to freeze; set "
            "model.freeze_vision=false or name the model's vision tower in rlfr.policy.vision._VISION_MODULES"
        )
    return n


def images_of(tokenizer, examples) -> list[tuple] | None:
    """Each example's images for a vision-language ``tokenizer`` (an ``ImageTextProcessor``), else None."""
    if isinstance(tokenizer, ImageTextProcessor):
        return [tuple(ex.images) for ex in examples]
    with_images = [ex for ex in examples if ex.images]
    if with_images:
        raise ValueError(
            f"{len(with_images)} examples have images (first {with_images[0].id!r}) but the model is text-only"
        )
    return None
