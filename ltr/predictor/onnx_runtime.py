"""The serving predictor's forward pass in ONNX Runtime: the same scores as torch, about twice as fast on CPU.

The predictor deployment scores a few prompts at a time on one thread per replica, on cores the engines are
busy with, and a late score leaves a request at the neutral placement. One test prompt at a time on one
thread, ONNX Runtime's fused graph took 14.5 ms on average against torch's 29.8 (p90 36 against 70), with
scores equal to 1e-5 (`benchmarks/predictor_quality.py runtime`, benchmarks/README.md, "The predictor in
ONNX Runtime"). The graph is exported from the loaded (merged) model when a replica loads it, so an
artifact stays what training wrote and a hot swap exports the new one.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ltr.predictor.model import PredictorConfig, RankPredictor


class _ScoreGraph(nn.Module):
    """What is exported: token ids and mask in, one ranking score per prompt out."""

    def __init__(self, model: RankPredictor) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.reduce(self.model(input_ids, attention_mask).float())


def export_onnx(model: RankPredictor) -> bytes:
    """The model's scoring graph as ONNX, batch and sequence length dynamic."""
    example = model.collate(model.tokenize(["An example prompt, to trace the graph.", "hi"]), "cpu")
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # torch's TorchScript-based exporter (the dynamo one needs onnxscript) warns that it is deprecated,
        # and the tracer about the shape checks it freezes (the dynamic axes below keep the shapes free).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # BERT's position ids are sliced with non-negative indices, the case this warning says is exported right.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(_ScoreGraph(model).eval(), example, buffer, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["score"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "score": {0: "batch"}},
                          opset_version=17)
    return buffer.getvalue()


class OnnxRankPredictor:
    """A `RankPredictor` for serving whose forward pass runs in ONNX Runtime; the tokenizer, the chat renderer
    and the calibration stay the torch model's own, so every input and every expected length is the same."""

    def __init__(self, model: RankPredictor, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model = model
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Threads sleep between runs instead of spinning, as the torch path's OpenMP threads do
        # (deployments.machine.omp_env): the cores belong to the engines.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(export_onnx(model), options, providers=["CPUExecutionProvider"])

    @property
    def config(self) -> PredictorConfig:
        return self.model.config

    def score(self, prompts: Sequence[str]) -> list[float]:
        """Ranking scores, higher = longer expected output, each prompt run alone: a batch of prompts of
        different lengths would be padded to its longest, which costs more on a CPU than it saves."""
        scores = []
        for ids in self.model.tokenize(prompts):
            tokens = np.asarray([ids], dtype=np.int64)
            (score,) = self.session.run(None, {"input_ids": tokens, "attention_mask": np.ones_like(tokens)})
            scores.append(float(score[0]))
        return scores

    def chat_input(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self.model.chat_input(messages)

    def expected_tokens(self, scores: Sequence[float]) -> list[float]:
        return self.model.expected_tokens(scores)
