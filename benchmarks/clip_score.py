"""CLIP similarity of an image to a text: how close a generated image is to its prompt and to its NAG negative.

``ClipScorer`` wraps transformers' ``CLIPModel``; ``load_clip`` returns one, or ``None`` and a note saying why not
(no ``--clip-model``, transformers missing, the model cannot be loaded): a missing CLIP model never costs the images.
"""

from __future__ import annotations

import torch

from . import harness as h


class ClipScorer:
    """Cosine similarity of CLIP image and text embeddings (transformers' ``CLIPModel``), both L2-normalized."""

    def __init__(self, name: str, device: torch.device):
        from transformers import AutoProcessor, CLIPModel

        self.name = name
        self.device = device
        self.model = CLIPModel.from_pretrained(name).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(name)
        self._text: dict[str, torch.Tensor] = {}

    @staticmethod
    def _embedding(out) -> torch.Tensor:
        # transformers 4 returns the projected tensor; 5 a BaseModelOutputWithPooling whose pooler_output it is
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text(self, text: str) -> torch.Tensor:
        if text not in self._text:
            inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True).to(self.device)
            self._text[text] = self._embedding(self.model.get_text_features(**inputs))[0]
        return self._text[text]

    @torch.no_grad()
    def image(self, image) -> torch.Tensor:
        inputs = self.processor(images=[image], return_tensors="pt").to(self.device)
        pixels = inputs["pixel_values"].to(self.model.dtype)
        return self._embedding(self.model.get_image_features(pixel_values=pixels))[0]

    def similarity(self, image_embedding: torch.Tensor, text: str) -> float:
        return float(image_embedding @ self.text(text))


def load_clip(name: str | None, device: torch.device) -> tuple[ClipScorer | None, str]:
    """The scorer and a one-line note of what happened (loaded, not asked for, or why it was skipped)."""
    if not name:
        return None, "CLIP similarity not measured (no --clip-model given)"
    try:
        scorer = ClipScorer(name, device)
    except ImportError as exc:
        return None, f"CLIP similarity skipped: transformers is needed (pip install transformers): {h.error_text(exc)}"
    except Exception as exc:  # noqa: BLE001 - a missing CLIP model must not cost the images
        return None, f"CLIP similarity skipped: --clip-model {name} could not be loaded ({h.error_text(exc)})"
    return scorer, f"CLIP similarity with {name}"
