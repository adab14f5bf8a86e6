"""Embeddings: pool a prompt's final hidden states into one vector (`LLM.embed`, `/v1/embeddings`).

An engine built with `runner="pooling"` runs every request as a prompt and nothing else: the scheduler computes
the prompt in chunks as usual, the runner hands each chunk's hidden states to `Pooler.update` (which keeps a
running sum, the first state or nothing, in `Sequence.pooled`), and when the last chunk is done the request
ends with the pooled vector; its KV blocks go back at once and nothing is sampled.

How to pool comes from the model's sentence-transformers files when it has them (`modules.json` names a
Pooling module whose `config.json` says last-token, mean or CLS, and a Normalize module turns on L2
normalisation), else vLLM's default for decoder models: the last token, normalised. `pooler_config`
({"pooling_type": "MEAN", "normalize": false}) overrides either.
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampling import ParamError

POOLING_TYPES = ("LAST", "MEAN", "CLS")
# sentence-transformers' Pooling config key -> our pooling type
ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}


@dataclass
class PoolingParams:
    """Per request: `dimensions` keeps the first d components (Matryoshka models only), `normalize` overrides
    the model's L2 normalisation."""
    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self):
        if self.dimensions is not None and self.dimensions < 1:
            raise ParamError("Dimensions must be greater than 0", "dimensions")


@dataclass
class PoolingRequestOutput:
    """One prompt's embedding, as vLLM's `EmbeddingRequestOutput` (`outputs.embedding`)."""
    request_id: str
    prompt_token_ids: list[int]
    outputs: "EmbeddingOutput"
    finished: bool = True


@dataclass
class EmbeddingOutput:
    embedding: list[float]


class Pooler:
    def __init__(self, pooling_type: str, normalize: bool, matryoshka: bool | list[int] = False):
        if pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {pooling_type!r}")
        self.pooling_type, self.normalize, self.matryoshka = pooling_type, normalize, matryoshka

    @classmethod
    def for_model(cls, model_dir: str, hf_config, overrides: dict | None) -> "Pooler":
        settings = {"pooling_type": "LAST", "normalize": True, **_sentence_transformers_pooling(model_dir)}
        unknown = set(overrides or {}) - {"pooling_type", "normalize"}
        if unknown:
            raise ValueError(f"pooler_config has unknown keys {sorted(unknown)}")
        settings.update(overrides or {})
        matryoshka = getattr(hf_config, "matryoshka_dimensions", None) or getattr(hf_config, "is_matryoshka", False)
        return cls(settings["pooling_type"].upper(), bool(settings["normalize"]), matryoshka)

    def check(self, params: PoolingParams, model_name: str) -> None:
        """vLLM's checks and wording: `dimensions` only where the model was trained for it (Matryoshka)."""
        if params.dimensions is None:
            return
        if not self.matryoshka:
            raise ParamError(f'Model "{model_name}" does not support matryoshka representation, changing output '
                             "dimensions will lead to poor results.", "dimensions")
        if isinstance(self.matryoshka, list) and params.dimensions not in self.matryoshka:
            raise ParamError(f"Model \"{model_name}\" only supports {self.matryoshka} matryoshka dimensions, use "
                             "other output dimensions will lead to poor results.", "dimensions")

    def update(self, seq, hidden: torch.Tensor, start: int, last: bool) -> torch.Tensor | None:
        """Fold one chunk's hidden states (prompt positions start.. of `seq`) into the pooled state; the raw
        pooled vector once the chunk is the prompt's last. A chunk at position 0 starts afresh (a preempted
        prompt is computed again from the start)."""
        if self.pooling_type == "MEAN":
            total = hidden.float().sum(dim=0)
            seq.pooled = total if start == 0 else seq.pooled + total
            return seq.pooled / seq.num_tokens if last else None
        if self.pooling_type == "CLS":
            if start == 0:
                seq.pooled = hidden[0].float()
            return seq.pooled if last else None
        return hidden[-1].float() if last else None

    def finish(self, pooled: torch.Tensor, params: PoolingParams) -> list[float]:
        """Matryoshka truncation first, then normalisation, as vLLM's embedding head does."""
        if params.dimensions is not None:
            pooled = pooled[:params.dimensions]
        if self.normalize if params.normalize is None else params.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().tolist()


def _sentence_transformers_pooling(model_dir: str) -> dict:
    """{"pooling_type", "normalize"} from modules.json and the Pooling module's config, or {} without them."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        modules = json.load(f)
    settings = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            with open(os.path.join(model_dir, module.get("path", ""), "config.json")) as f:
                pooling = json.load(f)
            modes = [mode for key, mode in ST_MODES.items() if pooling.get(key)]
            if len(modes) != 1:
                raise ValueError(f"Unsupported sentence-transformers pooling in {model_dir}: {pooling}")
            settings["pooling_type"] = modes[0]
    return settings
