"""In-process elastic membership across replica groups (see docs/membership.md).

* :mod:`.decision`: the pure decision (heartbeats and the clock in; view, epoch, reason out).
* :mod:`.kvstore`: the four-call KV protocol, over torch's TCPStore by default (pluggable).
* :mod:`.etcd`: :class:`EtcdKVStore`, the protocol over an etcd v3 cluster (failover across members).
* :mod:`.urls`: :func:`open_kvstore`, ``tcp://``, ``etcd://`` and ``memory://`` store URLs.
* :mod:`.service`: :class:`Membership`, heartbeats, the coordinator, one gloo group per epoch.
* :mod:`.transfer`: :func:`sync_state`, chunked state transfer to joiners, checkpoint fallback.
"""

from __future__ import annotations

from .decision import Decision, Heartbeat, View, coordinator, decide
from .fingerprint import model_fingerprint
from .etcd import EtcdKVStore
from .kvstore import KVStore, KVTorchStore, MemoryKVStore, TCPKVStore, torch_store_for
from .service import Membership
from .transfer import DEFAULT_CHUNK_BYTES, SyncResult, state_digest, sync_state
from .urls import open_kvstore

__all__ = ["Decision", "Heartbeat", "View", "coordinator", "decide", "model_fingerprint", "KVStore",
           "KVTorchStore", "MemoryKVStore", "TCPKVStore", "EtcdKVStore", "open_kvstore", "torch_store_for",
           "Membership", "sync_state", "SyncResult", "state_digest", "DEFAULT_CHUNK_BYTES"]
