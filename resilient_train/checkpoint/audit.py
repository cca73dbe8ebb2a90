"""``ckpt verify``'s checks of the manifest itself, and who is to blame for a mismatch.

:func:`~resilient_train.checkpoint.reader.verify_checkpoint` checks every file against the
manifest. That alone cannot tell a damaged file from a damaged manifest, and it does not see
damage that only the manifest carries (a renamed tensor key, a changed world size). This
module adds:

* the signature, when verification keys are given (before anything else is trusted);
* the manifest against itself: every rank file of its world size listed (and none beyond),
  ``state.json`` listed, tensor keys that match their names and files, pieces of one key that
  agree on dtype and global shape and tile it exactly;
* the manifest against the files that are intact (whose bytes match their recorded SHA-256):
  safetensors headers hold exactly the tensors the manifest puts there, the Hugging Face index
  maps exactly the model tensors, ``state.json`` refers only to tensors that exist;
* blame: a file whose bytes match the manifest's SHA-256 is not at fault, so a mismatch found
  in it is reported against ``manifest.json``.

Every problem is ``(file, message)``; the file is the one actually at fault.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ..errors import CheckpointNotFoundError, ManifestError, ResilientTrainError, SignatureError
from ..format.manifest import Manifest, TensorRecord
from ..format.names import GROUPS, HF_INDEX_NAME, MANIFEST_NAME, STATE_NAME, rank_state_filename, step_dirname
from ..format.safetensors_io import MAX_HEADER_BYTES, parse_header
from ..format.signing import as_keyring
from ..storage import Store, redact
from ..storage.transfer import sha256_of
from .signatures import SIGNATURE_NAME, read_signature
from .location import as_store
from .reader import completeness_problems, verify_checkpoint

__all__ = ["AuditReport", "audit_checkpoint", "manifest_problems", "is_format_file_name"]

log = logging.getLogger(__name__)

_MAX_JSON_BYTES = 256 * 1024 * 1024


@dataclass
class AuditReport:
    step: int
    manifest: Manifest | None
    problems: list[tuple[str, str]] = field(default_factory=list)
    signed_by: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _key_prefix(file: str) -> str | None:
    """The prefix a tensor key has in front of its in-file name, by the file's group."""
    for group, stem in sorted(GROUPS.items(), key=lambda kv: -len(kv[1])):
        if file.startswith(stem + "-"):
            return {"model": "model/", "model_shards": "model/", "optimizer": "optimizer/", "extra": ""}[group]
    return None


def _boxes_overlap(a: TensorRecord, b: TensorRecord) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.shape, b.offsets, b.shape))


def _volume(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_FORMAT_FILE = re.compile(r"^(?:rank-\d{5}\.json|(?:" + "|".join(re.escape(s) for s in GROUPS.values()) + r")-\d{5}-of-\d{5}\.safetensors)$")


def is_format_file_name(name: str) -> bool:
    """Whether a save of this format writes files named ``name`` (manifest.json aside)."""
    return name in (STATE_NAME, HF_INDEX_NAME) or bool(_FORMAT_FILE.match(name))


def manifest_problems(manifest: Manifest) -> Iterator[str]:
    """What is wrong with a (schema-valid) manifest on its own."""
    listed = {f.path for f in manifest.files}
    for name in sorted(listed):
        if not is_format_file_name(name):
            yield f"lists {name}, which is not a file name of this format"
    if STATE_NAME not in listed:
        yield f"{STATE_NAME} is not listed"
    if HF_INDEX_NAME not in listed and any(t.file.startswith(GROUPS["model"] + "-") and not t.file.startswith(GROUPS["model_shards"] + "-") for t in manifest.tensors):
        yield f"it has whole model tensors but does not list {HF_INDEX_NAME}"
    for r in range(manifest.world_size):
        if rank_state_filename(r) not in listed:
            yield f"world size {manifest.world_size} but {rank_state_filename(r)} is not listed"
    for name in sorted(listed):
        if name.startswith("rank-") and name.endswith(".json"):
            try:
                r = int(name[5:-5])
            except ValueError:
                continue
            if r >= manifest.world_size:
                yield f"{name} is listed but the world size is {manifest.world_size}"
    by_key: dict[str, list[TensorRecord]] = {}
    for t in manifest.tensors:
        by_key.setdefault(t.key, []).append(t)
        prefix = _key_prefix(t.file)
        if prefix is None:
            yield f"tensor {t.key!r} lives in {t.file!r}, which is not a tensor file name of this format"
        elif t.key != prefix + t.name:
            yield f"tensor key {t.key!r} does not match its name {t.name!r} in {t.file} (expected {prefix + t.name!r})"
    for key, recs in sorted(by_key.items()):
        if len({(r.dtype, r.global_shape) for r in recs}) > 1:
            yield f"pieces of {key!r} disagree on dtype or global shape"
            continue
        covered = sum(_volume(r.shape) for r in recs)
        if covered != _volume(recs[0].global_shape):
            yield f"pieces of {key!r} cover {covered} of its {_volume(recs[0].global_shape)} elements"
        elif len(recs) > 1 and any(_boxes_overlap(a, b) for i, a in enumerate(recs) for b in recs[i + 1:]):
            yield f"pieces of {key!r} overlap"


def _header(store: Store, path: str, size: int) -> dict[str, Any]:
    head = store.read_bytes(path, 0, min(size, 8))
    if len(head) < 8:
        raise ManifestError("too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise ManifestError("safetensors header length out of bounds")
    _, slots, _ = parse_header(store.read_bytes(path, 0, 8 + n), size, where=path)
    return slots


def _read_json(store: Store, path: str, size: int) -> Any:
    if size > _MAX_JSON_BYTES:
        raise ValueError("too large")
    return json.loads(store.read_bytes(path).decode("utf-8"))


def _same_bytes(store: Store, path: str, rec: Any) -> bool:
    try:
        return store.size(path) == rec.size_bytes and sha256_of(store, path, digester=rec.new_digester) == (rec.size_bytes, rec.digest)
    except (ResilientTrainError, OSError):
        return False


def _tensor_refs(tree: Any, out: set[str], depth: int = 0) -> None:
    if depth > 200:
        return
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"} and isinstance(tree["__tensor__"], str):
            out.add(tree["__tensor__"])
            return
        for v in tree.values():
            _tensor_refs(v, out, depth + 1)
    elif isinstance(tree, list):
        for v in tree:
            _tensor_refs(v, out, depth + 1)


def _blame_files(store: Store, folder: str, manifest: Manifest, report: AuditReport, io_threads: int | None, progress: bool) -> set[str]:
    """Every file against the manifest; a mismatch in a file whose bytes match their recorded
    SHA-256 is the manifest's. Returns the intact files."""
    _, file_problems = verify_checkpoint(store, manifest.step, io_threads=io_threads, progress=progress)
    # What verify found in the manifest itself (its whole-file digests against the verified
    # chunks), less the completeness problems manifest_problems reported already.
    already = set(completeness_problems(manifest))
    for p in file_problems:
        if p.startswith(MANIFEST_NAME + ":") and p not in already:
            report.problems.append((MANIFEST_NAME, p[len(MANIFEST_NAME) + 1:].strip()))
    try:
        on_disk: set[str] | None = set(store.list(folder))
    except (ResilientTrainError, OSError):
        on_disk = None
    intact = set()
    for rec in manifest.files:
        mine = [p for p in file_problems if p.startswith(rec.path + ":")]
        if not mine:
            intact.add(rec.path)
        elif _blame_file(store, folder, manifest, rec, mine, on_disk, report):
            intact.add(rec.path)
    return intact


def _blame_file(store: Store, folder: str, manifest: Manifest, rec: Any, mine: list[str], on_disk: set[str] | None, report: AuditReport) -> bool:
    """Who is at fault for the problems ``mine`` verify found in file ``rec``: the file, or the
    manifest (a listed file that does not exist, or bytes that match their recorded SHA-256).
    Returns whether the file itself is intact."""
    try:
        size, digest = sha256_of(store, f"{folder}/{rec.path}", digester=rec.new_digester)
    except (ResilientTrainError, OSError):
        size, digest = -1, ""
    if size < 0 and on_disk is not None and rec.path not in on_disk:
        # A listed file that does not exist: lost, or named wrong in the manifest.
        listed = {r.path for r in manifest.files}
        twin = next((u for u in sorted(on_disk - listed - {MANIFEST_NAME, SIGNATURE_NAME}) if _same_bytes(store, f"{folder}/{u}", rec)), None)
        if twin is not None:
            report.problems.append((MANIFEST_NAME, f"lists {rec.path}, which does not exist; {twin}, which it does not list, has exactly the size and digest recorded for it: the manifest names it wrong"))
        elif not is_format_file_name(rec.path):
            report.problems.append((MANIFEST_NAME, f"lists {rec.path}, which does not exist (and is not a file name of this format)"))
        else:
            report.problems.append((rec.path, "does not exist (listed in the manifest)"))
        return False
    content_only = rec.path == STATE_NAME or (rec.path.startswith("rank-") and rec.path.endswith(".json"))
    if size == rec.size_bytes and digest == rec.digest and content_only and all("StateFileError" in p and "referenced by the JSON state is missing" not in p for p in mine):
        # The file holds the bytes the manifest recorded, and they are invalid on their own
        # (not against the manifest): the file was written so.
        report.problems.extend((rec.path, f"its content is invalid although its bytes match their recorded digest: {p[len(rec.path) + 1:].strip()}") for p in mine)
        return False
    if size == rec.size_bytes and digest == rec.digest:
        # The bytes are the ones the manifest recorded: what disagrees is the manifest.
        for p in mine:
            report.problems.append((MANIFEST_NAME, f"disagrees with {rec.path}, whose bytes match their recorded digest: {p[len(rec.path) + 1:].strip()}"))
        return True
    report.problems.extend((rec.path, p[len(rec.path) + 1:].strip()) for p in mine)
    return False


def audit_checkpoint(uri: "str | Store", step: int, *, storage_options: Mapping[str, Any] | None = None, verify_keys: Any = None, io_threads: int | None = None, progress: bool = False) -> AuditReport:
    """Check checkpoint ``step`` completely (see module doc). Raises CheckpointNotFoundError if
    it has no manifest; everything else is reported as problems naming the file at fault."""
    store = as_store(uri, storage_options)
    folder = step_dirname(step)
    report = AuditReport(step, None)
    mpath = f"{folder}/{MANIFEST_NAME}"
    try:
        data = store.read_bytes(mpath)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint for step {step} under {store.uri} ({mpath} is missing)") from None
    ring = as_keyring(verify_keys)
    if ring is not None:
        try:
            report.signed_by = ring.verify(data, read_signature(store, folder), where=MANIFEST_NAME)
        except SignatureError as exc:
            report.problems.append((MANIFEST_NAME, f"SignatureError: {exc}"))
            return report
    try:
        manifest = Manifest.from_bytes(data, where=MANIFEST_NAME)
        if manifest.step != step:
            raise ManifestError(f"{MANIFEST_NAME} says step {manifest.step} but lives in folder {folder}")
    except ManifestError as exc:
        report.problems.append((MANIFEST_NAME, f"{type(exc).__name__}: {exc}"))
        return report
    report.manifest = manifest
    for p in manifest_problems(manifest):
        report.problems.append((MANIFEST_NAME, p))

    intact = _blame_files(store, folder, manifest, report, io_threads, progress)
    names_by_file: dict[str, dict[str, TensorRecord]] = {}
    for t in manifest.tensors:
        names_by_file.setdefault(t.file, {})[t.name] = t
    for rec in manifest.files:
        if rec.path not in intact:
            continue
        path = f"{folder}/{rec.path}"
        try:
            if rec.path.endswith(".safetensors"):
                slots = _header(store, path, rec.size_bytes)
                listed = names_by_file.get(rec.path, {})
                extra = sorted(set(slots) - set(listed))
                if extra:
                    report.problems.append((MANIFEST_NAME, f"{rec.path} holds tensors the manifest does not list: {extra[:5]}"))
                for name, t in listed.items():
                    slot = slots.get(name)
                    if slot is not None and (slot.dtype != t.dtype or tuple(slot.shape) != tuple(t.shape)):
                        report.problems.append((MANIFEST_NAME, f"tensor {t.key!r}: the manifest says {t.dtype} {list(t.shape)}, {rec.path} holds {slot.dtype} {list(slot.shape)}"))
            elif rec.path == HF_INDEX_NAME:
                index = _read_json(store, path, rec.size_bytes)
                want = {t.name: t.file for t in manifest.tensors if t.file.startswith(GROUPS["model"] + "-") and not t.file.startswith(GROUPS["model_shards"] + "-")}
                got = index.get("weight_map") if isinstance(index, dict) else None
                if got != want:
                    report.problems.append((MANIFEST_NAME, f"its model tensors do not match {HF_INDEX_NAME}'s weight_map"))
            elif rec.path == STATE_NAME:
                refs: set[str] = set()
                _tensor_refs(_read_json(store, path, rec.size_bytes), refs)
                missing = sorted(refs - {t.key for t in manifest.tensors})
                if missing:
                    report.problems.append((MANIFEST_NAME, f"{STATE_NAME} refers to tensors the manifest does not list: {missing[:5]}"))
        except (ResilientTrainError, OSError, ValueError, RecursionError) as exc:
            report.problems.append((MANIFEST_NAME, redact(f"its record of {rec.path} (whose bytes match their SHA-256) cannot be checked: {type(exc).__name__}: {exc}")))
    return report
