"""The wire contract's Python side: generated modules (v1/), codec and status helpers."""

# Bumped whenever the meaning of a field changes; Register refuses any other version.
# 2: MaskSpec carries sweep_rounds and layer_shift, and stride 0 ties a rolling window's
#    step to the layer; RegisterRequest carries the worker's instance secret.
# 3: Assignment no longer carries the client hyperparameters (field 4, reserved: the worker
#    takes them from the config it received at registration); Wait carries a kind.
# 4: a payload's bytes are raw gRPC messages (no protobuf Chunk: AssignmentMessage and
#    UpdateMessage field 2 reserved), followed by a PayloadTrailer with their CRC-32C
#    (PayloadHeader field 5, the zlib CRC-32, reserved); see rabo_proto/stream.py.
PROTOCOL_VERSION = 4
