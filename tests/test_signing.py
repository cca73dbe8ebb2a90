"""Signed manifests: exact bytes of manifest.sig, sign / verify / refuse, rotation, the CLI,
migration across the emulators, and keys that never reach a log line."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging

import pytest

from resilient_train import load
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint.replicate import migrate
from resilient_train.checkpoint.discovery import sign_checkpoint
from resilient_train.checkpoint import SaveOptions, save
from resilient_train.cli import main as cli
from resilient_train.errors import SignatureError
from resilient_train.format import MANIFEST_NAME, step_dirname

from .test_integrity_load import set_digests
from resilient_train.format.signing import SIGNATURE_NAME, KeyRing, SigningKey, load_signing_key, load_verify_keys
from resilient_train.storage import LocalStore

from .conftest import assert_same_tensors, make_train_state, state_tensors

pytestmark = pytest.mark.timeout(180)

SECRET = bytes(range(32))
ED_PRIV = bytes(range(100, 132))


def test_signature_file_exact_bytes():
    """Pins the signature format: canonical JSON {alg, key_id, sig}; the message is the domain
    line + the manifest's bytes; HMAC-SHA256 and Ed25519 (both deterministic)."""
    manifest = b'{\n "format": "x"\n}\n'
    message = b"resilient-train manifest signature v1\n" + manifest
    mac = hmac.new(SECRET, message, hashlib.sha256).digest()
    got = SigningKey.hmac_sha256(SECRET, key_id="k1").sign(manifest)
    assert got == (b'{\n "alg": "hmac-sha256",\n "key_id": "k1",\n "sig": "' + base64.b64encode(mac) + b'"\n}\n')

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ed = SigningKey.ed25519(ED_PRIV)
    sig = Ed25519PrivateKey.from_private_bytes(ED_PRIV).sign(message)
    pub = Ed25519PrivateKey.from_private_bytes(ED_PRIV).public_key().public_bytes_raw()
    assert ed.key_id == "ed25519:" + hashlib.sha256(pub).hexdigest()[:16]
    assert ed.sign(manifest) == (b'{\n "alg": "ed25519",\n "key_id": "' + ed.key_id.encode() + b'",\n "sig": "' + base64.b64encode(sig) + b'"\n}\n')
    assert KeyRing([ed]).verify(manifest, ed.sign(manifest)) == ed.key_id


def _write_keys(tmp_path):
    ed = SigningKey.generate_ed25519()
    (tmp_path / "priv.pem").write_bytes(ed.private_pem())
    (tmp_path / "pub.pem").write_bytes(ed.public_pem())
    (tmp_path / "secret.bin").write_bytes(SECRET)
    return ed


def test_sign_verify_refuse_and_rotate(tmp_path):
    ed = _write_keys(tmp_path)
    old = SigningKey.hmac_sha256(SECRET)
    assert load_signing_key(str(tmp_path / "priv.pem")).key_id == ed.key_id
    assert load_verify_keys([str(tmp_path / "pub.pem"), str(tmp_path / "secret.bin")]).key_ids == sorted([ed.key_id, old.key_id])
    root = str(tmp_path / "ck")
    state = make_train_state()
    want = state_tensors(state)
    save(root, state, 1, options=SaveOptions(signing_key=old))
    save(root, state, 2, options=SaveOptions(signing_key=ed))
    save(root, state, 3)  # unsigned
    pub = str(tmp_path / "pub.pem")

    fresh = make_train_state(seed=5)
    assert load(root, fresh, 2, verify_keys=pub).step == 2
    assert_same_tensors(state_tensors(fresh), want)
    with pytest.raises(SignatureError, match="not signed"):
        load(root, make_train_state(seed=5), 3, verify_keys=pub)
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        load(root, make_train_state(seed=5), 1, verify_keys=pub)  # signed by the other (rotated out) key
    both = [pub, str(tmp_path / "secret.bin")]
    assert load(root, make_train_state(seed=5), 1, verify_keys=both).step == 1  # rotation: both trusted

    # A consistent edit: the manifest changed (a file's hash re-pointed), signature kept.
    store = LocalStore(root)
    mpath = f"{step_dirname(2)}/{MANIFEST_NAME}"
    m = json.loads(store.read_bytes(mpath))
    set_digests(m, m["files"][0], b"\0" * m["files"][0]["size_bytes"])  # other bytes, consistent with itself: only the signature can tell
    (tmp_path / "ck" / step_dirname(2) / MANIFEST_NAME).write_bytes(json.dumps(m, sort_keys=True, indent=1).encode() + b"\n")
    with pytest.raises(SignatureError, match="does not match the manifest"):
        load(root, make_train_state(seed=5), 2, verify_keys=pub)

    # Newest is unsigned, step 2 is modified: the manager falls back to the newest verifiable (1)
    # and uncommits the two it skipped (their manifests are kept aside).
    mgr = CheckpointManager(root, every_n_steps=1, verify_keys=both)
    res = mgr.restore(make_train_state(seed=5))
    assert res is not None and res.step == 1 and [s for s, _ in mgr.skipped] == [3, 2]
    assert mgr.latest_step() == 1 and mgr.steps() == [1]
    assert store.exists(f"{step_dirname(3)}/rejected-manifest.json")

    # `ckpt sign` signs an unsigned checkpoint in place; the manifest itself is unchanged.
    save(root, state, 4)
    before = store.read_bytes(f"{step_dirname(4)}/{MANIFEST_NAME}")
    with pytest.raises(SignatureError):
        load(root, make_train_state(seed=5), 4, verify_keys=pub)
    assert cli(["ckpt", "sign", f"{root}/{step_dirname(4)}", "--key", str(tmp_path / "priv.pem")]) == 0
    assert store.read_bytes(f"{step_dirname(4)}/{MANIFEST_NAME}") == before
    assert load(root, make_train_state(seed=5), verify_keys=pub).step == 4


def test_cli_verify_names_the_file_at_fault(tmp_path, capsys):
    ed = _write_keys(tmp_path)
    root = tmp_path / "ck"
    state = make_train_state()
    save(str(root), state, 4, options=SaveOptions(signing_key=ed, max_file_bytes=8192))
    save(str(root), state, 5)
    url4 = f"{root}/{step_dirname(4)}"
    assert cli(["ckpt", "verify", url4, "--verify-key", str(tmp_path / "pub.pem")]) == 0
    assert f"signed by key {ed.key_id}" in capsys.readouterr().out
    assert cli(["ckpt", "verify", str(root), "--verify-key", str(tmp_path / "pub.pem")]) == 1  # latest (5) is unsigned
    assert "manifest.json: SignatureError" in capsys.readouterr().err
    assert cli(["ckpt", "verify", url4, "--verify-key", str(tmp_path / "secret.bin")]) == 1  # untrusted signer

    # Manifest-only damage, hashes untouched: a renamed tensor key and a changed world size.
    mfile = root / step_dirname(5) / MANIFEST_NAME
    m = json.loads(mfile.read_bytes())
    m["tensors"][0]["key"] = m["tensors"][0]["key"] + "_renamed"
    m["world"]["world_size"] = 2
    mfile.write_bytes(json.dumps(m, sort_keys=True, indent=1).encode() + b"\n")
    assert cli(["ckpt", "verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert "manifest.json: tensor key" in err and "rank-00001.json is not listed" in err
    assert "safetensors:" not in err  # no data file is blamed

    # The manifest lies about a dtype: the shard's bytes match their SHA-256, so the manifest is blamed.
    mfile4 = root / step_dirname(4) / MANIFEST_NAME
    m = json.loads(mfile4.read_bytes())
    t = next(t for t in m["tensors"] if t["dtype"] == "F32")
    t["dtype"] = "I32"
    mfile4.write_bytes(json.dumps(m, sort_keys=True, indent=1).encode() + b"\n")
    assert cli(["ckpt", "verify", url4]) == 1
    err = capsys.readouterr().err
    out = err.splitlines()
    lines = [ln.strip() for ln in out[[i for i, ln in enumerate(out) if ln.startswith("FAILED")][0] + 1:]]  # after the INFO line
    assert lines and all(ln.startswith("manifest.json:") for ln in lines), err
    # A flipped byte in a data file: that file is blamed, not the manifest.
    shard = sorted((root / step_dirname(5)).glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    m = json.loads(mfile.read_bytes())
    m["tensors"][0]["key"] = m["tensors"][0]["key"].removesuffix("_renamed")
    m["world"]["world_size"] = 1
    mfile.write_bytes(json.dumps(m, sort_keys=True, indent=1).encode() + b"\n")
    assert cli(["ckpt", "verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"{shard.name}: HashMismatchError" in err and "manifest.json:" not in err


def test_key_material_never_logged(tmp_path, caplog, capsys):
    ed = _write_keys(tmp_path)
    hm = SigningKey.hmac_sha256(SECRET)
    forms = set()
    for k in (ed, hm):
        raw = k._secret
        forms |= {raw.hex(), base64.b64encode(raw).decode(), repr(raw)[2:-1]}
    forms |= {line for line in ed.private_pem().decode().splitlines() if not line.startswith("-----")}
    root = str(tmp_path / "ck")
    state = make_train_state()
    with caplog.at_level(logging.DEBUG, logger="resilient_train"):
        CheckpointManager(root, every_n_steps=1, options=SaveOptions(signing_key=ed)).save(1, state)
        save(root, state, 2, options=SaveOptions(signing_key=hm))
        load(root, make_train_state(seed=3), 1, verify_keys=ed)
        with pytest.raises(SignatureError) as exc:
            load(root, make_train_state(seed=3), 2, verify_keys=ed)
        sign_checkpoint(root, 2, ed)
        cli(["-vv", "ckpt", "verify", root, "--verify-key", str(tmp_path / "priv.pem")])
        cli(["-vv", "ckpt", "sign", root, "--key", str(tmp_path / "secret.bin")])
        cli(["-vv", "ckpt", "verify", root, "--verify-key", str(tmp_path / "pub.pem")])
    out = capsys.readouterr()
    texts = [r.getMessage() for r in caplog.records] + [str(exc.value), out.out, out.err]
    texts += [repr(ed), repr(hm), repr(ed.verify_key()), repr(SaveOptions(signing_key=ed)), repr(KeyRing([ed, hm]))]
    from resilient_train.trainer import TrainerConfig

    texts.append(repr(TrainerConfig(checkpoint=root, signing_key=ed, verify_keys=[ed, hm])))
    assert any("signature by key" in r.getMessage() for r in caplog.records)  # DEBUG lines were captured
    for text in texts:
        for f in forms:
            assert f not in text, "key material leaked"
    for name in ("manifest.json", "manifest.sig", "state.json"):
        data = (tmp_path / "ck" / step_dirname(1) / name).read_text()
        assert not any(f in data for f in forms)


@pytest.mark.slow
def test_signed_checkpoint_migrated_s3_azure_gcs_local_still_verifies(make_store, tmp_path):
    ed = SigningKey.generate_ed25519()
    pub = ed.verify_key()
    s3, az, gcs = make_store("s3"), make_store("azure"), make_store("gcs")
    local = LocalStore(str(tmp_path / "final"), name="local")
    state = make_train_state()
    want = state_tensors(state)
    save(s3, state, 7, options=SaveOptions(signing_key=ed, max_file_bytes=8192))
    save(s3, state, 8)  # unsigned: never copied when verification keys are given
    assert [r.step for r in migrate(s3, az, progress=False, verify_keys=pub)] == [7]
    with pytest.raises(SignatureError):
        migrate(s3, az, 8, progress=False, verify_keys=pub)
    migrate(az, gcs, progress=False, verify_keys=pub)
    migrate(gcs, local, progress=False, verify_keys=pub)
    sig = s3.read_bytes(f"{step_dirname(7)}/{SIGNATURE_NAME}")
    assert local.read_bytes(f"{step_dirname(7)}/{SIGNATURE_NAME}") == sig
    fresh = make_train_state(seed=9)
    assert load(local, fresh, verify_keys=pub).step == 7
    assert_same_tensors(state_tensors(fresh), want)
    assert cli(["ckpt", "verify", str(tmp_path / "final"), "--verify-key", _pub_file(tmp_path, ed)]) == 0


def _pub_file(tmp_path, key: SigningKey) -> str:
    p = tmp_path / "pub-mig.pem"
    p.write_bytes(key.public_pem())
    return str(p)


def test_wrap_signs_and_resumes_only_from_signed_checkpoints(tmp_path):
    import torch

    import resilient_train as rt

    key = SigningKey.hmac_sha256(SECRET)
    ck = tmp_path / "ck"

    def run(steps: int, **kw):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = rt.wrap(model, opt, checkpoint=str(ck), every_n_steps=5, async_save=False, event_log=str(tmp_path / "ev.jsonl"), **kw)
        while trainer.step_count < steps:
            model(torch.ones(3, 4)).sum().backward()
            trainer.step()
            opt.zero_grad()
        trainer.close()
        return trainer

    run(5, signing_key=key, verify_keys=key)
    assert (ck / step_dirname(5) / SIGNATURE_NAME).exists()
    forged = run(10)  # a writer without the key: resumes 5 (no verification) and saves an unsigned step 10
    assert forged.resumed_from == 5 and not (ck / step_dirname(10) / SIGNATURE_NAME).exists()
    third = run(12, signing_key=key, verify_keys=key)
    assert third.resumed_from == 5
    ev = [json.loads(line) for line in open(tmp_path / "ev.jsonl")]
    fb = [e for e in ev if e["event"] == "resume_fallback"]
    assert [e["step"] for e in fb] == [10] and "SignatureError" in fb[0]["reason"]
    assert (ck / step_dirname(10) / SIGNATURE_NAME).exists()  # step 10 was saved again, signed


def test_retention_counts_only_trusted_checkpoints(tmp_path):
    """With verify_keys, unsigned (forged) newer steps are not checkpoints for retention: they
    do not push the trusted ones out of keep_last (without keys, they would)."""
    root = str(tmp_path / "ck")
    state = make_train_state()
    ed = SigningKey.generate_ed25519()
    for step in (1, 2):
        save(root, state, step, options=SaveOptions(signing_key=ed))
    for step in (3, 4, 5):  # written by someone without the key
        save(root, state, step)
    store = LocalStore(root)
    removed = CheckpointManager(root, every_n_steps=1, keep_last=2, verify_keys=ed.verify_key()).apply_retention()
    assert removed == []  # both trusted steps kept; the forged ones are above the newest trusted: left alone
    assert {1, 2} <= {int(n.split("-")[1]) for n in store.list("") if n.startswith("step-")}
    # the same folder without keys: the unsigned newer steps count, and push 1 and 2 out
    assert CheckpointManager(root, every_n_steps=1, keep_last=2).apply_retention() == [1, 2, 3]


def test_malformed_signature_files_and_short_secrets_are_refused():
    """docs/format.md, Signed manifests: a signature file over 4 KiB, with other keys, duplicate
    keys or bad base64 is refused; an HMAC secret is at least 32 bytes; the default HMAC key id."""
    from resilient_train.errors import ConfigError

    key = SigningKey.hmac_sha256(SECRET)
    ring = KeyRing([key])
    manifest = b'{\n "format": "x"\n}\n'
    good = key.sign(manifest)
    assert ring.verify(manifest, good) == key.key_id
    assert key.key_id == "hmac:" + hmac.new(SECRET, b"resilient-train key id", hashlib.sha256).hexdigest()[:16]
    body = json.loads(good)
    bad = {
        "over 4 KiB": good[:-2] + b" " * 4096 + b"}\n",
        "other keys": json.dumps(dict(body, extra=1)).encode(),
        "duplicate keys": good[:-2] + b', "sig": ' + json.dumps(body["sig"]).encode() + b"}\n",
        "bad base64": json.dumps(dict(body, sig="not*base64!")).encode(),
    }
    for what, sig in bad.items():
        with pytest.raises(SignatureError):
            ring.verify(manifest, sig)
            pytest.fail(f"a signature file with {what} was accepted")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        SigningKey.hmac_sha256(SECRET[:31])


def test_hmac_signature_under_an_ed25519_key_id_keyed_with_the_public_key_is_refused(tmp_path):
    """Algorithm confusion: the public key is no secret. A ``manifest.sig`` that claims
    ``hmac-sha256`` under the trusted Ed25519 key's id, with an HMAC keyed by that public key,
    over a forged manifest, must be refused (by load, the manager and ``ckpt verify``); the
    verifier uses the trusted key's algorithm, never the one the file claims."""
    from resilient_train.format.signing import SIGNATURE_DOMAIN

    ed = _write_keys(tmp_path)
    root = str(tmp_path / "ck")
    state = make_train_state()
    save(root, state, 1, options=SaveOptions(signing_key=ed))
    pub = str(tmp_path / "pub.pem")
    public = ed.verify_key()._material  # the raw Ed25519 public key: anyone can read it
    assert len(public) == 32
    folder = tmp_path / "ck" / step_dirname(1)
    manifest = (folder / MANIFEST_NAME).read_bytes()
    forged = manifest  # the attacker could MAC any bytes; the real ones keep the rest of the checks quiet
    mac = hmac.new(public, SIGNATURE_DOMAIN + forged, hashlib.sha256).digest()
    sig = json.dumps({"alg": "hmac-sha256", "key_id": ed.key_id, "sig": base64.b64encode(mac).decode()}).encode()
    (folder / SIGNATURE_NAME).write_bytes(sig)
    ring = load_verify_keys([pub])
    with pytest.raises(SignatureError):
        ring.verify(forged, sig)
    with pytest.raises(SignatureError):
        load(root, make_train_state(seed=5), 1, verify_keys=pub)
    assert cli(["ckpt", "verify", root, "--step", "1", "--verify-key", pub]) != 0


def test_retention_run_by_wraps_background_worker_counts_only_trusted_checkpoints(tmp_path):
    """The retention users run is the one ``wrap``'s background worker runs after each commit:
    with ``verify_keys``, unsigned steps written into the folder mid-run (newer than every
    trusted one) must not push the trusted checkpoints out of ``keep_last``."""
    import torch

    import resilient_train as rt
    from resilient_train import TrainerConfig

    root = str(tmp_path / "ck")
    ed = SigningKey.generate_ed25519()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = rt.wrap(model, opt, TrainerConfig(checkpoint=root, every_n_steps=1, keep_last=2, signing_key=ed, verify_keys=ed.verify_key()))

    def step() -> None:
        model(torch.randn(2, 8)).sum().backward()
        trainer.step()
        opt.zero_grad()

    step()  # step 1, signed
    for forged in (100, 101, 102):  # written by someone without the key, after the resume
        save(root, make_train_state(), forged)
    for _ in range(3):
        step()  # steps 2..4, each commit followed by retention in the background
    trainer.close()
    steps = sorted(int(n.split("-")[1]) for n in LocalStore(root).list("") if n.startswith("step-"))
    assert {3, 4} <= set(steps), steps  # the two newest trusted checkpoints survive
    assert not {1, 2} & set(steps), steps  # and retention did run on the trusted ones


def test_background_retention_counts_only_trusted_checkpoints(tmp_path):
    """The asynchronous checkpointer's worker runs the same retention as CheckpointManager
    (checkpoint/retention.py), verify_keys included: an unsigned newer step does not push a
    trusted one out of keep_last there either."""
    from resilient_train.checkpoint.async_save import AsyncCheckpointer

    root = str(tmp_path / "ck")
    state = make_train_state()
    ed = SigningKey.generate_ed25519()
    for step in (1, 2):
        save(root, state, step, options=SaveOptions(signing_key=ed))
    for step in (3, 4, 5):  # written by someone without the key
        save(root, state, step)
    events = []
    ck = AsyncCheckpointer(root, keep_last=2, verify_keys=ed.verify_key(), options=SaveOptions(signing_key=ed), on_event=lambda e, **f: events.append((e, f)))
    assert ck.save(6, state)
    ck.close()
    kept = sorted(int(n.split("-")[1]) for n in LocalStore(root).list("") if n.startswith("step-"))
    # trusted: 1, 2, 6 -> keep 2 and 6; the unsigned 3..5 are leftovers below the newest trusted one
    assert kept == [2, 6]
    assert [f["removed"] for e, f in events if e == "retention"] == [[1, 3, 4, 5]]


def test_key_configuration_errors_say_what_to_fix():
    """Every refused key configuration raises ConfigError with the fix in its message (house
    rule; found by ``make mutate``: the messages could be emptied and no test noticed)."""
    from resilient_train.errors import ConfigError
    from resilient_train.format.signing import as_keyring

    for bad in ("x" * 129, "a\nb", 7):
        with pytest.raises(ConfigError, match="a key id must be a printable string of 1 to 128 characters"):
            SigningKey.hmac_sha256(SECRET, key_id=bad)
    with pytest.raises(ConfigError, match="a key id must be a printable string of 1 to 128 characters"):
        SigningKey("", "hmac-sha256", SECRET)  # the factories put the fingerprint in place of ""
    assert SigningKey.hmac_sha256(SECRET, key_id="k" * 128).key_id == "k" * 128
    with pytest.raises(ConfigError, match="must be a KeyRing, a key, a key file path or a list of them, got int"):
        as_keyring(42)
    with pytest.raises(ConfigError, match="^a KeyRing needs at least one verification key$"):
        KeyRing([])
    hm = SigningKey.hmac_sha256(SECRET)
    with pytest.raises(ConfigError, match="^only an Ed25519 key has a PEM form; an HMAC secret is stored as its raw bytes$"):
        hm.private_pem()
    with pytest.raises(ConfigError, match="^an HMAC secret has no public half: verifiers need the secret itself$"):
        hm.public_pem()


def test_a_key_listed_twice_is_one_key_and_two_keys_under_one_id_are_refused(tmp_path):
    """A key ring may list the same key twice (a rotation config that names one file twice, or
    a signing key and its own verify key): it is one trusted key. Two different keys under one
    key id are refused at construction, whatever their algorithms: a ring that kept either one
    would trust signatures the operator did not mean to trust (found by ``make mutate``)."""
    from resilient_train.errors import ConfigError

    manifest = b'{\n "format": "x"\n}\n'
    k = SigningKey.hmac_sha256(SECRET, key_id="k")
    ring = KeyRing([k, k.verify_key(), k])
    assert ring.key_ids == ["k"] and ring.verify(manifest, k.sign(manifest)) == "k"
    (tmp_path / "secret.bin").write_bytes(SECRET)
    assert load_verify_keys([str(tmp_path / "secret.bin")] * 2).key_ids == [SigningKey.hmac_sha256(SECRET).key_id]
    other_secret = SigningKey.hmac_sha256(bytes(range(1, 33)), key_id="k")
    with pytest.raises(ConfigError, match="two different verification keys share the key id 'k'"):
        KeyRing([k, other_secret])
    ed = SigningKey.ed25519(ED_PRIV, key_id="k")
    with pytest.raises(ConfigError, match="two different verification keys share the key id 'k'"):
        KeyRing([k, ed])
    # the same 32 bytes as an Ed25519 public key and as an HMAC secret are two keys: a ring that
    # let the HMAC one stand beside (or replace) the public key would verify MACs anyone can make
    confused = SigningKey.hmac_sha256(ed.verify_key()._material, key_id="k")
    for keys in ([ed, confused], [confused, ed]):
        with pytest.raises(ConfigError, match="two different verification keys share the key id 'k'"):
            KeyRing(keys)
