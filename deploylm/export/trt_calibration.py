"""int8 calibration for TensorRT: batches of real token ids fed to an IInt8EntropyCalibrator2.

TensorRT calibrates at the calibration profile's opt shape, so every batch is exactly
[opt rows, opt sequence] (left-padded or truncated). `calibration_batches` is pure (tested here);
`make_calibrator` needs tensorrt and CUDA.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from deploylm.errors import UsageError
from deploylm.export.trt_shapes import ShapeSet

DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Translate English to French: the house is wonderful and the garden is green.",
    "Summarize: the committee met on Tuesday to discuss the budget for next year.",
    "Once upon a time there was a small village at the edge of a large forest.",
    "Question: what is the capital of Italy? Answer: Rome.",
    "def add(a, b):\n    return a + b",
    "The results show that the new method is faster and uses less memory.",
    "Please write a short poem about the sea and the wind.",
)


def calibration_batches(token_lists: Iterable[list[int]], rows: int, seq: int, pad_id: int,
                        samples: int) -> list[dict[str, list[list[int]]]]:
    """Up to `samples` sequences as batches of exactly [rows, seq]: input_ids, attention_mask,
    position_ids (left padding, positions = cumsum(mask) - 1 clamped at 0), cycling the token
    lists when there are fewer than `samples`."""
    pool = [list(t)[:seq] for t in token_lists if len(t) > 0]
    if not pool:
        raise UsageError("int8 calibration needs at least one non-empty text")
    count = max(rows, samples - samples % rows)
    batches = []
    for start in range(0, count, rows):
        ids, mask, pos = [], [], []
        for k in range(start, start + rows):
            tokens = pool[k % len(pool)]
            pad = seq - len(tokens)
            ids.append([pad_id] * pad + tokens)
            mask.append([0] * pad + [1] * len(tokens))
            pos.append([0] * pad + list(range(len(tokens))))
        batches.append({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    return batches


def _tokenize(artifact_dir: Path, texts: Iterable[str]) -> tuple[list[list[int]], int]:
    from tokenizers import Tokenizer

    path = artifact_dir / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{artifact_dir}: int8 calibration needs tokenizer.json (or pass calibration token ids)")
    tok = Tokenizer.from_file(str(path))
    pad = tok.token_to_id("<pad>")
    return [tok.encode(t).ids for t in texts], 0 if pad is None else pad


def make_calibrator(trt: Any, artifact_dir: Path, shapes: ShapeSet, profile: Any,
                    calibration: Iterable[list[int]] | None, cache: Path, device: str = "cuda") -> Any:
    """An IInt8EntropyCalibrator2 over batches at the opt shapes of `shapes` (profile 0); the
    batches live in torch memory on `device` and are handed to TensorRT by address."""
    import torch

    if "input_ids" not in shapes or any(k.startswith("encoder_") for k in shapes):
        raise UsageError("TensorRT int8 calibration supports decoder-only models and encoders; "
                         "use trt-fp16 for an encoder-decoder's decoder")
    if calibration is None:
        calibration, pad_id = _tokenize(artifact_dir, DEFAULT_TEXTS)
    else:
        pad_id = 0
    rows, seq = shapes["input_ids"][1]
    quant = getattr(profile, "quantization", None)
    samples = getattr(quant, "calibration_samples", None) or 64
    batches = calibration_batches(calibration, rows, seq, pad_id, samples)
    device = torch.device(device)

    def feeds(batch: dict[str, list[list[int]]]) -> dict[str, Any]:
        out = {}
        for name, (_, opt, _) in shapes.items():
            if name in batch:
                out[name] = torch.tensor(batch[name], dtype=torch.int64, device=device)
            else:  # past_key_values at prefill: [rows, H, 0, D], empty
                out[name] = torch.zeros(opt, dtype=torch.float32, device=device)
        return out

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)   # pybind11 base must be initialised explicitly
            self.index, self.live = 0, {}
            self.dummy = torch.zeros(1, device=device)   # an address for zero-size tensors

        def get_batch_size(self) -> int:
            return 1                                     # explicit-batch networks ignore it

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(batches):
                return None
            self.live = feeds(batches[self.index])
            self.index += 1
            return [int(self.live[n].data_ptr() if self.live[n].numel() else self.dummy.data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()
