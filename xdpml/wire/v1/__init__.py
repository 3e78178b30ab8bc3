"""Generated protobuf and gRPC modules for the xdpml v1 wire schema.

Do not edit the ``*_pb2*.py`` files: run ``scripts/gen-proto.sh`` after changing
``proto/xdpml/wire/v1/*.proto`` and commit both.
"""
