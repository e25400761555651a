"""Hugging Face and GGUF models for the torch backend: load, pick dtype/device, read special tokens.

A Hugging Face folder loads with AutoModelForCausalLM (decoder-only) or AutoModelForSeq2SeqLM
(encoder-decoder, chosen by `config.is_encoder_decoder`). A `.gguf` file loads through transformers'
GGUF support (dequantized to `dtype`; needs the `gguf` and `accelerate` packages). Special tokens come
from the model's generation_config, then its config (`special_tokens`).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch

from deploylm.backends.base import ModelInfo, SpecialTokens
from deploylm.errors import MissingDependencyError, UsageError
from deploylm.models.source import Source

log = logging.getLogger("deploylm")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Generation settings a model may carry as defaults (generation_config.json); deploylm reads these.
GENERATION_DEFAULT_KEYS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "early_stopping",
                           "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences",
                           "max_time", "temperature", "top_k", "top_p")   # the last three apply when a call samples
# generation_config settings the decoder applies as logits processors (carried on ModelInfo.generation).
# The call's DecodingOptions replace sequence_bias, encoder_repetition_penalty, encoder_no_repeat_ngram_size and
# exponential_decay_length_penalty when they give them; num_beam_groups > 1 makes beam search a UsageError
# (transformers 5's generate refuses group beam search without trust_remote_code).
DECODING_KEYS = ("bad_words_ids", "min_length", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                 "begin_suppress_tokens", "sequence_bias", "encoder_repetition_penalty",
                 "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "num_beam_groups")
# generation_config settings that change transformers.generate's output but that deploylm's decoder
# does not apply (it warns once per model that sets them). diversity_penalty is not one: transformers 5
# uses it only in group beam search (refused above), so without num_beam_groups it changes nothing there either.
# do_sample: deploylm samples only when the call asks (do_sample=True), then with the model's temperature,
# top_k and top_p; the next five are sampling filters it does not implement. renormalize_logits (a log-softmax
# after the processors: other beam scores, and other beams with a repetition penalty), guidance_scale
# (classifier-free guidance: extra model calls), watermarking_config (a green-list bias) and stop_strings change
# greedy and beam search too; penalty_alpha (contrastive search) and dola_layers make transformers 5's generate
# refuse without trust_remote_code, where deploylm decodes plainly.
NOT_APPLIED_KEYS = ("do_sample", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "renormalize_logits",
                    "guidance_scale", "watermarking_config", "stop_strings", "penalty_alpha", "dola_layers")
# values of DECODING_KEYS and NOT_APPLIED_KEYS that mean "off" (transformers' defaults): not carried, not warned
_OFF_VALUES = {"min_length": 0, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
               "num_beam_groups": 1, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
               "guidance_scale": 1.0, "penalty_alpha": 0.0}


# rotary embeddings whose frequencies depend on the longest position of each forward call (transformers picks
# longrope's long or short factors, and dynamic NTK's base, from it): a batch must be prefilled in one call
LENGTH_DEPENDENT_ROPE = ("longrope", "dynamic")


def rope_depends_on_length(config: Mapping[str, Any]) -> bool:
    """Whether a config.json's rotary embedding is one of LENGTH_DEPENDENT_ROPE (see rope_types)."""
    return bool(rope_types(config) & set(LENGTH_DEPENDENT_ROPE))


def rope_types(config: Mapping[str, Any]) -> set[str]:
    """The rope types a config.json (a dict) names: `rope_parameters`, or the older `rope_scaling`; per
    layer type too; a multimodal model's `text_config` as well."""
    found = set()
    for scope in (config, config.get("text_config")):
        if not isinstance(scope, Mapping):
            continue
        for key in ("rope_parameters", "rope_scaling"):
            value = scope.get(key)
            if not isinstance(value, Mapping):
                continue
            tables = [value] if ("rope_type" in value or "type" in value) else list(value.values())
            found |= {str(t.get("rope_type") or t.get("type")) for t in tables
                      if isinstance(t, Mapping) and (t.get("rope_type") or t.get("type"))}
    return found


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """"float32" | "float16" | "bfloat16" (or a torch.dtype) -> torch.dtype; anything else is a UsageError."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """"cpu" | "cuda" | "cuda:N" -> torch.device; CUDA asked for but absent is a UsageError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise UsageError(f"device {name!r}: expected one of {', '.join(DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {str(name)!r}: CUDA is not available on this machine "
                         f"(torch {torch.__version__}); use --device cpu")
    return device


def check_weights(folder: Path) -> None:
    """A Hugging Face folder must hold weights; say which files were expected when it does not."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"model folder {str(folder)!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    # transformers reports an unreadable weight file as "No such file or directory"
    unreadable = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and not os.access(p, os.R_OK)]
    if unreadable:
        raise UsageError(f"{unreadable[0]}: cannot read it (permission denied): check the permissions of the model "
                         "folder's files")


# What transformers and its readers raise on a folder or file they cannot read: malformed JSON values,
# truncated or foreign safetensors / GGUF bytes, tensors of the wrong shape.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, RuntimeError, TypeError,
                                                 AttributeError, IndexError, OverflowError, struct.error)


def _load_errors() -> tuple[type[BaseException], ...]:
    errors = _LOAD_ERRORS
    try:
        from safetensors import SafetensorError
        errors = (*errors, SafetensorError)
    except ImportError:                     # pragma: no cover - safetensors comes with transformers
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError   # config.json values of the wrong type
        errors = (*errors, StrictDataclassError)
    except ImportError:                     # pragma: no cover - older huggingface_hub
        pass
    return errors


def load_hf_config(source: Source) -> Any:
    """A Hugging Face folder's config as transformers reads it, with load_hf_model's checks of its files
    (for callers that need the config before the model, e.g. distill planning the student's layers)."""
    from transformers import AutoConfig

    check_generation_config(source.path)
    check_config_sizes(source.path)
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except _load_errors() as exc:
        raise _load_error(source, exc) from None


def _load_error(source: Source, exc: BaseException) -> UsageError:
    """What a Hugging Face folder that transformers did not load is told, most specific first: a config.json
    field of the wrong type, a damaged weight file, a model that needs its own code, else transformers' reason."""
    what = f"model folder {str(source.path)!r}"
    if _is_config_type_error(exc):   # huggingface_hub's strict config fields: "expected int, got str"
        return _config_type_error(source, exc)
    damaged = _damaged_weight_file(source.path)
    if damaged is not None:
        return UsageError(f"{what} does not load as a Hugging Face causal or seq2seq LM: {damaged}")
    if _needs_own_code(source.path):
        return UsageError(f"{what} needs its own Python code (config.json \"auto_map\"), which deploylm does not "
                          "run: use a model whose architecture transformers includes")
    return UsageError(f"{what} does not load as a Hugging Face causal or seq2seq LM: {_first_line(exc)}")


def _config_type_error(source: Source, exc: BaseException) -> UsageError:
    return UsageError(f"{source.path / 'config.json'}: a setting has the wrong type: {' '.join(str(exc).split())}")


def _is_config_type_error(exc: BaseException) -> bool:
    """A config.json field of the wrong type (not a config whose values do not fit together: _first_line)."""
    try:
        from huggingface_hub.errors import StrictDataclassFieldValidationError
    except ImportError:                     # pragma: no cover - older huggingface_hub: no strict config fields
        return False
    return isinstance(exc, StrictDataclassFieldValidationError)


# config.json sizes transformers accepts at any integer value, then fails on far from the file (a ZeroDivisionError
# for 0 heads, an assertion for a vocabulary of 0, a ValueError in the cache for -1 layers)
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "num_heads",
                   "num_key_value_heads", "intermediate_size", "n_inner", "d_ff", "d_kv", "max_position_embeddings",
                   "n_positions", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                   "decoder_ffn_dim", "head_dim")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")


def check_config_sizes(folder: Path) -> None:
    """config.json's sizes must be positive (layer counts: not negative)."""
    import json

    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return                                # named by resolve_source / transformers
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if (key in _POSITIVE_SIZES and value < 1) or (key in _LAYER_COUNTS and value < 0):
            expected = "a positive integer" if key in _POSITIVE_SIZES else "an integer >= 0"
            raise UsageError(f"{file}: {key} is {value}: expected {expected}")


_TOKEN_KEYS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")
_INT_KEYS = ("num_beams", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size", "num_return_sequences", "top_k")
_NUMBER_KEYS = ("length_penalty", "repetition_penalty", "temperature", "top_p")


def check_generation_config(folder: Path) -> None:
    """generation_config.json, when there is one, must be a JSON object whose token ids and decoding defaults
    have their types: transformers replaces an unreadable file with defaults derived from config.json without
    a word (the model's own EOS tokens and defaults would be lost silently), and keeps values of the wrong
    type, which would fail later far from the file."""
    import json

    file = Path(folder) / "generation_config.json"
    if not file.is_file():
        return
    try:
        gen = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: not valid JSON ({_first_line(exc)}): expected the model's generation "
                         "settings as a JSON object (or no such file)") from None
    if not isinstance(gen, dict):
        raise UsageError(f"{file}: expected a JSON object of generation settings, got {type(gen).__name__}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key, value in gen.items():
        ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
        if ((key in _TOKEN_KEYS and value is not None and not all(integer(v) for v in ids))
                or (key in _INT_KEYS and value is not None and not integer(value))
                or (key in _NUMBER_KEYS and value is not None and not (integer(value) or isinstance(value, float)))
                or (key == "early_stopping" and value not in (True, False, "never"))):
            expected = ("a token id (an integer)" + (" or a list of them" if key == "eos_token_id" else "")
                        if key in _TOKEN_KEYS else "an integer" if key in _INT_KEYS else "a number"
                        if key in _NUMBER_KEYS else "true, false or \"never\"")
            raise UsageError(f"{file}: {key} is {json.dumps(value)}: expected {expected}")


def _damaged_weight_file(folder: Path) -> str | None:
    """Which weight file of a folder that did not load is damaged, in words; None when none is seen to be.
    transformers' own errors name no file ("[Errno 22] Invalid argument" for a truncated pytorch_model.bin,
    a JSON error for a broken index, "incomplete metadata" for one truncated shard of many)."""
    import json
    import zipfile

    for file in sorted(Path(folder).iterdir()):
        if not file.is_file():
            continue
        try:
            if file.name.endswith(".index.json"):
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix == ".bin":
                with open(file, "rb") as fh:
                    zipped = fh.read(2) == b"PK"
                if zipped and not zipfile.is_zipfile(file):     # torch.save's zip, cut short: no central directory
                    return f"{file} is truncated or damaged (a zip archive without its end)"
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            return f"{file} is damaged or truncated ({_first_line(exc)})"
    return None


def _needs_own_code(folder: Path) -> bool:
    import json

    try:
        return "auto_map" in json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_hf_model(source: Source, *, dtype: torch.dtype, device: torch.device) -> Any:
    """Load a Hugging Face folder or a .gguf file as an eval-mode transformers model on `device`.

    Weights the model needs but the folder lacks are refused: transformers would fill them with fresh
    random values (and a different set on every load), so the model would run and answer nonsense."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if source.kind == "gguf":
        return _load_gguf(source.path, dtype=dtype, device=device)
    if source.kind != "hf":
        raise UsageError(f"model {str(source.path)!r} is {source.a_kind}, not a Hugging Face folder or .gguf file")
    check_weights(source.path)
    check_generation_config(source.path)
    check_config_sizes(source.path)
    what = f"model folder {str(source.path)!r}"
    try:   # trust_remote_code=False: never run a folder's own Python code, nor ask on the terminal whether to
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        with _no_load_report():
            model, loading = auto.from_pretrained(source.path, dtype=dtype, output_loading_info=True,
                                                  trust_remote_code=False,
                                                  ignore_mismatched_sizes=True)   # named in check_loaded_weights
    except _load_errors() as exc:
        raise _load_error(source, exc) from None
    check_loaded_weights(what, type(model).__name__, loading)
    return model.to(device).eval()


@contextlib.contextmanager
def _no_load_report() -> Any:
    """transformers logs a table of missing, unexpected and misshapen weights (its LOAD REPORT) at warning
    level while loading; check_loaded_weights says what matters in one line instead."""
    logger = logging.getLogger("transformers.modeling_utils")   # (its level is left alone: transformers
    drop = _DropLoadReport()                                    # reads it to decide other checks)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def check_loaded_weights(what: str, model_class: str, loading: Mapping[str, Any], hint: str = (
        "check config.json against the weight files, and that the folder holds a language-model head")) -> None:
    """UsageError naming the weights `model_class` needs that the files do not hold (or hold in another
    shape); `loading` is transformers' output_loading_info. Weights the files hold that the model does
    not use are named in a one-line warning (transformers' own report is silenced)."""
    unused = sorted(str(k) for k in loading.get("unexpected_keys") or ())
    if unused:
        log.warning("%s: %d weight(s) in its files are not used by %s (%s)", what, len(unused), model_class,
                    _some(unused))
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = [str(item[0]) if isinstance(item, (tuple, list)) else str(item)
                  for item in loading.get("mismatched_keys") or ()]
    if not missing and not mismatched:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing ({_some(missing)})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape ({_some(mismatched)})")
    raise UsageError(f"{what} does not hold the weights of {model_class}: {'; '.join(problems)}; a model "
                     f"with these left at random values would generate nonsense ({hint})")


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")


def _load_gguf(path: Path, *, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not (is_gguf_available() and is_accelerate_available()):
        raise MissingDependencyError("loading a .gguf file needs the `gguf` and `accelerate` (>= 1.1) packages: "
                                     "pip install -U gguf 'accelerate>=1.1'")
    what = f"GGUF file {str(path)!r}"
    try:
        with _no_load_report(), _gguf_bar_follows_transformers():
            model, loading = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                                  output_loading_info=True,
                                                                  ignore_mismatched_sizes=True,   # named below
                                                                  **_dequantized_gguf())
    except _load_errors() as exc:
        architecture = _unsupported_gguf_architecture(exc)
        if architecture is not None:
            raise UsageError(f"{what} is of architecture {architecture!r}, which transformers does not load "
                             f"from GGUF: supported are {', '.join(_gguf_architectures())}") from None
        tensor_type = _unsupported_gguf_tensor_type(exc)
        if tensor_type is not None:
            raise UsageError(f"{what} holds {tensor_type}: the types it reads are "
                             f"{', '.join(_gguf_tensor_types())} (convert the model again to one of them)") from None
        _check_gguf_metadata(path, what)
        raise UsageError(f"{what} does not load with transformers (damaged or not a GGUF "
                         f"model file?): {_first_line(exc)}") from None
    try:
        check_loaded_weights(what, type(model).__name__, loading,
                             hint="check the sizes and vocabulary in the file's metadata against its tensors")
    except UsageError:
        _check_gguf_metadata(path, what)        # the likelier cause, named instead (read only on this path: ~2 s)
        raise
    return model.to(device).eval()


def _check_gguf_metadata(path: Path, what: str) -> None:
    """Called when a GGUF file did not load: a UsageError naming the cause its metadata shows, if any. A file the
    reader cannot parse is left to the caller's error.

    - a part of a model split by llama.cpp's gguf-split (split.count > 1): the first part holds the metadata and
      some of the tensors, the others only tensors; transformers reads one file, so the error was weights missing
      (or, for a later part, no architecture).
    - no tokenizer (no tokenizer.ggml.tokens): transformers takes the architecture's default vocabulary size, and
      the error was a shape mismatch of the embedding."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - damaged or not GGUF: the load below reports it
        return
    count, number = _gguf_int(fields, "split.count"), _gguf_int(fields, "split.no")
    if count is not None and count > 1:
        import re

        part = "" if number is None else f"part {number + 1} of {count} of "
        first = path if not number else path.with_name(re.sub(r"-\d{5}-of-(\d{5})\.gguf$", r"-00001-of-\1.gguf",
                                                                path.name, flags=re.IGNORECASE))
        first_name = str(first) if first.name != path.name or not number else "<its first part>"
        raise UsageError(f"{what} is {part}a split model (split.count {count}): transformers loads one whole "
                         f"file; merge the parts first (llama.cpp: llama-gguf-split --merge {first_name} merged.gguf)")
    if "tokenizer.ggml.tokens" not in fields:
        raise UsageError(f"{what} holds no tokenizer in its metadata (no tokenizer.ggml.tokens): expected a model "
                         "file with its tokenizer, as llama.cpp's converters write it")


def _gguf_int(fields: Mapping[str, Any], key: str) -> int | None:
    """An integer metadata value of a GGUFReader's fields, None when absent or not one number."""
    field = fields.get(key)
    try:
        return int(field.parts[field.data[0]][0]) if field is not None and len(field.data) == 1 else None
    except (IndexError, TypeError, ValueError):
        return None


@contextlib.contextmanager
def _gguf_bar_follows_transformers() -> Any:
    """transformers' GGUF loader draws its "Converting and de-quantizing GGUF tensors" bar with tqdm itself, not
    through transformers.utils.logging.tqdm, so `disable_progress_bar()` (the CLI commands' quiet_transformers)
    left it on stderr. For the load, it goes through that switch like transformers' other loading bars."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    drawn = getattr(gguf_loader, "tqdm", None)
    if drawn is None:
        yield
        return
    gguf_loader.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        gguf_loader.tqdm = drawn


def _dequantized_gguf() -> dict[str, Any]:
    """from_pretrained arguments that unpack every GGUF weight into a plain dense layer at load.

    transformers (5.17 has it; 5.10 does not) keeps quantized GGUF weights packed for the architectures its
    new loader handles (qwen35, lfm2 in 5.24) when the `kernels` package is installed, fetching a matmul
    kernel from the Hugging Face hub to do so: a download at run time, and layers that neither the exporter
    nor the parity reference expect. It also warns on every fp16/bf16 load that "packed" weights are fastest
    in float32. Unpacked is what it falls back to without `kernels`, and what older transformers always did."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _unsupported_gguf_architecture(exc: BaseException) -> str | None:
    """The architecture named by transformers' "GGUF model with architecture X is not supported yet"."""
    import re

    found = re.match(r"GGUF model with architecture (.+) is not supported", str(exc))
    return found.group(1) if isinstance(exc, ValueError) and found else None


def _unsupported_gguf_tensor_type(exc: BaseException) -> str | None:
    """What the gguf package's errors on a tensor type say, in words: "Dequantization for Q1_0 is not yet
    implemented" (a type it knows but cannot unpack) or "np.uint32(99) is not a valid GGMLQuantizationType" (a
    type id it does not know: a newer llama.cpp type, or damage). They read "damaged or not a GGUF model file?"
    before, which a valid file of a newer type is not."""
    import re

    version = _gguf_version()
    unpacked = re.match(r"Dequantization for (\S+) is not yet implemented", str(exc))
    if isinstance(exc, NotImplementedError) and unpacked:
        return f"tensors of type {unpacked.group(1)}, which gguf {version} cannot dequantize"
    unknown = re.search(r"(?:np\.\w+\()?(\d+)\)? is not a valid GGMLQuantizationType", str(exc))
    if isinstance(exc, ValueError) and unknown:
        return (f"a tensor of type id {unknown.group(1)}, which gguf {version} does not know (a type newer than this "
                "gguf: pip install -U gguf; or a damaged file)")
    return None


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:            # pragma: no cover - gguf imports, so it is installed
        return "(unknown version)"


def _gguf_tensor_types() -> list[str]:
    """The GGML tensor types the installed gguf package dequantizes (transformers' GGUF loader uses it)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    readable = []
    for qtype in GGMLQuantizationType:
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        readable.append(qtype.name)
    return readable


def _gguf_architectures() -> list[str]:
    """The general.architecture values transformers' GGUF loader knows (its table also holds the
    "general" and "tokenizer" key groups, which are not architectures)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]


def special_tokens(model: Any) -> SpecialTokens:
    """EOS (possibly several), pad, bos and decoder start, resolved as `transformers.generate` does where the
    generation_config sets them.

    generation_config first, then config; pad falls back to the first EOS; the decoder start of an
    encoder-decoder falls back to bos. One difference: a generation_config.json that leaves out an id that
    config.json sets gets it from config.json here, while transformers 5 generates without it (no EOS at
    all when generation_config.json lacks eos_token_id); deploylm stops at the model's end token.
    """
    gen, config = model.generation_config, model.config
    eos = _first_set(gen.eos_token_id, getattr(config, "eos_token_id", None))
    eos_ids = tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    pad = _first_set(gen.pad_token_id, getattr(config, "pad_token_id", None))
    bos = _first_set(gen.bos_token_id, getattr(config, "bos_token_id", None))
    if pad is None:
        if not eos_ids:
            raise UsageError(f"model {model.name_or_path!r} defines neither pad_token_id nor eos_token_id "
                             "in its generation_config or config")
        pad = eos_ids[0]
    start = None
    if config.is_encoder_decoder:
        start = _first_set(gen.decoder_start_token_id, getattr(config, "decoder_start_token_id", None), bos)
        if start is None:
            raise UsageError(f"model {model.name_or_path!r} has no decoder_start_token_id or bos_token_id: "
                             "an encoder-decoder needs one")
    return SpecialTokens(eos_token_ids=eos_ids, pad_token_id=int(pad),
                         bos_token_id=None if bos is None else int(bos),
                         decoder_start_token_id=None if start is None else int(start))


# Decoder-only families whose config.json holds the settings read below under their plain names (no
# attribute_map for them, no nested text config): their special tokens and window can be read from the
# files without transformers. Others (GPT-2's n_positions, encoder-decoders, composite models) cannot.
PLAIN_CONFIG_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_SPECIAL_IDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")


def special_tokens_from_files(folder: Path) -> tuple[SpecialTokens, bool, int | None] | None:
    """(special tokens, is_encoder_decoder, position window) of a Hugging Face model folder or artifact,
    read from config.json and generation_config.json the way transformers resolves them (`special_tokens`,
    `position_window` over AutoConfig and GenerationConfig), without importing transformers; None when
    the model type is not one of PLAIN_CONFIG_TYPES (use the transformers path then).

    An onnx-only process (`deploylm bench`'s onnx worker, a server) then never imports transformers.
    """
    import json

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") not in PLAIN_CONFIG_TYPES or config.get("is_encoder_decoder") \
            or any(isinstance(v, dict) and "model_type" in v for v in config.values()):
        return None
    gen_file = folder / "generation_config.json"
    try:   # no generation_config.json: transformers derives one from the config (GenerationConfig.from_model_config)
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {k: config.get(k) for k in _SPECIAL_IDS}
    except (OSError, ValueError):
        return None
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=False, **{k: config.get(k) for k in _SPECIAL_IDS}),
                            generation_config=SimpleNamespace(**{k: gen.get(k) for k in _SPECIAL_IDS}),
                            name_or_path=str(folder))
    window = config.get("max_position_embeddings")
    return special_tokens(model), False, None if window is None else int(window)


def model_info(model: Any, name: str) -> ModelInfo:
    """ModelInfo of a transformers model: kind, logits width, special tokens, position window, decoding settings."""
    config = model.config
    vocab = model.get_output_embeddings().weight.shape[0]
    return ModelInfo(is_encoder_decoder=bool(config.is_encoder_decoder), vocab_size=int(vocab),
                     special=special_tokens(model), max_positions=position_window(config), name=name,
                     generation=generation_settings(model.generation_config))


def position_window(config: Any) -> int | None:
    """The model's position window (max_position_embeddings) or None when it has none (T5: relative positions).

    Learned-position encoder-decoders (BART, Marian) share one window for the source and the output.
    """
    window = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return None if window is None else int(window)


def generation_settings(gen: Any) -> dict[str, Any]:
    """The DECODING_KEYS a generation config sets (a GenerationConfig, or generation_config.json as a dict).

    Lists become tuples (bad_words_ids: a tuple of tuples); unset values (None, [], min_length 0,
    encoder_repetition_penalty 1.0, ...) are left out.
    The decoder validates them when it builds its processors.
    """
    get = gen.get if isinstance(gen, Mapping) else (lambda key: getattr(gen, key, None))
    return {key: _frozen(get(key)) for key in DECODING_KEYS if _is_set(key, get(key))}


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):   # sequence_bias as a {token ids: bias} dict: as its list form
        return tuple((_frozen(k), v) for k, v in value.items())
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def generation_defaults(model: Any) -> dict[str, Any]:
    """Decoding settings the model's generation_config sets explicitly (its defaults for `generate`)."""
    return decoding_defaults(model.generation_config, model.name_or_path)


def decoding_defaults(gen: Any, name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The GENERATION_DEFAULT_KEYS a generation_config (object or generation_config.json's dict) sets.

    Settings deploylm does not apply (NOT_APPLIED_KEYS, e.g. do_sample; max_length, which transformers uses
    when max_new_tokens is not set), and settings out of DecodingOptions' range (a temperature of 0, a
    length_penalty of 20), are named in one warning: with them, outputs can differ from transformers.generate's
    (the model still loads; a call may give its own value). given: defaults the caller sets itself (an
    artifact's profile).
    """
    from deploylm.decoding.options import DecodingOptions

    get = gen.get if isinstance(gen, Mapping) else (lambda key: getattr(gen, key, None))
    ignored = [key for key in NOT_APPLIED_KEYS if _is_set(key, get(key))]
    defaults = {key: get(key) for key in GENERATION_DEFAULT_KEYS if get(key) is not None}
    if get("max_length") not in (None, 20) and "max_new_tokens" not in {**defaults, **(given or {})}:  # 20: transformers' own default
        # transformers stops at max_length tokens, prompt (or start token) included, unless max_new_tokens is set
        ignored.append(f"max_length={get('max_length')!r} (deploylm stops at max_new_tokens, default "
                       f"{DecodingOptions.max_new_tokens})")
    for key in [k for k in GENERATION_DEFAULT_KEYS if k not in ("min_new_tokens", "num_return_sequences")]:
        if key in defaults:   # each value alone (those two depend on max_new_tokens / num_beams: checked per call)
            try:
                DecodingOptions.from_mapping({key: defaults[key], "do_sample": True})
            except UsageError:
                ignored.append(f"{key}={defaults.pop(key)!r} (out of range)")
    if ignored:
        log.warning("model %s: its generation_config sets %s, which deploylm does not apply; outputs may "
                    "differ from transformers.generate", name, ", ".join(ignored))
    return defaults


def _is_set(key: str, value: Any) -> bool:
    if value is None or value is False or (isinstance(value, (list, tuple, dict)) and not value):
        return False
    return not (key in _OFF_VALUES and not isinstance(value, bool) and value == _OFF_VALUES[key])


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if len(text) > 1 and text[0].startswith("Class validation error"):   # huggingface_hub's: the cause follows
        return text[1].strip()
    return text[0] if text else type(exc).__name__


def cache_keyword(model: Any) -> str:
    """The forward() keyword for the KV cache: `cache` in recent transformers 5 releases,
    `past_key_values` in earlier ones (5.17 on the GPU machine, for example), `cache_params` for a
    state-space model (Mamba) before 5.24."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "cache_params") if k in params), "past_key_values")


def not_a_decoder(model: Any) -> UsageError:
    """The error for a model whose forward returns no key/value cache (BertLMHeadModel with is_decoder
    false, say): an encoder, with nothing to continue."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    where = getattr(model, "name_or_path", None) or getattr(model.config, "name_or_path", None)
    which = f"model {str(where)!r} ({kind}, {type(model).__name__})" if where else \
        f"this {kind} model ({type(model).__name__})"
    return UsageError(f"{which} returns no key/value cache: it is not a decoder "
                      "(a BERT-style masked LM is an encoder); expected a causal LM or an encoder-decoder")


def cache_of(out: Any) -> Any:
    """The updated cache of a model output, under any of its transformers 5 names (`cache_params`:
    a state-space model's before 5.24). Lazily: in 5.24 the older names are properties that log a
    deprecation warning."""
    for name in ("cache", "past_key_values", "cache_params"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None
