"""Zero-shot heads: CLIP text embeddings of prompt sets, turned into linear head weights.

CLIP zero-shot classification is `logit_scale * normalize(image_embed) @ normalize(class_embed).T`,
so once the class embeddings are computed the text tower is no longer needed: the class embeddings
(times the logit scale) are the rows of a linear head on the normalised image embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Templates from CLIP's own facial-expression evaluation (REFERENCE.md section 4).
_EMOTION_TEMPLATES = (
    "a photo of a {} looking face.",
    "a photo of a face showing the emotion: {}.",
    "a photo of a face looking {}.",
    "a face that looks {}.",
    "they look {}.",
    "look at how {} they are.",
)
_EMOTION_WORDS = {
    "surprise": ("surprised", "shocked", "spooked"),
    "fear": ("fearful",),
    "disgust": ("disgusted",),
    "happy": ("happy", "smiling"),
    "sad": ("sad", "depressed"),
    "angry": ("angry",),
    "neutral": ("neutral", "bored"),
}
_AGE_PHRASES = {
    "0-2": ("a baby", "a person aged 0 to 2 years"),
    "3-9": ("a child", "a person aged 3 to 9 years"),
    "10-19": ("a teenager", "a person aged 10 to 19 years"),
    "20-29": ("a young adult in their twenties", "a person aged 20 to 29 years"),
    "30-39": ("an adult in their thirties", "a person aged 30 to 39 years"),
    "40-49": ("an adult in their forties", "a person aged 40 to 49 years"),
    "50-59": ("an adult in their fifties", "a person aged 50 to 59 years"),
    "60-69": ("a senior in their sixties", "a person aged 60 to 69 years"),
    "70+": ("an elderly person", "a person aged 70 or older"),
}
_GENDER_PHRASES = {
    "male": ("a man", "a male", "a boy or a man"),
    "female": ("a woman", "a female", "a girl or a woman"),
}


def _expand(phrases: dict[str, tuple[str, ...]], templates: tuple[str, ...]) -> dict[str, list[str]]:
    return {label: [t.format(p) for p in words for t in templates] for label, words in phrases.items()}


DEFAULT_PROMPTS: dict[str, dict[str, list[str]]] = {
    "age": _expand(_AGE_PHRASES, ("a photo of {}.", "a close-up photo of the face of {}.")),
    "gender": _expand(_GENDER_PHRASES, ("a photo of {}.", "a close-up photo of the face of {}.")),
    "emotion": _expand(_EMOTION_WORDS, _EMOTION_TEMPLATES),
}


def validate_prompts(prompts: dict[str, dict[str, list[str]]]) -> None:
    """Raise a ValueError naming the task and label of any empty or malformed prompt set."""
    if not isinstance(prompts, dict) or not prompts:
        raise ValueError("prompts must map task -> label -> list of prompt strings, e.g. {'gender': {'male': [...]}}.")
    for task, labels in prompts.items():
        if not isinstance(labels, dict) or len(labels) < 2:
            raise ValueError(f"prompts[{task!r}] must map at least two labels to their prompt lists.")
        for label, texts in labels.items():
            if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"prompts[{task!r}][{label!r}] must be a non-empty list of non-empty strings.")


def _text_embeddings(clip_model, tokenizer, texts: list[str]) -> torch.Tensor:
    device = next(clip_model.parameters()).device
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
    features = clip_model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    # transformers >= 5.2x returns a model output whose pooler_output holds the projected features.
    features = getattr(features, "pooler_output", features)
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def class_embeddings(clip_model, tokenizer, prompts: dict[str, dict[str, list[str]]]) -> dict[str, torch.Tensor]:
    """Per task, a [num_labels, projection_dim] matrix of averaged, normalised prompt embeddings."""
    validate_prompts(prompts)
    result = {}
    for task, labels in prompts.items():
        rows = [
            F.normalize(_text_embeddings(clip_model, tokenizer, list(texts)).mean(dim=0), dim=-1)
            for texts in labels.values()
        ]
        result[task] = torch.stack(rows)
    return result
