"""The ``resilient-train`` command line.

Exit codes: 0 success; 1 a check failed (``ckpt verify`` found a bad file); 2 bad usage or an
error that prevented the command (the message says what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from .errors import ResilientTrainError
from .format.names import STATE_NAME, parse_step_dirname, step_dirname
from .storage import open_store, redact

__all__ = ["main", "split_step_url"]

log = logging.getLogger("resilient_train.cli")


def split_step_url(url: str) -> tuple[str, int | None]:
    """``s3://b/run/step-0000000042`` -> (``s3://b/run``, 42); a URL without a step -> (url, None)."""
    trimmed = url.rstrip("/")
    head, _, last = trimmed.rpartition("/")
    step = parse_step_dirname(last)
    if step is not None and head:
        return head, step
    return trimmed or url, None


def _options(args: argparse.Namespace, attr: str = "storage_options") -> dict[str, Any]:
    raw = getattr(args, attr, None)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --{attr.replace('_', '-')} must be a JSON object: {exc}")
    if not isinstance(value, dict):
        raise SystemExit(f"error: --{attr.replace('_', '-')} must be a JSON object")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _resolve_step(store: Any, step: int | None) -> int:
    from .checkpoint import latest_step
    from .errors import CheckpointNotFoundError

    if step is not None:
        return step
    latest = latest_step(store)
    if latest is None:
        raise CheckpointNotFoundError(f"no committed checkpoint under {store.uri}")
    return latest


def cmd_ls(args: argparse.Namespace) -> int:
    from .checkpoint import read_manifest
    from .errors import CheckpointError

    store = open_store(args.url, _options(args))
    rows = []
    for name in store.list(""):
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import read_manifest
    from .checkpoint.reader import _read_json

    root, step = split_step_url(args.url)
    store = open_store(root, _options(args))
    step = _resolve_step(store, step)
    m = read_manifest(store, step)
    shared = _read_json([store], step_dirname(step), m.file(STATE_NAME))
    if args.json:
        print(json.dumps({"manifest": m.to_json(), "state": shared}, indent=1, sort_keys=True))
        return 0
    print(f"checkpoint {store.uri}/{step_dirname(step)}")
    print(f"  format version {m.format_version}, step {m.step}, saved by {m.world_size} rank(s), {len(m.files)} files, {_human(m.total_bytes)}")
    print("  files:")
    for f in m.files:
        print(f"    {f.path:<48} {_human(f.size_bytes):>10}  sha256 {f.sha256[:16]}...")
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
            hp = {k: v for k, v in (groups[0].items() if groups else []) if k != "params"}
            print(f"    optimizer: {len(groups)} param group(s), state for {len(tree.get('state', {}))} parameter(s); group 0: {json.dumps(hp, sort_keys=True)[:200]}")
        else:
            text = json.dumps(tree, sort_keys=True)
            print(f"    {label}: {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .checkpoint import verify_checkpoint

    root, step = split_step_url(args.url)
    store = open_store(root, _options(args))
    step = _resolve_step(store, step)
    manifest, problems = verify_checkpoint(store, step)
    if problems:
        print(f"FAILED: {len(problems)} of {len(manifest.files)} files of {store.uri}/{step_dirname(step)} do not match the manifest:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"OK: {len(manifest.files)} files, {_human(manifest.total_bytes)} of {store.uri}/{step_dirname(step)} match their SHA-256")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .checkpoint.export import export_hf

    root, step = split_step_url(args.src)
    names = export_hf(root, args.dst, step, max_shard_bytes=int(args.max_shard_gb * 1024**3), storage_options=_options(args), dst_storage_options=_options(args, "dst_storage_options"))
    print(f"wrote {len(names)} files to {redact(args.dst)}: {', '.join(names)}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .checkpoint.replicate import migrate
    from .storage.ledger import Ledger

    ledger = Ledger()
    reports = migrate(
        args.src, args.dst, args.step, all_steps=args.all, src_options=_options(args), dst_options=_options(args, "dst_storage_options"),
        io_threads=args.threads, progress=not args.no_progress, ledger=ledger,
    )
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
        for rep in replicate(placement, args.step, all_steps=args.all, io_threads=args.threads, ledger=ledger):
            print(f"step {rep.step}: committed on {', '.join(rep.committed)}")
    finally:
        for line in ledger.lines():
            print(f"ledger: {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resilient-train",
        description="Inspect, verify and move resilient-train checkpoints on any fsspec URL (local paths, s3://, gs://, az://, memory://).",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug; -vvv also the cloud clients, redacted)")
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
    sp.add_argument("--json", action="store_true", help="print the manifest and state as JSON")
    url_cmd("verify", "re-hash every file of a checkpoint", "Re-read every file of a checkpoint and compare its size and SHA-256 with the manifest; safetensors headers are validated too. Exits 1 and names each bad file on any mismatch, 0 when everything matches.", cmd_verify, "URL or URL/step-NNNNNNNNNN (default: latest)")
    sp = cs.add_parser("export-hf", help="write the model weights alone in the Hugging Face layout", description="Write the model weights of a checkpoint (sharded tensors reassembled) to DST as model-0000k-of-0000N.safetensors plus model.safetensors.index.json, readable by Hugging Face loaders without this library. Every byte is verified first.")
    sp.add_argument("src", help="URL or URL/step-NNNNNNNNNN (default: latest)")
    sp.add_argument("dst", help="destination folder or URL")
    sp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest file to write, in GiB (default 5, as Hugging Face)")
    sp.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for SRC, as JSON")
    sp.add_argument("--dst-storage-options", metavar="JSON", help="fsspec storage options for DST, as JSON")
    sp.set_defaults(func=cmd_export_hf)
    sp = cs.add_parser(
        "migrate",
        help="copy checkpoints from one provider to another, verified and resumable",
        description="Stream checkpoint(s) from SRC to DST (any two URLs: s3://, gs://, az://, local, ...) without staging files on local disk. "
        "Every file's size and SHA-256 is checked against SRC's manifest; DST's manifest.json is written last, so DST holds the checkpoint only once "
        "everything arrived. Interrupted? Run the same command again: files already present with the right hash are skipped. "
        "Default: the latest committed step.",
    )
    sp.add_argument("src", help="checkpoint root to copy from, e.g. s3://bucket/run")
    sp.add_argument("dst", help="checkpoint root to copy to, e.g. gs://bucket/run")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="copy this step only")
    which.add_argument("--all", action="store_true", help="copy every committed step, oldest first")
    sp.add_argument("--storage-options", metavar="JSON", help="fsspec storage options for SRC, as JSON")
    sp.add_argument("--dst-storage-options", metavar="JSON", help="fsspec storage options for DST, as JSON")
    sp.add_argument("--threads", type=int, default=4, help="files copied at once (default 4)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar (bytes and rate, shown when tqdm is installed)")
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
    which.add_argument("--step", type=int, help="replicate this step only")
    which.add_argument("--all", action="store_true", help="replicate every committed step")
    sp.add_argument("--threads", type=int, default=4, help="files copied at once per provider (default 4)")
    sp.set_defaults(func=cmd_replicate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import configure_logging

    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ResilientTrainError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
