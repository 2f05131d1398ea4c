"""The quality suite's prompt set: prompt and NAG-negative pairs, built in or read from ``--prompts FILE``."""

from __future__ import annotations

import json
from pathlib import Path

# Prompt and NAG-negative pairs: the first is the paper's; the others each name one thing the negative should remove
# (an object, a colour, an attribute), plus one quality negative as people use NAG in practice.
PROMPTS: tuple[tuple[str, str], ...] = (
    ("Portrait of AI researcher.", "Glasses."),
    ("A tabby cat sleeping on a sunny windowsill.", "Stripes."),
    ("A bowl of fruit on a wooden kitchen table.", "Apples."),
    ("A busy city street at night in the rain.", "Cars."),
    ("A lighthouse on a rocky coast at sunset.", "Clouds."),
    ("A child's bedroom full of toys.", "Teddy bear."),
    ("A bouquet of flowers in a glass vase.", "Red."),
    ("A red sports car parked in front of a modern house.", "Blurry, low quality, deformed, cartoon."),
)



def load_prompts(path: str | None) -> list[tuple[str, str]]:
    """The built-in set, or ``--prompts FILE`` (JSON or tab-separated text); errors name the file and the entry."""
    if path is None:
        return list(PROMPTS)
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise SystemExit(f"--prompts: cannot read {path}: {exc}") from None
    pairs: list[tuple[str, str]] = []
    if file.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--prompts: {path} is not valid JSON: {exc}") from None
        if not isinstance(doc, list):
            raise SystemExit(f"--prompts: {path} must hold a JSON list, got {type(doc).__name__}")
        for i, item in enumerate(doc):
            if isinstance(item, dict) and {"prompt", "nag_negative_prompt"} <= set(item):
                pairs.append((item["prompt"], item["nag_negative_prompt"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                raise SystemExit(f"--prompts: entry {i} of {path} must be {{\"prompt\": ..., \"nag_negative_prompt\": "
                                 f"...}} or [prompt, negative], got {item!r}")
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise SystemExit(f"--prompts: line {n} of {path} must be 'prompt<TAB>NAG negative', got {line!r}")
            pairs.append((parts[0].strip(), parts[1].strip()))
    for prompt, negative in pairs:
        if not (isinstance(prompt, str) and isinstance(negative, str) and prompt.strip() and negative.strip()):
            raise SystemExit(f"--prompts: every prompt and NAG negative must be a non-empty string, got "
                             f"{prompt!r} / {negative!r} in {path}")
    if not pairs:
        raise SystemExit(f"--prompts: {path} holds no prompts")
    return pairs
