"""Request/reply: services by name over ROUTER/ROUTER, with retries, failover, heartbeats and
a reply cache so a retried request is never executed twice (zguide Pirate + Freelance)."""


from patterns.reqrep.aio import AsyncClient
from patterns.reqrep.call import CallConfig
from patterns.reqrep.client import Client, ClientConfig, ClientStats
from patterns.reqrep.durable import DurableClient
from patterns.reqrep.errors import (
    NoResponders,
    OutcomeUnknown,
    RemoteError,
    ReplyNotCached,
    RequestIdReused,
    RequestTimeout,
    ServiceBusy,
)
from patterns.reqrep.retry import Backoff
from patterns.reqrep.service import Incoming, Service, ServiceConfig, ServiceStats

__all__ = [
    "AsyncClient",

    "Backoff",
    "CallConfig",
    "Client",
    "ClientConfig",
    "ClientStats",
    "DurableClient",
    "Incoming",
    "NoResponders",
    "OutcomeUnknown",
    "RemoteError",
    "ReplyNotCached",
    "RequestIdReused",
    "RequestTimeout",
    "Service",
    "ServiceBusy",
    "ServiceConfig",
    "ServiceStats",
]
