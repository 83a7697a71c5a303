"""``python -m services.router --worker-urls grpc://127.0.0.1:30000 --policy round_robin``."""

from __future__ import annotations

from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
from sglmesh.router.v1 import router_lease_pb2_grpc as lease_grpc

from services.common.grpc_server import GrpcServer, wait_for_shutdown
from services.common.service import main_for
from services.router import relay
from services.router.config import RouterConfig, merge_repeated_flags
from services.router.router import Router
from services.router.server import RouterAdmin, RouterLeases, SchedulerProxy


async def serve(config: RouterConfig) -> None:
    router = Router(config)
    server = GrpcServer(config)
    server.add_service(relay.add_scheduler_to_server, SchedulerProxy(router), relay.SERVICE)
    server.add_service(admin_grpc.add_RouterAdminServiceServicer_to_server, RouterAdmin(router),
                       "sglmesh.router.v1.RouterAdminService")
    server.add_service(lease_grpc.add_RouterLeaseServiceServicer_to_server, RouterLeases(router),
                       "sglmesh.router.v1.RouterLeaseService")
    await server.start()
    await router.start()
    await server.set_serving(True)
    try:
        await wait_for_shutdown()
    finally:
        await server.stop()
        await router.stop()


def main() -> None:
    import sys

    main_for(RouterConfig, serve, merge_repeated_flags(sys.argv[1:]))


if __name__ == "__main__":
    main()
