# The shared gRPC fixtures (tests/grpc_fixtures.py), also importable as `conftest`.
from grpc_fixtures import *  # noqa: F403
from grpc_fixtures import collector  # noqa: F401 - the pytest fixture
