"""The ``resilient-train`` command line.

Exit codes, for scripts: 0 success; 1 a check failed (``ckpt verify`` found a bad file, a
source file is corrupt); 2 bad usage or configuration (unknown flag, bad ``--storage-options``
JSON, access denied: the message says what to fix); 3 not found or unreachable (no such
bucket, path or step; a store that does not answer); 130 interrupted (Ctrl-C).

Errors print one short line first (``error: ...``) and the detail, if any, on the lines
after it. Global flags (``-v``, ``-q``, ``--storage-options``) go before or after the
subcommand. A step is written ``--step 999``, ``step-999``, ``step-0000000999`` or as the
last part of a URL (``s3://b/run/step-999``).

torch is imported only by the commands that need it, so ``--help``/``--version`` are quick. A
Ctrl-C while the command line starts ends it with exit 130 and no traceback (the console
script's entry, :mod:`resilient_train._console`, sets a quiet handler before it imports this
module; only Python's own start-up and the package's import, ~30 ms, are before it).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import os
import sys
import threading
from typing import Any, Sequence

from . import __version__
from .errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    OperationCancelledError,
    ReplicationError,
    ResilientTrainError,
    StoreNotFoundError,
    StorePermissionError,
    StoreUnavailableError,
)


def open_store(*args: Any, **kwargs: Any) -> Any:
    from .storage import open_store as _open  # imported on use: the CLI starts in a blink

    return _open(*args, **kwargs)


def redact(text: str) -> str:
    from .storage import redact as _redact

    return _redact(text)

__all__ = ["main", "split_step_url", "parse_step", "EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_INTERRUPTED"]

log = logging.getLogger("resilient_train.cli")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_STEP_RE = re.compile(r"^step-(\d+)$")


class UsageError(ConfigError):
    """Arguments that contradict each other or cannot be read (exit 2)."""


def parse_step(text: str) -> int:
    """``999``, ``step-999`` or ``step-0000000999`` -> 999 (an argparse ``type``)."""
    text = str(text).strip().rstrip("/")
    m = _STEP_RE.match(text)
    digits = m.group(1) if m else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a step: write 999, step-999 or step-0000000999")
    return int(digits)


def split_step_url(url: str) -> tuple[str, int | None]:
    """``s3://b/run/step-42`` (any number of digits) -> (``s3://b/run``, 42); a URL without a step -> (url, None)."""
    trimmed = url.rstrip("/")
    head, _, last = trimmed.rpartition("/")
    m = _STEP_RE.match(last)
    if m and head:
        return head, int(m.group(1))
    return trimmed or url, None


def _root_and_step(url: str, flag: int | None) -> tuple[str, int | None]:
    root, step = split_step_url(url)
    if step is not None and flag is not None and step != flag:
        raise UsageError(f"{redact(url)} names step {step} but --step says {flag}: give one of them")
    return root, step if step is not None else flag


def _options(args: argparse.Namespace, attr: str = "storage_options") -> dict[str, Any]:
    raw = getattr(args, attr, None)
    if not raw and attr == "storage_options":
        raw = getattr(args, "global_storage_options", None)
    if not raw:
        return {}
    flag = "--" + attr.replace("_", "-")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON ({exc.msg} at character {exc.pos})\nwrite a JSON object, such as '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object ({{...}}), got {type(value).__name__}")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _resolve_step(store: Any, step: int | None) -> int:
    from .checkpoint import newest_committed

    if step is not None:
        return step
    latest = newest_committed(store, limit=1)
    if not latest:
        _require_something_at(store)
        raise CheckpointNotFoundError(f"no committed checkpoint under {store.uri}")
    return latest[0]


def _require_something_at(store: Any) -> list[str]:
    """The names under ``store``; StoreNotFoundError when there is nothing (no bucket, no path)."""
    names = store.list("")
    if not names:
        raise StoreNotFoundError(f"nothing found at {store.uri}: check the bucket and the path")
    return names


def cmd_ls(args: argparse.Namespace) -> int:
    from .checkpoint import read_manifest
    from .errors import CheckpointError
    from .format.names import parse_step_dirname

    store = open_store(args.url, _options(args))
    rows = []
    for name in _require_something_at(store):
        step = parse_step_dirname(name)
        if step is None:
            continue
        try:
            m = read_manifest(store, step)
            rows.append((step, "committed", len(m.files), _human(m.total_bytes), str(m.world_size)))
        except CheckpointError as exc:
            status = "uncommitted" if "missing" in str(exc) else "invalid manifest"
            rows.append((step, status, "-", "-", "-"))
    if not rows:
        print(f"no checkpoints under {store.uri}")
        return 0
    print(f"{'step':>12}  {'status':<17} {'files':>5}  {'size':>10}  world")
    for step, status, files, size, world in rows:
        print(f"{step:>12}  {status:<17} {files:>5}  {size:>10}  {world}")
    return 0


def _plain(x: Any) -> str:
    """One value of the JSON state as Python-like text: tuples as (a, b), no tags, no cuts."""
    if isinstance(x, list):
        return "[" + ", ".join(_plain(v) for v in x) + "]"
    if isinstance(x, dict):
        if len(x) == 1:
            (tag, val), = x.items()
            if tag == "__tuple__":
                return "(" + ", ".join(_plain(v) for v in val) + ("," if len(val) == 1 else "") + ")"
            if tag == "__dict__":
                return "{" + ", ".join(f"{_plain(k)}: {_plain(v)}" for k, v in val) + "}"
            if tag == "__float__":
                return {"nan": "nan", "inf": "inf", "-inf": "-inf"}[val]
            if tag == "__bytes__":
                return f"<{len(val) * 3 // 4} bytes>"
            if tag == "__dtype__":
                return f"torch.{val}"
            if tag == "__ndarray__":
                return f"<ndarray {val.get('dtype')} {list(val.get('shape', []))}>"
            if tag == "__tensor__":
                return f"<tensor {val}>"
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in x.items()) + "}"
    if isinstance(x, str):
        return repr(x)
    return repr(x)  # int, float, bool, None: as Python writes them


def _print_tree(tree: Any, indent: str) -> None:
    if isinstance(tree, dict) and not (len(tree) == 1 and next(iter(tree)).startswith("__")):
        for k, v in tree.items():
            if isinstance(v, dict) and v and not (len(v) == 1 and next(iter(v)).startswith("__")):
                print(f"{indent}{k}:")
                _print_tree(v, indent + "  ")
            else:
                print(f"{indent}{k}: {_plain(v)}")
    else:
        print(f"{indent}{_plain(tree)}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import read_manifest
    from .checkpoint.reader import read_json_file
    from .format.names import STATE_NAME, step_dirname

    root, step = _root_and_step(args.url, args.step)
    store = open_store(root, _options(args))
    step = _resolve_step(store, step)
    m = read_manifest(store, step)
    shared = read_json_file([store], step_dirname(step), m.file(STATE_NAME))
    if args.json:
        print(json.dumps({"manifest": m.to_json(), "state": shared}, indent=1, sort_keys=True))
        return 0
    print(f"checkpoint {store.uri}/{step_dirname(step)}")
    print(f"  format version {m.format_version}, step {m.step}, saved by {m.world_size} rank(s), {len(m.files)} files, {_human(m.total_bytes)}")
    print("  files:")
    for f in m.files:
        print(f"    {f.path:<48} {_human(f.size_bytes):>10}  {f.hash_algorithm} {f.digest[:16]}...")
    print("  tensors:")
    by_key: dict[str, list] = {}
    for t in m.tensors:
        by_key.setdefault(t.key, []).append(t)
    for key, recs in by_key.items():
        r = recs[0]
        layout = "whole" if len(recs) == 1 and r.is_whole else f"{len(recs)} shards"
        print(f"    {key:<56} {r.dtype:<5} {str(list(r.global_shape)):<16} {layout:<10} {recs[0].file if len(recs) == 1 else ''}")
    print("  state:")
    for label, tree in sorted(shared.items()):
        if label == "optimizer":
            groups = tree.get("param_groups", [])
            print(f"    optimizer: {len(groups)} param group(s), state for {len(tree.get('state', {}))} parameter(s)")
            for i, g in enumerate(groups):
                hp = ", ".join(f"{k}={_plain(v)}" for k, v in sorted(g.items()) if k != "params")
                print(f"      group {i} ({len(g.get('params', []))} parameters): {hp}")
        else:
            print(f"    {label}:")
            _print_tree(tree, "      ")
    return 0


def _verify_keys(args: argparse.Namespace) -> Any:
    from .format.signing import load_verify_keys

    paths = getattr(args, "verify_key", None) or []
    return load_verify_keys(paths) if paths else None


def cmd_verify(args: argparse.Namespace) -> int:
    from .checkpoint.audit import audit_checkpoint
    from .format.names import step_dirname

    root, step = _root_and_step(args.url, args.step)
    store = open_store(root, _options(args))
    keys = _verify_keys(args)
    # the newest committed step, signed or not: an unsigned newest one must fail here
    step = _resolve_step(store, step)
    log.info("verifying %s/%s: re-reading every file and its digests", store.uri, step_dirname(step))
    report = audit_checkpoint(store, step, verify_keys=keys, progress=not args.no_progress)
    where = f"{store.uri}/{step_dirname(step)}"
    if report.problems:
        files = sorted({f for f, _ in report.problems})
        print(f"FAILED: {where}: {len(report.problems)} problem(s) in {', '.join(files)}:", file=sys.stderr)
        for f, msg in report.problems:
            print(f"  {f}: {redact(msg)}", file=sys.stderr)
        return 1
    m = report.manifest
    assert m is not None
    signed = f"; manifest signed by key {report.signed_by}" if report.signed_by else ""
    print(f"OK: {len(m.files)} files, {_human(m.total_bytes)} of {where} match their {m.hash_algorithm} digests and the manifest{signed}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from .checkpoint.discovery import sign_checkpoint
    from .format.names import step_dirname
    from .format.signing import load_signing_key

    key = load_signing_key(args.key, args.key_id)
    root, step = split_step_url(args.url)
    step, key_id = sign_checkpoint(root, step, key, storage_options=_options(args))
    print(f"signed {redact(root)}/{step_dirname(step)} with key {key_id}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .checkpoint.export import export_hf

    root, step = _root_and_step(args.src, args.step)
    names = export_hf(root, args.dst, step, max_shard_bytes=int(args.max_shard_gb * 1024**3), storage_options=_options(args), dst_storage_options=_options(args, "dst_storage_options"), progress=not args.no_progress)
    print(f"wrote {len(names)} files to {redact(args.dst)}: {', '.join(names)}")
    return 0


# After the first Ctrl-C, the copies in flight get this long to reach a chunk boundary. Then the
# process ends anyway: a whole-object PUT cannot be cut short, and nothing is lost by leaving it,
# because the destination commits only when its manifest is written, last.
_STOP_GRACE_S = 0.3


def _exit_if_still_running(grace_s: float) -> None:
    import os
    import time

    time.sleep(grace_s)
    print("error: interrupted: the destination is left uncommitted; run the same command again to resume (files already copied are kept)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def _stop_on_first_ctrl_c() -> tuple[threading.Event, Any]:
    """The first Ctrl-C sets the event (the copy stops within about a chunk per thread); a
    second one interrupts at once."""
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("stopping: the copy stops at the next chunk (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        threading.Thread(target=_exit_if_still_running, args=(_STOP_GRACE_S,), daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
    return stop, previous


def cmd_migrate(args: argparse.Namespace) -> int:
    from .checkpoint.replicate import migrate
    from .storage.ledger import Ledger

    src, step = _root_and_step(args.src, args.step)
    if step is not None and args.all:
        raise UsageError("--all copies every step: do not name a step as well")
    ledger = Ledger()
    stop, previous = _stop_on_first_ctrl_c()
    try:
        reports = migrate(
            src, args.dst, step, all_steps=args.all, src_options=_options(args), dst_options=_options(args, "dst_storage_options"),
            io_threads=args.threads, progress=not args.no_progress, stop=stop, verify_keys=_verify_keys(args), ledger=ledger,
        )
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    for r in reports:
        state = "already committed there" if r.already_committed else f"{r.files_copied} files copied ({_human(r.bytes_copied)}, {r.mb_per_s:.1f} MB/s), {r.files_skipped} already there"
        print(f"step {r.step}: {state}; committed on {redact(args.dst)}")
    for line in ledger.lines():
        print(f"ledger: {line}")
    return 0


def cmd_replicate(args: argparse.Namespace) -> int:
    from .checkpoint.replicate import replicate
    from .storage.providers import placement_from_config

    try:
        with open(args.config) as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read --config {args.config}: {exc}")
    from .storage.ledger import Ledger

    placement = placement_from_config(config)
    print(placement.decide().reason)
    ledger = Ledger(placement.providers)
    try:
        for rep in replicate(placement, args.step, all_steps=args.all, io_threads=args.threads, progress=not args.no_progress, ledger=ledger):
            print(f"step {rep.step}: committed on {', '.join(rep.committed)}")
    finally:
        for line in ledger.lines():
            print(f"ledger: {line}")
    return 0


_GLOBAL_FLAGS = {"-v", "-vv", "-vvv", "--verbose", "-q", "--quiet"}


def _hoist_global_flags(argv: Sequence[str]) -> list[str]:
    """Move -v/-q given after the subcommand in front of it, where the main parser reads them."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        head, tail = argv[:cut], argv[cut:]
    else:
        head, tail = argv, []
    flags = [a for a in head if a in _GLOBAL_FLAGS]
    return flags + [a for a in head if a not in _GLOBAL_FLAGS] + tail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resilient-train",
        description="Inspect, verify and move resilient-train checkpoints on any fsspec URL (local paths, s3://, gs://, az://, memory://).",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 usage or configuration, 3 not found or unreachable, 130 interrupted. "
        "Global flags (-v, -q, --storage-options) go before or after the subcommand.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # INFO by default (progress and what was done, on stderr); -v debug; -vv also the cloud
    # clients' own loggers (redacted); -q warnings only.
    p.set_defaults(verbose=1)
    p.add_argument("-v", "--verbose", action="count", help="log more: -v debug, -vv also the cloud clients (secrets redacted); default: info on stderr")
    p.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose", help="warnings and errors only")
    p.add_argument("--storage-options", dest="global_storage_options", metavar="JSON", help="fsspec storage options (JSON) for the command's URL; also accepted after the subcommand")
    sub = p.add_subparsers(dest="command", required=True)
    ckpt = sub.add_parser("ckpt", help="work with checkpoints", description="Work with checkpoints. A checkpoint is a folder step-NNNNNNNNNN/ that counts only once its manifest.json exists.")
    cs = ckpt.add_subparsers(dest="ckpt_command", required=True)

    def url_cmd(name: str, help_: str, desc: str, fn: Any, url_help: str) -> argparse.ArgumentParser:
        sp = cs.add_parser(name, help=help_, description=desc)
        sp.add_argument("url", help=url_help)
        sp.add_argument("--storage-options", metavar="JSON", help='fsspec storage options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'. Credentials are better left to the provider\'s usual environment variables.')
        sp.set_defaults(func=fn)
        return sp

    url_cmd("ls", "list checkpoints under a URL", "List every step folder under URL with its status (committed, uncommitted, invalid manifest), file count, size and the world size that saved it.", cmd_ls, "checkpoint root, e.g. ./ckpts or s3://bucket/run")
    sp = url_cmd("inspect", "show tensors, layout and state of one checkpoint", "Show the files, tensors (dtype, global shape, whole or sharded), and the non-tensor state (optimizer hyper-parameters, scheduler, sampler, extras) of one checkpoint. Without /step-N the latest committed step is shown.", cmd_inspect, "URL or URL/step-NNNNNNNNNN")
    sp.add_argument("--json", action="store_true", help="print the manifest and state as JSON (for machines; the default is plain text)")
    sp.add_argument("--step", type=parse_step, help="the step (999, step-999 or step-0000000999); default: the latest committed")
    sp = url_cmd(
        "verify", "re-hash every file of a checkpoint and check its manifest",
        "Re-read every file of a checkpoint and compare its size and SHA-256 or BLAKE3 digests (the algorithm its manifest names) with the manifest; check the manifest itself (schema, file and tensor names, "
        "world size, pieces that tile each tensor) and against the safetensors headers, the Hugging Face index and state.json; with --verify-key, check "
        "its signature first. Exits 1 and names the file at fault (a file whose bytes match its SHA-256 is not: the manifest is), 0 when everything matches.",
        cmd_verify, "URL or URL/step-N (default: latest)",
    )
    sp.add_argument("--step", type=parse_step, help="the step (999, step-999 or step-0000000999); default: the latest committed")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar (shown when tqdm is installed)")
    sp.add_argument("--verify-key", metavar="FILE", action="append", help="trusted key (Ed25519 public or private PEM, or an HMAC secret file); repeat for several (rotation). The manifest must be signed by one of them")
    sp = url_cmd(
        "sign", "sign an existing checkpoint's manifest",
        "Write URL/step-N/manifest.sig: a signature of the committed manifest.json (unchanged) by --key. Readers configured with the matching "
        "verification key accept it (see docs/format.md, 'Signed manifests'). Without /step-N the latest committed step is signed.",
        cmd_sign, "URL or URL/step-N (default: latest)",
    )
    sp.add_argument("--key", metavar="FILE", required=True, help="signing key: an unencrypted PKCS#8 PEM Ed25519 private key, or a file of at least 32 random bytes (HMAC-SHA256 secret)")
    sp.add_argument("--key-id", help="key id recorded in the signature (default: the key's fingerprint)")
    sp = cs.add_parser("export-hf", help="write the model weights alone in the Hugging Face layout", description="Write the model weights of a checkpoint (sharded tensors reassembled) to DST as model-0000k-of-0000N.safetensors plus model.safetensors.index.json, readable by Hugging Face loaders without this library. Every byte is verified first.")
    sp.add_argument("src", help="URL or URL/step-NNNNNNNNNN (default: latest)")
    sp.add_argument("dst", help="destination folder or URL")
    sp.add_argument("--step", type=parse_step, help="the step (999, step-999 or step-0000000999); default: the latest committed")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest file to write, in GiB (default 5, as Hugging Face)")
    sp.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for SRC, as JSON")
    sp.add_argument("--dst-storage-options", metavar="JSON", help="fsspec storage options for DST, as JSON")
    sp.set_defaults(func=cmd_export_hf)
    sp = cs.add_parser(
        "migrate",
        help="copy checkpoints from one provider to another, verified and resumable",
        description="Stream checkpoint(s) from SRC to DST (any two URLs: s3://, gs://, az://, local, ...) without staging files on local disk. "
        "Every file's size and SHA-256 is checked against SRC's manifest; DST's manifest.json is written last, so DST holds the checkpoint only once "
        "everything arrived. Interrupted (Ctrl-C stops within about a second)? Run the same command again: files already present with the right hash are skipped. "
        "Default: the latest committed step.",
    )
    sp.add_argument("src", help="checkpoint root to copy from, e.g. s3://bucket/run, or one step: s3://bucket/run/step-999")
    sp.add_argument("dst", help="checkpoint root to copy to, e.g. gs://bucket/run")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--step", type=parse_step, help="copy this step only (999, step-999 or step-0000000999)")
    which.add_argument("--all", action="store_true", help="copy every committed step, oldest first")
    sp.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for SRC, as JSON")
    sp.add_argument("--dst-storage-options", metavar="JSON", help="fsspec storage options for DST, as JSON")
    sp.add_argument("--threads", type=int, default=4, help="files copied at once (default 4)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar (bytes and rate, shown when tqdm is installed)")
    sp.add_argument("--verify-key", metavar="FILE", action="append", help="copy only checkpoints signed by this key (repeatable); the signature travels with the checkpoint")
    sp.set_defaults(func=cmd_migrate)
    sp = cs.add_parser(
        "replicate",
        help="bring checkpoints up to the replication policy's copy count",
        description="Read providers and a policy from a JSON file and copy committed checkpoints between providers until each has the policy's "
        "number of copies. Only providers in the policy's allowed regions are ever written to. Config: "
        '{"providers": [{"name": "aws", "uri": "s3://b/run", "region": "eu-west-1", "egress_cost_per_gb": 0.09, "storage_options": {}}], '
        '"policy": {"copies": 2, "allowed_regions": ["eu-*"], "prefer": ["aws"]}}. Default: the newest step committed anywhere.',
    )
    sp.add_argument("--config", required=True, help="JSON file describing providers and the policy (see above)")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--step", type=parse_step, help="replicate this step only (999, step-999 or step-0000000999)")
    which.add_argument("--all", action="store_true", help="replicate every committed step")
    sp.add_argument("--threads", type=int, default=4, help="files copied at once per provider (default 4)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars (shown when tqdm is installed)")
    sp.set_defaults(func=cmd_replicate)
    return p


def _exit_code(exc: BaseException) -> int:
    """The documented exit code of a failure (see the module docstring)."""
    from .storage.retry import classify

    if isinstance(exc, OperationCancelledError):
        return EXIT_INTERRUPTED
    causes = list(getattr(exc, "causes", None) or [])
    for e in [exc, *causes]:
        if isinstance(e, CorruptCheckpointError):
            return EXIT_CHECK_FAILED
        if isinstance(e, (StorePermissionError, PermissionError, ConfigError)):
            return EXIT_USAGE
    if isinstance(exc, (CheckpointNotFoundError, StoreNotFoundError, StoreUnavailableError, FileNotFoundError, ConnectionError, TimeoutError)):
        return EXIT_NOT_FOUND
    if isinstance(exc, ReplicationError) or causes:
        kinds = {classify(c) for c in causes} if causes else set()
        return EXIT_NOT_FOUND if kinds <= {"transient", "not_found"} or "run again" in str(exc) else EXIT_CHECK_FAILED
    kind = classify(exc)
    if kind in ("not_found", "transient"):
        return EXIT_NOT_FOUND
    if kind == "permission":
        return EXIT_USAGE
    return EXIT_USAGE


def _print_error(exc: BaseException) -> None:
    """``error: <one short line>`` then the detail, one item a line."""
    headline = getattr(exc, "summary", None) or str(exc)
    headline, *detail = headline.split("\n")
    if isinstance(exc, ReplicationError) and exc.failures:
        for provider, msg in sorted(exc.failures.items()):
            detail += [f"{provider}: {part}" for part in msg.split("; ") if part]
    if isinstance(exc, StorePermissionError) or (isinstance(exc, PermissionError) and not isinstance(exc, ResilientTrainError)):
        detail.append("access was denied: check the credentials (the provider's usual environment variables or --storage-options)")
    head, _, rest = headline.partition(": ")
    if len(headline) > 120 and "; " in rest:  # "what failed: cause; cause; ..." -> one cause a line
        headline = head
        detail = [part for part in rest.split("; ") if part] + detail
    if not isinstance(exc, ResilientTrainError):
        headline = f"{type(exc).__name__}: {headline}"
    print(f"error: {redact(headline)}", file=sys.stderr)
    for line in detail:
        print(f"  {redact(line)}", file=sys.stderr)


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (``ckpt inspect --json | head -c 10``): the command did
    its work and the reader chose to stop, so exit 0 (not "not found"). stdout is pointed at
    /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def main(argv: Sequence[str] | None = None, *, starting_handler: Any = None) -> int:
    """Run the command line. ``starting_handler``: the SIGINT handler the console script set
    for start-up (:mod:`resilient_train._console`); Ctrl-C raises KeyboardInterrupt again once
    a command runs."""
    try:
        parser = build_parser()
        args = parser.parse_args(_hoist_global_flags(sys.argv[1:] if argv is None else argv))
        from .logs import configure_logging

        configure_logging(args.verbose)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if starting_handler is not None and signal.getsignal(signal.SIGINT) is starting_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        log.debug("resilient-train %s: %s", __version__, " ".join(a for a in (args.command, getattr(args, "ckpt_command", None)) if a))
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return _reader_went_away()
    except (ResilientTrainError, OSError) as exc:
        _print_error(exc)
        return _exit_code(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
