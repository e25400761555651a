"""Artifact folders (DESIGN.md §6): manifest, checksums, atomic write, load + verify.

An artifact is written into a temporary sibling folder (`.<name>.tmp-<pid>`), checksummed,
`manifest.json` is written last, and the folder is renamed into place: a crash leaves either no
artifact or the previous one, never a half-written one that loads. Loading re-checks every file
against the manifest (size, sha256) and every ONNX graph's inputs/outputs against the recorded IO
signature; any difference is an ArtifactError naming the file and the command that rebuilds it.
A graph may keep its weights in an external data file next to it (`model.onnx` + `model.onnx.data`,
large exports): that file is listed and checksummed like any other, and a graph that reads weights from
a file the manifest does not list is refused. Artifacts with inline weights (one file) load as before.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deploylm import __version__, fsutil
from deploylm.errors import ArtifactError, UsageError, WriteFailed
from deploylm.fsutil import remove_stale_temporaries, replace_dir, temporary_sibling

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FIELDS = ("format_version", "deploylm_version", "created", "source", "profile", "files",
                   "io", "toolchain")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: Path) -> str | None:
    """One digest over a source's weights: the file itself (.gguf) or every weight file in a folder."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def source_fields(source: Any) -> dict[str, Any]:
    """The manifest's `source` entry for a deploylm.models.source.Source."""
    return {"kind": source.kind, "path": str(Path(source.path).resolve()),
            "weights_sha256": weights_sha256(source.path)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def toolchain() -> dict[str, Any]:
    """Versions of everything that shaped the graphs/engines, plus the CUDA device if any."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("onnx", "onnxruntime", "transformers"):
        info[dist] = _version(dist)
    if _version("onnxruntime-gpu"):
        info["onnxruntime"] = _version("onnxruntime-gpu")
    if importlib.util.find_spec("tensorrt") is not None:
        info["tensorrt"] = _version("tensorrt") or _version("tensorrt-cu12")
    info["cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _shape(value_info: Any) -> list[int | str | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def _graph_proto(onnx_path: Path) -> Any:
    """The graph's ModelProto without its external weights (those stay in their .data file)."""
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError/OSError variants for bad files
        raise ArtifactError(f"{onnx_path}: not a readable ONNX graph ({type(exc).__name__}: {exc})") from None


def io_signature(onnx_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and (symbolic) shapes of a graph's inputs and outputs; weights not loaded."""
    return _signature(_graph_proto(onnx_path))


def external_data_files(onnx_path: Path) -> list[str]:
    """The external data files (paths relative to the graph's folder, as written in the graph) whose
    weights the graph reads, e.g. ["model.onnx.data"]; [] for a graph with its weights inline."""
    return _external_files(_graph_proto(onnx_path))


def _external_files(model: Any) -> list[str]:
    from onnx import TensorProto

    def tensors(graph: Any) -> Any:
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    return sorted({entry.value for t in tensors(model.graph) if t.data_location == TensorProto.EXTERNAL
                   for entry in t.external_data if entry.key == "location"})


def _signature(model: Any) -> dict[str, list[dict[str, Any]]]:
    import onnx

    initializers = {init.name for init in model.graph.initializer}

    def describe(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name,
                 "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                 "shape": _shape(v)} for v in values if v.name not in initializers]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """{relpath: {sha256, bytes}} for every file under root except the manifest."""
    table = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def build_manifest(root: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """The manifest for the files now under root; `fields` gives source, profile, parity, ..."""
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "deploylm_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update(fields)
    manifest.setdefault("toolchain", toolchain())
    manifest.setdefault("parity", None)
    if "io" not in fields:
        manifest["io"] = {p.relative_to(root).as_posix(): io_signature(p) for p in sorted(root.rglob("*.onnx"))}
    manifest["files"] = file_table(root)
    for graph in manifest["io"]:
        unlisted = _unlisted_data(root, graph, manifest["files"])
        if unlisted:
            raise ArtifactError(f"{root / graph} reads weights from {unlisted[0]}, which is not a file of the "
                                "artifact folder: an export bug, nothing was written")
    return manifest


def _unlisted_data(root: Path, graph: str, files: dict[str, Any], model: Any = None) -> list[str]:
    """The external data files `graph` reads that are not among `files` (relative to the artifact root)."""
    folder = Path(graph).parent
    out = []
    for location in _external_files(model if model is not None else _graph_proto(root / graph)):
        rel = os.path.normpath((folder / location).as_posix()).replace(os.sep, "/")
        if rel.startswith("../") or os.path.isabs(location) or rel not in files:
            out.append(location)
    return out


def check_output_folder(out: Path, force: bool, inputs: dict[str, str | Path | None] | None = None) -> None:
    """An artifact's output must be new, or empty, or (with `force`) an artifact to replace: --force never
    deletes a file, a folder of other things, the current folder, or one holding an input (`inputs`: its
    flag -> its path, e.g. {"--calibration": ...})."""
    fsutil.check_output_folder(out, force, holds="the artifact", ours=lambda folder: (folder / MANIFEST).is_file(),
                               not_ours=f"is not an exported artifact (no {MANIFEST})",
                               without_force="pass --force to replace it", inputs=inputs)


def write_artifact(final_dir: Path, build: Callable[[Path], None], manifest_fields: dict[str, Any],
                   force: bool = False) -> Path:
    """Run `build(tmp_dir)` in a temporary sibling folder, add manifest.json, rename into place.

    `manifest_fields` (source, profile, parity, quality, ...) is read after `build` returns, so
    `build` may add to it (e.g. the parity summary it measured). `final_dir` existing is refused
    unless `force`; with `force` the new folder takes the old one's place (deploylm.fsutil.replace_dir:
    one atomic exchange on Linux, else old aside / new in / old deleted), then the old one is deleted.
    On any error the temporary folder is removed.
    """
    final_dir = Path(final_dir)
    check_output_folder(final_dir, force)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_dir)
    tmp = temporary_sibling(final_dir)
    tmp.mkdir()
    try:
        build(tmp)
        manifest = build_manifest(tmp, manifest_fields)
        _write_json_atomic(tmp / MANIFEST, manifest)
        _swap_into_place(tmp, final_dir, force)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(exc)
        if full is not None:
            kept = "the artifact already there is kept" if (final_dir / MANIFEST).is_file() else "nothing was written"
            raise WriteFailed(f"could not write the artifact {final_dir}: {os.strerror(full)}; {kept}; free space "
                              "or choose another --out") from None
        raise
    return final_dir


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # a full disk or quota: the place, not the model, is at fault


def _disk_full(exc: BaseException) -> int | None:
    """The errno when `exc` is a write that failed for want of space (shutil.copytree gathers its
    failures in one shutil.Error, without an errno of its own)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return exc.errno
    if isinstance(exc, shutil.Error):
        return next((code for code in _FULL if f"[Errno {code}]" in str(exc)), None)
    return None


def _write_json_atomic(path: Path, data: Any) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


def _swap_into_place(tmp: Path, final_dir: Path, force: bool) -> None:
    if final_dir.exists() and any(final_dir.iterdir()) and not force:     # made while the artifact was built
        raise UsageError(f"--out {str(final_dir)!r} already exists: pass --force to replace it")
    replace_dir(tmp, final_dir)        # an existing folder is swapped out atomically where the system can


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact folder: its manifest and where its files are."""

    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def io(self) -> dict[str, Any]:
        return self.manifest["io"]

    @property
    def graphs(self) -> list[Path]:
        """The ONNX graphs recorded in the IO signature, in manifest order."""
        return [self.path / name for name in self.io]

    @property
    def profile(self) -> Any:
        """The resolved profile as a deploylm.profiles.Profile."""
        from deploylm.profiles import Profile

        return Profile.from_dict(self.manifest["profile"], origin=f"{self.path / MANIFEST} (profile)")

    def file(self, name: str) -> Path:
        return self.path / name


def rebuild_hint(path: Path, manifest: dict[str, Any] | None) -> str:
    """The command that rebuilds the artifact at `path` (from the manifest when it is readable)."""
    src, profile = "SRC", "PROFILE"
    if isinstance(manifest, dict):
        src = (manifest.get("source") or {}).get("path", src) if isinstance(manifest.get("source"), dict) else src
        profile = (manifest.get("profile") or {}).get("name", profile) if isinstance(manifest.get("profile"), dict) else profile
    return f"re-export it: deploylm export --model {src} --profile {profile} --out {path} --force"


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check the manifest's fields and format version (no file checks)."""
    file = Path(path) / MANIFEST
    try:
        if not file.is_file():
            raise ArtifactError(f"{path} is not an artifact: {MANIFEST} is missing; {rebuild_hint(path, None)}")
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file}: not valid JSON ({exc}); {rebuild_hint(path, None)}") from None
    except OSError as exc:       # unreadable (permissions), or the folder cannot be searched
        raise ArtifactError(f"{file}: cannot read it ({exc.strerror}): check the permissions of the artifact's "
                            "files") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file}: expected a JSON object; {rebuild_hint(path, None)}")
    missing = [key for key in REQUIRED_FIELDS if key not in manifest]
    if missing:
        raise ArtifactError(f"{file}: missing field(s) {', '.join(missing)}; {rebuild_hint(path, manifest)}")
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        fix = "upgrade deploylm or " if newer else ""
        raise ArtifactError(f"{file}: format_version {version!r} is not supported (this deploylm reads "
                            f"{FORMAT_VERSION}); {fix}{rebuild_hint(path, manifest)}")
    objects = [key for key in ("files", "io", "source", "profile", "toolchain") if not isinstance(manifest[key], dict)]
    objects += [key for key in ("generation", "parity", "quality") if not isinstance(manifest.get(key) or {}, dict)]
    if objects:
        raise ArtifactError(f"{file}: {', '.join(repr(k) for k in objects)} must be object(s); {rebuild_hint(path, manifest)}")
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and type(entry.get("bytes")) is int):   # noqa: E721 - a bool is no size
            raise ArtifactError(f"{file}: 'files' entry for {name} must be an object with sha256 (a string) and "
                                f"bytes (an integer), got {json.dumps(entry)}; {rebuild_hint(path, manifest)}")
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise ArtifactError(f"{file}: 'files' entry {name!r} is not a path inside the artifact folder; "
                                f"{rebuild_hint(path, manifest)}")
    for name, sig in manifest["io"].items():
        if not (isinstance(sig, dict) and all(isinstance(sig.get(side), list)
                                              and all(isinstance(v, dict) for v in sig[side])
                                              for side in ("inputs", "outputs"))):
            raise ArtifactError(f"{file}: 'io' entry for {name} must be an object with lists of inputs and outputs; "
                                f"{rebuild_hint(path, manifest)}")
    profile = manifest["profile"]
    if not (isinstance(profile.get("name"), str) and isinstance(profile.get("precision"), str)):
        raise ArtifactError(f"{file}: 'profile' must name the profile and its precision; {rebuild_hint(path, manifest)}")
    from deploylm.profiles import Profile

    try:                   # what info shows and parity's tolerances come from: a valid profile, as export wrote it
        Profile.from_dict(profile, origin=f"{file} ('profile')")
    except UsageError as exc:
        raise ArtifactError(f"{exc}; {rebuild_hint(path, manifest)}") from None
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its size and sha256; every graph's IO as recorded."""
    hint = rebuild_hint(path, manifest)
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{file}: listed in the manifest but missing; {hint}")
        if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
            raise ArtifactError(f"{path / MANIFEST}: entry for {name} lacks sha256/bytes; {hint}")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{file}: {size} bytes, the manifest says {entry['bytes']} (changed or truncated); {hint}")
        try:
            digest = sha256_file(file)
        except OSError as exc:
            raise ArtifactError(f"{file}: cannot read it ({exc.strerror}): check the permissions of the "
                                "artifact's files") from None
        if digest != entry["sha256"]:
            raise ArtifactError(f"{file}: sha256 does not match the manifest (the file was changed); {hint}")
    stray = sorted(p.name for p in path.glob("*.onnx") if p.name not in manifest["files"])
    if stray:   # the backend opens the graphs it finds by name: one the manifest does not list would run unchecked
        raise ArtifactError(f"{path / stray[0]}: a graph the manifest does not list (left by another export, or "
                            f"copied in?); remove it or {hint}")
    for name, expected in manifest["io"].items():
        if name not in manifest["files"]:
            raise ArtifactError(f"{path / MANIFEST}: io lists {name}, which is not among its files; {hint}")
        model = _graph_proto(path / name)
        unlisted = _unlisted_data(path, name, manifest["files"], model)
        if unlisted:   # its weights would be read unchecked (or from outside the folder)
            raise ArtifactError(f"{path / name}: reads weights from {unlisted[0]}, which the manifest does not "
                                f"list (so it is not checksummed); {hint}")
        actual = _signature(model)
        if actual != expected:
            raise ArtifactError(f"{path / name}: graph inputs/outputs differ from the manifest "
                                f"({_first_io_difference(expected, actual)}); {hint}")


def _first_io_difference(expected: Any, actual: dict[str, Any]) -> str:
    for side in ("inputs", "outputs"):
        want = {v["name"]: v for v in (expected or {}).get(side, []) if isinstance(v, dict) and "name" in v}
        got = {v["name"]: v for v in actual[side]}
        for name in want.keys() - got.keys():
            return f"{side[:-1]} {name!r} is missing"
        for name in got.keys() - want.keys():
            return f"{side[:-1]} {name!r} is not in the manifest"
        for name in want:
            if want[name] != got[name]:
                return f"{side[:-1]} {name!r}: manifest {want[name]}, graph {got[name]}"
    return "order or format differs"


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Open an artifact folder; with `verify`, check every file and graph against the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist; {rebuild_hint(path, None)}")
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
        check_model_config(path, manifest)
    return Artifact(path=path, manifest=manifest)


def check_model_config(path: Path, manifest: dict[str, Any]) -> None:
    """The artifact's copies of its model's config.json and generation_config.json, checked as a model folder's
    are: the backends read special tokens, window and decoding defaults from them (edited files whose checksums
    were updated in the manifest got a JSON or type error from deep inside the load)."""
    from deploylm.models.hf import check_generation_config

    hint, file = rebuild_hint(path, manifest), path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{file}: missing: an artifact carries its model's config.json; {hint}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file}: not valid JSON ({str(exc).splitlines()[0]}); {hint}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{file}: expected the model's configuration as a JSON object, got "
                            f"{type(config).__name__}; {hint}")
    try:
        check_generation_config(path)
    except UsageError as exc:
        raise ArtifactError(f"{exc}; {hint}") from None


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_io(io: dict[str, Any]) -> list[str]:
    """One line per graph input/output: `  input  input_ids  int64  [batch, sequence]`."""
    lines = []
    for graph, sig in io.items():
        lines.append(f"  {graph}")
        for side in ("inputs", "outputs"):
            for v in sig.get(side, []):
                dims = ", ".join("?" if d is None else str(d) for d in v.get("shape", []))
                lines.append(f"    {side[:-1]:<6} {v.get('name', '?'):<36} {v.get('dtype', '?'):<8} [{dims}]")
    return lines


def format_parity(parity: dict[str, Any] | None) -> list[str]:
    """The manifest's parity summary (see deploylm.parity.ParityReport.summary), one line per backend."""
    if not parity:
        return ["  (none recorded)"]
    checked = ", ".join(f"{parity[k]} {label}" for k, label in (("prompts", "prompts"), ("max_new_tokens", "new tokens"),
                                                                 ("num_beams", "beams")) if parity.get(k) is not None)
    lines = [f"  reference {parity.get('reference', '?')}: {'PASSED' if parity.get('passed') else 'FAILED'}"
             + (f" ({checked})" if checked else "")]
    backends = parity.get("backends")
    for name, row in (backends if isinstance(backends, dict) else {}).items():
        row = row if isinstance(row, dict) else {}
        div = row.get("first_divergence")
        lines.append(f"  {name:<8} max|Δlogit| {_number(row.get('max_abs_logit'), '.2e')}  "
                     f"top-1 {_number(row.get('token_agreement'), '.4f')}  "
                     f"first divergence {'none' if div is None else f'step {div}'}  "
                     f"beams {'identical' if row.get('beams_identical') else 'differ'}")
    return lines


def _number(value: Any, spec: str) -> str:
    """A recorded number; null (how non-finite numbers are stored) or a missing one prints as nan."""
    return format(value if isinstance(value, (int, float)) else float("nan"), spec)


def summary(artifact: Artifact) -> str:
    """A readable page for `deploylm info`: what, from where, with what, how big, how checked."""
    m = artifact.manifest
    profile, source, tools = m.get("profile") or {}, m.get("source") or {}, m.get("toolchain") or {}
    total = sum(int(e.get("bytes", 0)) for e in artifact.files.values())
    lines = [
        f"artifact   {artifact.path}",
        f"format     {m['format_version']} (deploylm {m['deploylm_version']}, created {m['created']})",
        f"source     {source.get('kind', '?')} {source.get('path', '?')}",
        f"weights    sha256 {source.get('weights_sha256') or '?'}",
        f"profile    {profile.get('name', '?')} ({profile.get('precision', '?')}; backends "
        f"{', '.join(profile.get('backends', []))})" + (f": {profile['description']}" if profile.get("description") else ""),
        "toolchain  " + ", ".join(f"{k} {v}" for k, v in tools.items() if v),
    ]
    if isinstance(m.get("generation"), dict):    # the decoding defaults the artifact ships with
        lines.append("generation " + (", ".join(f"{k} {v}" for k, v in m["generation"].items())
                                      or "the model's own (generation_config.json)"))
    lines += [f"kv layout  {layout} ({graph}; docs/formats.md)" for graph, layout in kv_layouts(artifact.io).items()]
    lines += [
        f"files      {len(artifact.files)} checksummed in manifest.json, {format_size(total)} in all",
    ]
    for name, entry in sorted(artifact.files.items(), key=lambda kv: -int(kv[1].get("bytes", 0))):
        lines.append(f"  {format_size(int(entry.get('bytes', 0))):>10}  {name}")
    lines += ["io", *format_io(artifact.io), "parity", *format_parity(m.get("parity"))]
    if m.get("quality"):
        lines += ["quality", *format_quality(m["quality"])]
    return "\n".join(lines)


def kv_layouts(io: dict[str, Any]) -> dict[str, str]:
    """graph file -> its KV layout (io_spec.KV_*), for the graphs of `io` (the manifest's) that take a K/V cache."""
    from deploylm.export import io_spec

    layouts = {}
    for graph, signature in io.items():
        inputs = [t.get("name", "") for t in signature.get("inputs", [])]
        if any(name.startswith("past_key_values.") for name in inputs):
            layouts[graph] = io_spec.kv_layout([t.get("name", "") for t in signature.get("outputs", [])], inputs)
    return layouts


def format_quality(quality: dict[str, Any]) -> list[str]:
    """The precision step's report as export printed it, from the manifest's `quality` field (its raw fields
    where a manifest of another version lacks some)."""
    from deploylm.export.precision_step import PrecisionReport

    try:
        lines = PrecisionReport.from_dict(quality).lines()
    except (KeyError, TypeError, ValueError, AttributeError):
        return [f"  {k}: {v}" for k, v in quality.items()]
    kept = [f"{graph}: {', '.join(nodes)}" for graph, nodes in (quality.get("kept_fp32") or {}).items() if nodes]
    return [f"  {line}" for line in lines] + [f"  kept in fp32: {k}" for k in kept]
