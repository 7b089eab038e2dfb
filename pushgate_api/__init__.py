"""Generated gRPC/protobuf code for protos/*.proto.

Everything else in this package is produced by `make proto` (grpcio-tools) and is
never edited by hand; the .proto files in protos/ are the source of truth.
"""
