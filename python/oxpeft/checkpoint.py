"""Offline merge and unmerge of LoRA, IA3, LoHa and LoKr adapters into safetensors checkpoints of any size.

The Rust core streams the base checkpoint from memory-mapped shards and writes each output tensor
as it is produced, so memory use does not grow with the model. This module resolves the adapters,
builds the output in a temporary folder beside ``out``, copies the non-weight files and renames the
folder into place only when everything succeeded: a failed run leaves nothing behind.

Exact unmerge: by default a merge also writes ``out/oxpeft-unmerge/`` (safetensors files plus
``manifest.json``) holding the few elements whose original bits would not come back by subtracting
the delta again (or dividing by IA3's vector), the per-row DoRA factors and the originals of
``modules_to_save`` tensors.
Serving tools that load every ``*.safetensors`` of a folder do not look into that sub-folder.
:func:`unmerge_checkpoint` with it restores the base bit for bit, and proves it: the manifest records
digests (xxh3-64) of every original and merged tensor, of every merged shard's header and of every
sidecar file, and the unmerge checks the sidecar files and the merged headers before it writes
anything, each merged tensor as it reads it and each restored tensor before the output is published.
Any difference is an error naming the file or tensor, and no output is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence, Union

from oxpeft import _expert_merge, _merge_tied, _merge_tokens, _merge_variants, _native
from oxpeft._io import make_parents, refuse_existing, remove_created, umask_mode

PathLike = Union[str, "os.PathLike[str]"]

SIDECAR_DIR: str = _native.SIDECAR_DIR
_MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "oxpeft-exact-unmerge/2"
# Written before the digests (format 1): unmerged only with approximate=True, as their result cannot be checked.
_MANIFEST_FORMAT_UNCHECKED = "oxpeft-exact-unmerge/1"
# Weight files of other formats are not copied: they would hold the unmerged weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass(frozen=True)
class MergeReport:
    """What a merge or unmerge did."""

    #: "merge" or "unmerge".
    operation: str
    out: Path
    tensors: int
    tensors_changed: int
    bytes: int
    elements_changed: int
    #: Merge: elements recorded in the exact-unmerge sidecar. Unmerge: elements restored from it.
    sidecar_elements: int
    sidecar_bytes: int
    seconds: float
    #: Merge: whether a sidecar was written. Unmerge: whether the result is bit-exact.
    exact: bool
    #: Unmerge: whether every restored tensor was checked against the merge's digests of the original.
    verified: bool = False

    @property
    def sidecar_fraction(self) -> float:
        """Sidecar size as a fraction of the checkpoint's tensor bytes."""
        return self.sidecar_bytes / self.bytes if self.bytes else 0.0

    def summary(self) -> str:
        """A one-paragraph human summary."""
        gib = self.bytes / 2**30
        text = (
            f"{self.out}: {self.tensors_changed} of {self.tensors} tensors changed, "
            f"{gib:.2f} GiB in {self.seconds:.1f} s ({gib / max(self.seconds, 1e-9):.2f} GiB/s)"
        )
        if self.operation == "merge" and self.exact:
            text += (
                f"; exact-unmerge sidecar in {SIDECAR_DIR}/: {self.sidecar_elements} elements, "
                f"{self.sidecar_bytes / 2**20:.2f} MiB ({100 * self.sidecar_fraction:.3f} % of the model)"
            )
        elif self.operation == "unmerge":
            if self.exact and self.verified:
                text += (
                    f"; bit-exact, every tensor checked against the original's digest "
                    f"({self.sidecar_elements} elements restored from the sidecar)"
                )
            elif self.exact:
                text += (
                    f"; restored from a sidecar without digests ({self.sidecar_elements} elements): "
                    "NOT VERIFIED against the original"
                )
            else:
                text += "; APPROXIMATE: no exact-unmerge sidecar, elements may differ from the original by rounding"

        return text


def merge_checkpoint(
    base: PathLike,
    adapters: PathLike | Sequence[PathLike],
    out: PathLike,
    weights: Sequence[float] | None = None,
    *,
    force: bool = False,
    exact_unmerge: bool = True,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> MergeReport:
    """Merge LoRA, IA3, LoHa or LoKr adapters into the checkpoint folder ``base``, writing folder ``out``.

    Each adapter is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``
    or ``.bin``). The adapters are applied in order in fp32 and the result is rounded once: LoRA adds
    ``weights[i] * scaling * B @ A`` (DoRA, rsLoRA, rank/alpha patterns, fan_in_fan_out, lora_bias,
    embedding LoRA handled), LoHa ``weights[i] * alpha / r * (W1a @ W1b) * (W2a @ W2b)``, LoKr
    ``weights[i] * alpha / r * kron(w1, w2)``, and IA3 multiplies the rows (and bias) or, for
    feedforward modules, the columns of W by ``weights[i] * l`` (the vector PEFT's
    ``add_weighted_adapter`` makes from one adapter; several IA3 adapters multiply in turn).
    modules_to_save tensors replace the base's. Only 2-D (Linear / Conv1D) weights merge. The
    output keeps the base's tensor names, dtypes, shard layout and metadata, plus its config and
    tokenizer files.

    Args:
        base: folder with ``model.safetensors`` or ``model.safetensors.index.json`` and shards.
        adapters: one adapter folder or several, merged in order.
        out: output folder; must not exist unless ``force``.
        weights: one multiplier per adapter (default 1.0 each).
        force: replace an existing ``out``.
        exact_unmerge: also write the sidecar that makes :func:`unmerge_checkpoint` bit-exact
            (with the digests that let it prove so).
        progress: show a progress bar on stderr.
        allow_nonfinite: write the result even where the merge turns a finite weight into inf or
            NaN (by default that is an error naming the tensor and element).

    Raises:
        FileExistsError: ``out`` exists and ``force`` is false.
        ValueError: an adapter does not fit the base (the message names both tensors), targets a
            convolution, is of another PEFT type, a file is corrupt, or the merged weights are not
            finite.
    """
    base_dir, out_dir, adapter_dirs, weights = _check_paths(base, adapters, out, weights, force)
    with tempfile.TemporaryDirectory(prefix="oxpeft-adapters-") as scratch:
        size = _native.checkpoint_size(str(base_dir))  # (bytes, tensors): read once, for the checks and the bar
        resolved = [_resolve_adapter(d, w, Path(scratch), size[0], base_dir) for d, w in zip(adapter_dirs, weights)]
        _warn_if_tied_embedding_changes(base_dir, [(r[0], r[1]) for r in resolved])

        def work(tmp: Path, bar: _Progress) -> dict:
            # The adapters' sha256 (for the sidecar's manifest) is computed on a thread while the
            # merge runs (hashlib releases the GIL), rather than before it.
            stop = threading.Event()  # a failed merge does not wait for the hashing of what it refused
            with ThreadPoolExecutor(max_workers=1) as pool:
                fingerprints = [pool.submit(r[3], stop) for r in resolved] if exact_unmerge else []
                try:
                    report = _native.merge_checkpoint(
                        str(base_dir),
                        [r[:3] for r in resolved],
                        str(tmp),
                        exact_unmerge,
                        bar.hook,
                        allow_nonfinite=allow_nonfinite,
                    )
                except BaseException:
                    stop.set()
                    raise
                digests = report.pop("digests", None)
                if exact_unmerge and (tmp / SIDECAR_DIR).is_dir():
                    manifest = {
                        "format": _MANIFEST_FORMAT,
                        "adapters": [f.result() for f in fingerprints],
                        "digests": json.loads(digests),
                    }
                    manifest["check"] = _manifest_check(manifest)
                    (tmp / SIDECAR_DIR / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            return report

        return _build(base_dir, size, out_dir, force, progress, "merge", work, exact=exact_unmerge)


def unmerge_checkpoint(
    merged: PathLike,
    adapters: PathLike | Sequence[PathLike],
    out: PathLike,
    weights: Sequence[float] | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    approximate: bool = False,
) -> MergeReport:
    """Remove merged LoRA / IA3 / LoHa / LoKr adapters from the checkpoint folder ``merged``, writing folder ``out``.

    When ``merged`` holds the exact-unmerge sidecar written for these adapters (same files, same
    order), the result equals the original base bit for bit, and the merge's weights are used. It is
    checked to be: the sidecar's files and the merged shards' headers against the manifest's digests
    before anything is written, every merged tensor as it is read and every restored tensor against
    the digest of the original before the output is published; any difference is a ValueError
    naming the file or tensor, and nothing is left at ``out``. A sidecar written before the digests
    existed (manifest format 1) is used only with ``approximate=True``, and the result is reported
    as not verified.
    Without it (a checkpoint merged by another tool, with ``--no-exact-unmerge``, or never merged at
    all) subtracting the delta cannot tell a merged checkpoint from any other and rounds every
    element, so it is refused unless ``approximate`` is true; then the delta is subtracted (IA3: W
    divided by the vector) and a warning says the result is approximate. DoRA, modules_to_save and
    an IA3 vector with a zero entry cannot be undone without the sidecar.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is false.
        ValueError: the sidecar belongs to other adapters, was changed or damaged, the merged
            checkpoint was changed after the merge, the result would not be the original base, an
            adapter does not fit, or there is no sidecar and ``approximate`` is false.
    """
    explicit_weights = weights is not None
    merged_dir, out_dir, adapter_dirs, weights = _check_paths(merged, adapters, out, weights, force)
    sidecar = merged_dir / SIDECAR_DIR
    with tempfile.TemporaryDirectory(prefix="oxpeft-adapters-") as scratch:
        size = _native.checkpoint_size(str(merged_dir))  # (bytes, tensors): read once, for the checks and the bar
        resolved = [_resolve_adapter(d, w, Path(scratch), size[0], merged_dir) for d, w in zip(adapter_dirs, weights)]
        manifest_path = sidecar / _MANIFEST
        exact = manifest_path.is_file()
        digests = None
        if not exact and not approximate and sidecar.is_dir() and any(sidecar.glob("*.safetensors")):
            raise ValueError(
                f"{manifest_path}: missing, while {sidecar} holds sidecar files: without the manifest they cannot be "
                "tied to this merge or checked. Restore it, or pass approximate=True to subtract the adapters "
                "without the sidecar"
            )
        if exact:
            manifest = _read_manifest(manifest_path)
            if manifest.get("format") == _MANIFEST_FORMAT_UNCHECKED:
                if not approximate:
                    raise ValueError(
                        f"{manifest_path}: this sidecar was written by an older oxpeft without digests, so the "
                        "unmerged checkpoint could not be proven equal to the original base; pass approximate=True "
                        "to unmerge with it anyway (the result is reported as not verified)"
                    )
            else:
                digests = json.dumps(manifest["digests"])
            recorded = manifest["adapters"]
            given = [r[3]() for r in resolved]
            strip = lambda fps: [{k: v for k, v in fp.items() if k != "weight"} for fp in fps]  # noqa: E731
            if strip(recorded) != strip(given):
                raise ValueError(
                    f"{manifest_path}: the exact-unmerge sidecar was written for other adapters "
                    f"(or another order); pass the adapters that were merged, in the same order"
                )
            # The sidecar is only valid for the weights it was written with.
            if explicit_weights and weights != [fp["weight"] for fp in recorded]:
                raise ValueError(
                    f"{manifest_path}: the adapters were merged with weights "
                    f"{[fp['weight'] for fp in recorded]}, not {weights}"
                )
            resolved = [(d, f, fp["weight"], fp) for (d, f, _, _), fp in zip(resolved, recorded)]
        elif not approximate:
            raise ValueError(
                f"{merged_dir} has no exact-unmerge sidecar ({SIDECAR_DIR}/), so it was not merged by oxpeft with "
                "these adapters, or was merged without the sidecar, or was never merged: subtracting the adapters "
                "would write a model that is not the original base. Pass approximate=True to "
                "subtract them anyway, knowing every element may differ from the original by rounding"
            )
        else:
            warnings.warn(
                f"{merged_dir} has no exact-unmerge sidecar: the unmerged weights are approximate "
                "(elements may differ from the original base by rounding)",
                stacklevel=2,
            )

        def work(tmp: Path, bar: _Progress) -> dict:
            return _native.unmerge_checkpoint(
                str(merged_dir),
                [r[:3] for r in resolved],
                str(tmp),
                str(sidecar) if exact else None,
                bar.hook,
                digests=digests,
                manifest=str(manifest_path),
            )

        report = _build(merged_dir, size, out_dir, force, progress, "unmerge", work, exact=exact)
        return dataclasses.replace(report, verified=digests is not None)


def _check_paths(
    base: PathLike,
    adapters: PathLike | Sequence[PathLike],
    out: PathLike,
    weights: Sequence[float] | None,
    force: bool,
) -> tuple[Path, Path, list[Path], list[float]]:
    base_dir = Path(base).resolve()
    out_dir = Path(out).resolve()
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    adapter_dirs = [Path(a).resolve() for a in adapters]
    if not adapter_dirs:
        raise ValueError("no adapters given")
    weights = [1.0] * len(adapter_dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapter_dirs):
        raise ValueError(f"{len(weights)} weights given for {len(adapter_dirs)} adapters")
    if not base_dir.is_dir():
        raise FileNotFoundError(f"{base_dir}: no such checkpoint folder")
    for folder in [base_dir, *adapter_dirs, base_dir / SIDECAR_DIR]:
        _refuse_special_files(folder)
    for p in [base_dir, *adapter_dirs]:
        if out_dir == p or out_dir in p.parents or p in out_dir.parents:
            raise ValueError(f"output folder {out_dir} overlaps input {p}")
    refuse_existing(out_dir, force)
    return base_dir, out_dir, adapter_dirs, weights


def _refuse_special_files(folder: Path) -> None:
    """Every file a merge or unmerge may read in `folder` must be a regular file (after symlinks): a FIFO would
    block the run forever and a device (a link to /dev/zero) would feed it endless bytes. Checked with stat,
    which opens nothing."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError as exc:  # a dangling symlink, say
            raise ValueError(f"{entry}: cannot be read ({exc.strerror})") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
            raise ValueError(f"{entry}: {kind}, not a regular file; refusing to read it")


def _sha256(path: Path, stop: threading.Event | None = None) -> str:
    """The file's sha256; with `stop`, abandoned (InterruptedError) as soon as `stop` is set."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {path} was stopped")
            h.update(chunk)
    return h.hexdigest()


def _resolve_adapter(
    folder: Path, weight: float, scratch: Path, base_bytes: int, base: Path
) -> tuple[str, str, float, dict]:
    """(folder, safetensors weights file, weight, fingerprint function) of an adapter folder.

    A legacy ``adapter_model.bin`` is read with ``torch.load(weights_only=True)`` (never a full
    unpickle) and converted to a safetensors file in ``scratch``. Trainable token rows become embedding
    replacements (``_merge_tokens``), LoRA variants plain LoRA (``_merge_variants``), a tied output layer's copy
    of the embedding's LoRA is left to the embedding (``_merge_tied``), and LoRA on MoE expert
    parameters (``target_parameters``) the equivalent per-expert LoRA for the checkpoint ``base``
    (``_expert_merge``), each in ``scratch``. The fingerprint is always of the adapter's own files.
    """
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such adapter folder")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    st = folder / "adapter_model.safetensors"
    source = st if st.is_file() else folder / "adapter_model.bin"
    if not source.is_file():
        raise FileNotFoundError(f"{folder}: neither adapter_model.safetensors nor adapter_model.bin")
    _refuse_oversized_adapters(base_bytes, [str(source)])
    weights_file = st
    if source != st:
        from safetensors.torch import save_file

        from oxpeft.utils.save_and_load import load_pickled_tensors

        state = load_pickled_tensors(source)
        weights_file = scratch / f"{len(list(scratch.iterdir()))}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights_file), metadata={"format": "pt"})
    adapter_dir = folder
    config_values = _read_adapter_config(config)
    tensors_of_base: dict | None = None  # read once, if a conversion needs it
    for conversion in (_merge_tokens, _merge_variants, _merge_tied, _expert_merge):
        if conversion.needs_conversion(config_values):
            if tensors_of_base is None:
                tensors_of_base = _native.checkpoint_tensors(str(base))
            adapter_dir = scratch / f"converted-{len(list(scratch.iterdir()))}"
            weights_file = conversion.convert(config_values, Path(weights_file), base, tensors_of_base, adapter_dir)
            config_values = _read_adapter_config(adapter_dir / "adapter_config.json")
    return str(adapter_dir), str(weights_file), weight, partial(_fingerprint, config, source, weight)


def _read_adapter_config(path: Path) -> dict:
    """The adapter config's values, or {} when it cannot be read (the Rust reader then reports why, naming it)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return values if isinstance(values, dict) else {}


def _fingerprint(config: Path, weights: Path, weight: float, stop: threading.Event | None = None) -> dict:
    """What the exact-unmerge manifest records of an adapter: its files' sha256 and its weight."""
    return {"config_sha256": _sha256(config, stop), "weights_sha256": _sha256(weights, stop), "weight": weight}


def _refuse_oversized_adapters(base_bytes: int, weight_files: list[str]) -> None:
    """An adapter file larger than twice its base checkpoint cannot be an adapter for it (a sparse file declaring a
    512 GiB tensor, say); refused before it is hashed or read, naming its size."""
    for path in weight_files:
        size = os.path.getsize(path)
        if size > 2 * base_bytes + (64 << 20):
            raise ValueError(
                f"{path}: {size / 2**30:,.1f} GiB, more than twice the whole base checkpoint "
                f"({base_bytes / 2**30:,.2f} GiB): not an adapter for it"
            )


def _warn_if_tied_embedding_changes(base: Path, adapters: list[tuple[str, str]]) -> None:
    """LoRA on an input embedding that the output layer shares (tie_word_embeddings) changes the output
    layer too once merged, which the adapted model did not do, unless it was trained tied (ensure_weight_tying).
    `adapters`: (folder, weights file) of each."""
    config = base / "config.json"
    if not config.is_file():
        return
    cfg = json.loads(config.read_text())
    # transformers' PretrainedConfig default is to tie.
    if not cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", True)):
        return
    from safetensors import safe_open

    for folder, f in adapters:
        if _read_adapter_config(Path(folder) / "adapter_config.json").get("ensure_weight_tying"):
            continue
        with safe_open(f, "np") as st:
            if any(k.endswith(".lora_embedding_A") for k in st.keys()):
                warnings.warn(
                    f"{f}: LoRA on an embedding of a model with tied input/output embeddings "
                    f"({config}: tie_word_embeddings): the merged embedding is also the output layer, so the "
                    "merged model differs from the adapted one",
                    stacklevel=3,
                )
                return


class _Progress:
    """A tqdm bar fed by the native per-tensor callback (bytes, tensors, ETA)."""

    def __init__(self, enabled: bool, desc: str, total_bytes: int, total_tensors: int) -> None:
        self.total_tensors = total_tensors
        self.done = 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    @property
    def hook(self):
        """The per-tensor callback for the native run, or None without a bar (then the native side
        sends no events at all)."""
        return self.callback if self.bar is not None else None

    def callback(self, name: str, nbytes: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.done}/{self.total_tensors} tensors", refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_manifest(path: Path) -> dict:
    """The exact-unmerge sidecar's manifest, checked field by field: anything malformed is one error naming the
    file and the field (never a raw JSON / Type / Key error)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ValueError(f"{path}: not a valid manifest ({reason}); the sidecar is damaged") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a valid manifest (a JSON object is expected); the sidecar is damaged")
    adapters = manifest.get("adapters")
    if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
        raise ValueError(f"{path}: field 'adapters' must be a list of objects; the sidecar is damaged")
    for i, adapter in enumerate(adapters):
        weight = adapter.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{path}: field 'adapters[{i}].weight' must be a finite number; the sidecar is damaged")
    fmt = manifest.get("format")
    if fmt == _MANIFEST_FORMAT_UNCHECKED:
        return manifest
    if fmt != _MANIFEST_FORMAT:
        shown = fmt if isinstance(fmt, str) and len(fmt) <= 80 else type(fmt).__name__
        raise ValueError(
            f"{path}: field 'format' is {shown!r}, not {_MANIFEST_FORMAT!r}: not a sidecar this oxpeft can check"
        )
    if not isinstance(manifest.get("digests"), dict):
        raise ValueError(f"{path}: field 'digests' must be an object; the sidecar is damaged")
    if manifest.get("check") != _manifest_check(manifest):
        raise ValueError(
            f"{path}: the manifest was edited after the merge (its 'check' does not match its contents): the "
            "adapters' weights or digests it records cannot be trusted"
        )
    return manifest


def _manifest_check(manifest: dict) -> str:
    """The sha256 of the manifest's other fields in canonical JSON: an edit of the manifest (a weight changed by
    hand) is found before the unmerge uses it."""
    body = {k: v for k, v in manifest.items() if k != "check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _remove_stale_partials(out: Path) -> None:
    """Remove `.OUT.<pid>.*.partial` folders that a run killed beyond cleaning up (kill -9, a power cut) left next
    to OUT. Only those whose process is gone: a live pid's folder belongs to a run still writing."""
    prefix = f".{out.name}."
    for entry in out.parent.iterdir() if out.parent.is_dir() else ():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".partial") and entry.is_dir() and not entry.is_symlink()):
            continue
        pid_text = name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid this code writes: leave the folder alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copies config, generation config, tokenizer and other non-weight top-level files."""
    for entry in src.iterdir():
        if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(entry, dst / entry.name)
            # As `cp` does: the source's mode, less the umask's bits.
            os.chmod(dst / entry.name, umask_mode(stat.S_IMODE(entry.stat().st_mode)))


def _build(
    src: Path, size: tuple[int, int], out: Path, force: bool, progress: bool, desc: str, work, *, exact: bool
) -> MergeReport:
    total_bytes, total_tensors = size
    created = make_parents(out)  # removed again if the run fails: a refused run leaves no new folders
    _remove_stale_partials(out)
    try:
        # The writing process's pid is in the name, so that a later run can tell a dead run's leftovers.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    except BaseException:
        remove_created(created)
        raise
    bar = _Progress(progress, desc, total_bytes, total_tensors)
    start = time.perf_counter()
    try:
        raw = work(tmp, bar)
        _copy_other_files(src, tmp)
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp's folder is private; the result is the user's, like `cp -r`
        if out.exists():
            if not force:
                raise FileExistsError(f"{out} appeared while writing; not replacing it")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise
    finally:
        bar.close()
    return MergeReport(operation=desc, out=out, seconds=time.perf_counter() - start, exact=exact, **raw)
