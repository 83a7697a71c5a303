"""The router and the tokenizer inside the gateway process (``--router embedded``,
``--tokenizer embedded``).

Split services cost a gRPC hop each way per call (serialisation, HTTP/2, a second event loop).
A deployment that does not need to scale them apart can run them in the gateway: the same
``Router`` and ``TokenizerService`` objects the standalone services serve, called through
in-process stubs (``services.common.inprocess``). The gateway code does not change; only the
router's calls to the workers remain gRPC. Several gateway replicas each run their own router:
use ``cache_aware`` with KV events (precise mode) so they reach the same decisions.
"""

from __future__ import annotations

import logging
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
from sglmesh.router.v1 import router_lease_pb2_grpc as lease_grpc
from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc as tok_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.config import parse_config
from services.common.inprocess import LocalStub
from services.gateway.config import EMBEDDED

log = logging.getLogger(__name__)


def router_config(args: str) -> Any:
    """The embedded router's config from ``--router-args`` (and SGLMESH_ROUTER_* env vars); a bad
    flag is argparse's usage error (exit status 2)."""
    from services.router.config import RouterConfig, merge_repeated_flags

    return parse_config(RouterConfig, merge_repeated_flags(shlex.split(args)))


def tokenizer_config(args: str) -> Any:
    """The embedded tokenizer's config from ``--tokenizer-args`` (and SGLMESH_TOKENIZER_*)."""
    from services.tokenizer.config import TokenizerConfig

    return parse_config(TokenizerConfig, shlex.split(args))


def check_flags(router: str, router_args: str, tokenizer: str, tokenizer_args: str) -> None:
    """Parses the embedded services' flags before the gateway starts serving, so a bad one
    stops it with a usage error instead of a failed start-up."""
    if router == EMBEDDED:
        router_config(router_args)
    if tokenizer == EMBEDDED:
        tokenizer_config(tokenizer_args)


@dataclass
class EmbeddedRouter:
    """A Router served to the gateway through in-process stubs."""

    args: str
    router: Any = None
    scheduler: Any = None
    admin: Any = None
    leases: Any = None

    async def start(self) -> None:
        # Imported here: a gateway that talks to a remote router never loads the router.
        from services.router import relay
        from services.router.router import Router
        from services.router.server import RouterAdmin, RouterLeases, SchedulerProxy

        config = router_config(self.args)
        self.router = Router(config)
        self.scheduler = LocalStub(pb_grpc.add_SglangSchedulerServicer_to_server,
                                   SchedulerProxy(self.router), relay.SERVICE)
        self.admin = LocalStub(admin_grpc.add_RouterAdminServiceServicer_to_server,
                               RouterAdmin(self.router), "sglmesh.router.v1.RouterAdminService")
        self.leases = LocalStub(lease_grpc.add_RouterLeaseServiceServicer_to_server,
                                RouterLeases(self.router), "sglmesh.router.v1.RouterLeaseService")
        await self.router.start()
        log.info("embedded router started (policy %s, %d worker urls)", config.policy,
                 len(config.worker_urls))

    async def stop(self) -> None:
        if self.router is not None:
            await self.router.stop()


@dataclass
class EmbeddedTokenizer:
    """A TokenizerService served to the gateway through an in-process stub."""

    args: str
    stub: Any = None
    service: Any = None
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    async def start(self) -> None:
        from services.tokenizer.server import SERVICE_NAME, build_service, load_configured

        config = tokenizer_config(self.args)
        self._executor = ThreadPoolExecutor(max_workers=config.workers,
                                            thread_name_prefix="tokenizer")
        self.service = build_service(config, self._executor)
        self.stub = LocalStub(tok_grpc.add_TokenizerServiceServicer_to_server, self.service,
                              SERVICE_NAME)
        await load_configured(self.service, config)

    async def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
