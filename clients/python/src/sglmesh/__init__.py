"""sglmesh client: generated protobuf/gRPC stubs (``sglmesh.<service>.v1``) and thin async clients."""
