"""Check exported graphs against their torch modules, optimum-style: names -> shapes -> values.

Every failure is collected (nothing stops at the first) into a ValidationReport. Values are
compared on an empty past (prefill, with padding) and a non-empty past (a decode step); K/V inputs
are the model's own (from the encoder and an earlier decoder run), never random. Outputs with
a `total` axis are compared only at unpadded positions: what a fully masked query computes is
never read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deploylm.export import io_spec
from deploylm.export.io_spec import GraphSpec
from deploylm.export.onnx_export import GraphPlan, example_inputs

# (case name, axis sizes): an empty past with a padded prompt, then one decode step on a past (in the
# shared-prompt layout: 2 beams of one prompt over 3 prompt positions and 3 generated ones)
CASES = (
    ("empty past", {"batch": 3, "seq": 5, "past": 0, "src": 6, "rows": 6, "enc_batch": 3, "prompts": 3, "plen": 0}),
    ("decode step", {"batch": 2, "seq": 1, "past": 3, "src": 4, "rows": 4, "enc_batch": 2, "prompts": 1, "plen": 3}),
)


@dataclass(frozen=True)
class ValidationFailure:
    graph: str
    check: str    # "names" | "shapes" | "values"
    detail: str


@dataclass(frozen=True)
class ValidationReport:
    atol: float
    failures: tuple[ValidationFailure, ...]
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # graph file -> largest |Δ| seen

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.ok:
            worst = max(self.max_abs_diff.values(), default=0.0)
            return f"graphs match PyTorch (max |Δ| {worst:.1e} ≤ {self.atol:g})"
        return "; ".join(f"{f.graph}: {f.check}: {f.detail}" for f in self.failures)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "atol": self.atol, "max_abs_diff": self.max_abs_diff,
                "failures": [vars(f) for f in self.failures]}


def validate_graphs(plan: GraphPlan, folder: Path, atol: float) -> ValidationReport:
    """Run every graph of `plan` in folder with ONNX Runtime (CPU) and compare with PyTorch."""
    from deploylm.backends.onnx_backend import create_session

    failures: list[ValidationFailure] = []
    diffs: dict[str, float] = {}
    for spec, module in plan.graphs:
        session = create_session(Path(folder) / spec.file)
        found = _check_names(spec, session) + _check_declared_shapes(spec, session)
        failures += found
        if found:
            continue
        for case, sizes in CASES:
            if plan.cross_rows == "rows":
                sizes = {**sizes, "enc_batch": sizes["rows"]}
            problems, diff = _check_values(plan, spec, module, session, sizes, atol)
            failures += [ValidationFailure(spec.file, check, f"{case}: {d}") for check, d in problems]
            diffs[spec.file] = max(diffs.get(spec.file, 0.0), diff)
    return ValidationReport(atol, tuple(failures), diffs)


def _check_names(spec: GraphSpec, session) -> list[ValidationFailure]:
    out = []
    for what, got, want in (("inputs", [i.name for i in session.get_inputs()], spec.input_names),
                            ("outputs", [o.name for o in session.get_outputs()], spec.output_names)):
        if got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            out.append(ValidationFailure(spec.file, "names", f"{what} differ from the IO spec (missing {missing}, unexpected {extra}, or order)"))
    return out


def _check_declared_shapes(spec: GraphSpec, session) -> list[ValidationFailure]:
    out = []
    for tensors, args in ((spec.inputs, session.get_inputs()), (spec.outputs, session.get_outputs())):
        for t, arg in zip(tensors, args):
            shape = list(arg.shape)
            ok = len(shape) == len(t.axes) and all(
                isinstance(s, str) if isinstance(a, str) else s == a for a, s in zip(t.axes, shape))
            if not ok:
                out.append(ValidationFailure(spec.file, "shapes", f"{t.name} is declared {shape}, expected {list(t.axes)}"))
    return out


def _check_values(plan, spec, module, session, sizes, atol) -> tuple[list[tuple[str, str]], float]:
    args = _realistic(plan, spec, module, example_inputs(spec, sizes, plan.dims.vocab_size, seed=1))
    got = session.run(None, {n: a.numpy() for n, a in zip(spec.input_names, args)})
    with torch.no_grad():
        want = [t.detach().float().numpy() for t in module(*args)]
    feeds = dict(zip(spec.input_names, args))
    problems, worst = [], 0.0
    for t, g, w in zip(spec.outputs, got, want):
        if g.shape != w.shape:
            problems.append(("shapes", f"{t.name} has shape {list(g.shape)}, PyTorch {list(w.shape)}"))
            continue
        diff = float(np.abs(_unpadded(t, g, feeds) - _unpadded(t, w, feeds)).max(initial=0.0))
        worst = max(worst, diff)
        if not diff <= atol:
            problems.append(("values", f"{t.name} differs from PyTorch by {diff:.2e} > atol {atol:g}"))
    return problems, worst


def _realistic(plan: GraphPlan, spec: GraphSpec, module: Any, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Replace random K/V inputs with what the model itself makes: cross K/V from the encoder, the
    past from a first decoder run over `past` tokens (random K/V would test far-off activations)."""
    if spec.file == io_spec.ENCODER_FILE:
        return args
    feeds = dict(zip(spec.input_names, args))
    gen = torch.Generator().manual_seed(2)
    seq2seq = spec.file == io_spec.DECODER_FILE
    with torch.no_grad():
        if seq2seq:
            enc_spec, encoder = plan.graphs[0]
            mask = feeds["encoder_attention_mask"]
            ids = torch.randint(0, plan.dims.vocab_size, tuple(mask.shape), generator=gen)
            made = dict(zip(enc_spec.output_names, encoder(ids, mask)))
            for name in io_spec.past_names(plan.dims.n_layers, "encoder"):
                feeds[name] = made[name.replace("past_key_values", "present")]
        names = io_spec.past_names(plan.dims.n_layers, "decoder" if seq2seq else "")
        if plan.dims.kv_layout == io_spec.KV_SHARED and not seq2seq:
            return _realistic_shared(plan, spec, module, feeds, gen)
        past = feeds[names[0]].shape[2]
        if past:
            history = dict(feeds, input_ids=torch.randint(0, plan.dims.vocab_size, (feeds["input_ids"].shape[0], past), generator=gen))
            for name in names:
                history[name] = feeds[name][:, :, :0]
            if not seq2seq:
                history["attention_mask"] = feeds["attention_mask"][:, :past]
                history["position_ids"] = (history["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            made = module(*[history[n] for n in spec.input_names])[1:]
            feeds.update(zip(names, made))
    return tuple(feeds[n].contiguous() for n in spec.input_names)


def _realistic_shared(plan: GraphPlan, spec: GraphSpec, module: Any, feeds: dict[str, Tensor],
                      gen: torch.Generator) -> tuple[Tensor, ...]:
    """The shared-prompt layout's K/V from the model itself: the prompts' from a prefill over `plen`
    tokens (each prompt's first row's mask), then the rows' past from a run over `past` tokens on it."""
    n, vocab = plan.dims.n_layers, plan.dims.vocab_size
    past_names, prompt_names = io_spec.past_names(n), io_spec.prompt_names(n)
    rows, prompts = feeds["input_ids"].shape[0], feeds[prompt_names[0]].shape[0]
    plen, past = feeds[prompt_names[0]].shape[2], feeds[past_names[0]].shape[2]
    mask = feeds["attention_mask"]                                                  # [R, plen + past + seq]

    def run(ids: Tensor, mask: Tensor, prompt: dict[str, Tensor]) -> tuple[Tensor, ...]:
        rows = ids.shape[0]
        history = dict(feeds, input_ids=ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:],
                       **{name: feeds[name][:rows, :, :0] for name in past_names}, **prompt)
        return module(*[history[name] for name in spec.input_names])[1:]            # the new K/V

    with torch.no_grad():
        if plen:
            first = mask[::rows // prompts, :plen]                                  # [P, plen]
            empty = {name: feeds[name][:, :, :0] for name in prompt_names}
            feeds.update(zip(prompt_names, run(torch.randint(0, vocab, (prompts, plen), generator=gen), first, empty)))
        if past:
            made = run(torch.randint(0, vocab, (rows, past), generator=gen), mask[:, :plen + past],
                       {name: feeds[name] for name in prompt_names})
            feeds.update(zip(past_names, made))
    return tuple(feeds[name].contiguous() for name in spec.input_names)


def _unpadded(t, value: np.ndarray, feeds: dict[str, Tensor]) -> np.ndarray:
    """Positions on a `total` axis where attention_mask is 1 ([B, H, total, Dh] -> [N, H, Dh])."""
    if "total" not in t.axes or "attention_mask" not in feeds:
        return value
    mask = feeds["attention_mask"].bool().numpy()  # [B, total]
    return np.moveaxis(value, 2, 1)[mask]
