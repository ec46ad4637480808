#!/bin/sh
# Regenerate the Python stubs for the CRI protos:
#   runtime/api/proto/v1alpha2/api.proto -> runtime/api/gen/v1alpha2/api_pb2{.py,.pyi,_grpc.py}
#   runtime/api/proto/v1/api.proto       -> runtime/api/gen/v1/api_pb2{.py,.pyi,_grpc.py}
#
# The generated files are committed: building the .deb does not need protoc.
#
# Generator: Debian 12's protoc 3.21.12 (package protobuf-compiler) with
# Debian 12's gRPC 1.51.1 Python plugin (package protobuf-compiler-grpc,
# /usr/bin/grpc_python_plugin), i.e. the same protoc/gRPC generation that
# PyPI grpcio-tools 1.51 bundles.
# Why not something else:
#  - stubs from a current grpcio-tools need a protobuf runtime newer than
#    Debian 12's python3-protobuf (4.21.12) and fail to import there;
#  - Debian 12's python3-grpc-tools is 1.14.1 (protoc 3.5.1): its old-style
#    stubs import on Debian's protobuf but fail on current PyPI protobuf
#    ("Descriptors cannot be created directly");
#  - stubs from protoc 3.21 / gRPC 1.51 import on both.
# Install with: apt-get install protobuf-compiler protobuf-compiler-grpc
# (PROTOC and GRPC_PYTHON_PLUGIN override the paths.)
#
# protoc runs with -I runtime/api/proto, so the descriptor file names are
# "v1alpha2/api.proto" and "v1/api.proto": unique within one process, which is
# what lets both packages be loaded side by side.
set -eu

PROTOC=${PROTOC:-/usr/bin/protoc}
GRPC_PYTHON_PLUGIN=${GRPC_PYTHON_PLUGIN:-/usr/bin/grpc_python_plugin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ ! -x "$PROTOC" ] || [ ! -x "$GRPC_PYTHON_PLUGIN" ]; then
    echo "gen_proto.sh: need $PROTOC and $GRPC_PYTHON_PLUGIN;" \
         "run: apt-get install protobuf-compiler protobuf-compiler-grpc" >&2
    exit 1
fi
case "$("$PROTOC" --version)" in
    "libprotoc 3.21."*) ;;
    *) echo "gen_proto.sh: warning: expected libprotoc 3.21.x (Debian 12)," \
            "got '$("$PROTOC" --version)'; the stubs may not import on Debian 12" >&2 ;;
esac

for ver in v1alpha2 v1; do
    out=runtime/api/gen/$ver
    mkdir -p "$out"
    [ -f "$out/__init__.py" ] || : > "$out/__init__.py"

    tmp=$(mktemp -d)
    "$PROTOC" -I runtime/api/proto \
        --plugin=protoc-gen-grpc_python="$GRPC_PYTHON_PLUGIN" \
        --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
        "$ver/api.proto"

    # The grpc module imports its messages absolutely
    # ("from v1alpha2 import api_pb2 as v1alpha2_dot_api__pb2"): make that
    # relative so it works inside the arktos_vm_runtime.api.gen package.
    sed -i -E "s/^from $ver import api_pb2 as /from . import api_pb2 as /" \
        "$tmp/$ver/api_pb2_grpc.py"
    # The message classes get __module__ "$ver.api_pb2" (a module that does
    # not exist, which breaks pickling and reprs); use the real module name.
    sed -i -E "s/^_builder.BuildTopDescriptorsAndMessages\(DESCRIPTOR, '$ver\.api_pb2', globals\(\)\)/_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, globals())/" \
        "$tmp/$ver/api_pb2.py"
    if grep -q -E "^(from|import) $ver([. ]|\$)" "$tmp/$ver"/api_pb2*; then
        echo "gen_proto.sh: absolute import of $ver left in the generated files" >&2
        exit 1
    fi

    rm -f "$out/api_pb2.py" "$out/api_pb2.pyi" "$out/api_pb2_grpc.py"
    cp "$tmp/$ver/api_pb2.py" "$tmp/$ver/api_pb2.pyi" "$tmp/$ver/api_pb2_grpc.py" "$out/"
    rm -rf "$tmp"
    echo "generated $out/api_pb2.py $out/api_pb2.pyi $out/api_pb2_grpc.py"
done
