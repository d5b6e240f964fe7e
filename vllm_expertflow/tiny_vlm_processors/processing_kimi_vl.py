"""Kimi-VL's image processor and processor, as the released checkpoint's remote code does it.

What vLLM's ``kimi_vl.py`` relies on: ``image_processor.patch_size``, ``merge_kernel_size`` and
``in_token_limit``; images larger than ``in_token_limit`` patches are scaled down, then padded to
a multiple of ``merge_kernel_size * patch_size`` and cut into ``[patches, 3, patch, patch]``
with ``image_grid_hws [images, 2]``; the processor repeats ``<|media_pad|>`` once per merged patch.
PIL and torch only (no torchvision).
"""

import math

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class KimiVLImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_hws"]

    def __init__(self, patch_size=14, in_token_limit=4096, merge_kernel_size=(2, 2), image_mean=OPENAI_MEAN,
                 image_std=OPENAI_STD, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.in_token_limit = in_token_limit
        self.merge_kernel_size = list(merge_kernel_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def _resize_and_pad(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        patch = self.patch_size
        if (width // patch) * (height // patch) > self.in_token_limit:
            scale = math.sqrt(self.in_token_limit / ((width // patch) * (height // patch)))
            image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.BICUBIC)
        width, height = image.size
        unit_h, unit_w = self.merge_kernel_size[0] * patch, self.merge_kernel_size[1] * patch
        padded = Image.new("RGB", (width + (unit_w - width % unit_w) % unit_w, height + (unit_h - height % unit_h) % unit_h))
        padded.paste(image, (0, 0))
        return padded

    def _patchify(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        pixels = (pixels - torch.tensor(self.image_mean)[:, None, None]) / torch.tensor(self.image_std)[:, None, None]
        channels, height, width = pixels.shape
        patch = self.patch_size
        patches = pixels.reshape(channels, height // patch, patch, width // patch, patch).permute(1, 3, 0, 2, 4)
        return patches.reshape(-1, channels, patch, patch), (height // patch, width // patch)

    def preprocess(self, images, return_tensors=None, **kwargs):
        if not isinstance(images, (list, tuple)):
            images = [images]
        patches, grids = zip(*(self._patchify(self._resize_and_pad(image)) for image in images), strict=True)
        return BatchFeature(data={"pixel_values": torch.cat(patches), "image_grid_hws": torch.tensor(grids)},
                            tensor_type=return_tensors)


class KimiVLProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|media_pad|>"
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, **kwargs):
        kwargs.pop("return_tensors", None)
        image_inputs = self.image_processor(images, return_tensors="pt") if images is not None else {}
        texts = [text] if isinstance(text, str) else list(text or [])
        if image_inputs:
            merge = self.image_processor.merge_kernel_size[0] * self.image_processor.merge_kernel_size[1]
            counts = iter((image_inputs["image_grid_hws"].prod(-1) // merge).tolist())
            for i, prompt in enumerate(texts):
                while self.image_token in prompt:
                    prompt = prompt.replace(self.image_token, "<|placeholder|>" * next(counts), 1)
                texts[i] = prompt.replace("<|placeholder|>", self.image_token)
        text_inputs = self.tokenizer(texts, return_tensors="pt", **kwargs)
        return BatchFeature(data={**text_inputs, **image_inputs})
