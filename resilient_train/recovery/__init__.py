"""Recovery when a provider drops out: survivors roll back to the last committed checkpoint
(read from the providers that still hold a verified copy) and carry on; joiners get the live
state from a peer."""

from .elastic import ElasticGroup

__all__ = ["ElasticGroup"]
