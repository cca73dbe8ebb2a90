"""Provider-level fault tolerance: what :func:`resilient_train.wrap` runs on when several
providers (one replica group each, one torchrun each) train together. A group that dies
mid-round is voted out and the round is redone among the survivors; a group that comes back
takes the live state from a peer. See :mod:`.provider_group` and docs/membership.md."""

from .provider_group import DiLoCoGlobalState, ProviderGroup, open_membership_store

__all__ = ["ProviderGroup", "DiLoCoGlobalState", "open_membership_store"]
