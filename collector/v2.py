"""Score with a remote V2 / Open Inference Protocol model server over gRPC.

Each feature column is forwarded as its own input tensor, shape [rows], in
``raw_input_contents`` exactly as it arrived from the agent (same bytes, same
little-endian layout), so nothing is re-encoded on the way. The request carries the
parameter ``content_type=pd``: MLServer then assembles the inputs into a DataFrame
whose column names are the feature names; other servers ignore the parameter and see
one tensor per input, named after the feature.

Large batches are split into requests under 4 MiB (the servers' default limit) and
sent concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np
from xdpml.collector.models import ModelError, Scores

from xdpml.wire.columns import ColumnBatch
from xdpml.wire.v1 import open_inference_pb2 as ipb
from xdpml.wire.v1 import open_inference_pb2_grpc as igrpc

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024

_TO_V2 = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}
_FROM_V2 = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
# Which InferTensorContents field carries each datatype when a server does not answer raw.
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _rpc_error(addr: str, what: str, e: grpc.RpcError) -> ModelError:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ModelError(f"model server {addr} is unreachable ({e.details()}); is it running and listening for gRPC?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ModelError(
            f"model server {addr} unreachable or not answering: no {what} reply in time; "
            "is it running, and is the timeout (?timeout=SECONDS) long enough?"
        )
    return ModelError(f"model server {addr}: {what} failed: {code.name}: {e.details()}")


class V2Model:
    """A model served by an Open Inference Protocol server, e.g. ``v2:127.0.0.1:8081/flows``.

    ``features``: the input (column) names to send; default: the inputs the server's
    model metadata lists. ``output``: which output to read and request (MLServer
    scikit-learn: ``predict`` or ``predict_proba``); default: the server's first output.
    A 2-D output [rows, k] scores with its last column (class 1 of a binary classifier).
    """

    default_threshold = 0.5

    def __init__(
        self,
        addr: str,
        model: str,
        *,
        version: str = "",
        output: str = "",
        features: Sequence[str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.addr, self.name, self.model_version, self.output = addr, model, version, output
        self.timeout_s = timeout_s
        opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.enable_retries", 0)]
        self._channel = grpc.insecure_channel(addr, options=opts)
        self._stub = igrpc.GRPCInferenceServiceStub(self._channel)
        try:
            ready = self._stub.ModelReady(
                ipb.ModelReadyRequest(name=model, version=version), timeout=timeout_s, wait_for_ready=True
            )
            if not ready.ready:
                raise ModelError(f"model {model!r} is not ready on {addr} (not loaded, or still loading)")
            meta = self._stub.ModelMetadata(ipb.ModelMetadataRequest(name=model, version=version), timeout=timeout_s)
        except grpc.RpcError as e:
            self._channel.close()
            # NOT_FOUND per the protocol; MLServer answers UNKNOWN "... not found".
            if e.code() == grpc.StatusCode.NOT_FOUND or "not found" in (e.details() or "").lower():
                raise ModelError(f"model server {addr} has no model {model!r}: {e.details()}") from None
            raise _rpc_error(addr, "ModelReady", e) from None
        except ModelError:
            self._channel.close()
            raise
        names = list(features) if features else [t.name for t in meta.inputs]
        if not names:
            self._channel.close()
            raise ModelError(
                f"model {model!r} on {addr} declares no inputs; name the feature columns with "
                f"v2:{addr}/{model}?features=a,b,c"
            )
        self.feature_names = names
        self.version = version or (meta.versions[0] if meta.versions else "")
        log.info("V2 model %s on %s: %d features, output %s", model, addr, len(names), output or "(default)")

    def _request(self, batch: ColumnBatch, lo: int, hi: int) -> ipb.ModelInferRequest:
        req = ipb.ModelInferRequest(model_name=self.name, model_version=self.model_version)
        req.parameters["content_type"].string_param = "pd"
        for name in self.feature_names:
            col = batch.columns[name][lo:hi]
            # One tensor per column, carrying the column's own bytes.
            req.inputs.add(name=name, datatype=_TO_V2[(col.dtype.kind, col.dtype.itemsize)], shape=[hi - lo])
            req.raw_input_contents.append(np.ascontiguousarray(col, dtype=col.dtype.newbyteorder("<")).tobytes())
        if self.output:
            req.outputs.add(name=self.output)
        return req

    def _decode(self, resp: ipb.ModelInferResponse, rows: int) -> np.ndarray:
        if not resp.outputs:
            raise ModelError(f"model {self.name} on {self.addr} returned no outputs")
        idx = 0
        if self.output:
            names = [o.name for o in resp.outputs]
            if self.output not in names:
                raise ModelError(f"model {self.name} returned outputs {names}, not {self.output!r}")
            idx = names.index(self.output)
        out = resp.outputs[idx]
        if out.datatype not in _FROM_V2:
            raise ModelError(
                f"output {out.name!r} of model {self.name} is {out.datatype}, not numeric "
                "(ask for probabilities, e.g. ?output=predict_proba)"
            )
        if resp.raw_output_contents:
            y = np.frombuffer(resp.raw_output_contents[idx], dtype=_FROM_V2[out.datatype])
        else:
            y = np.asarray(getattr(out.contents, _CONTENTS.get(out.datatype, "fp32_contents")))
        if y.size % rows:
            raise ModelError(f"output {out.name!r} has {y.size} values for {rows} rows")
        return y.astype(np.float64).reshape(rows, -1)[:, -1]

    def score(self, batch: ColumnBatch) -> Scores:
        from xdpml.collector.models import feature_matrix

        n = len(batch)
        missing = [f for f in self.feature_names if f not in batch.columns]
        if missing:
            feature_matrix(batch, self.feature_names)  # raises the standard message
        bad = [
            f
            for f in self.feature_names
            if batch.columns[f].ndim != 1
            or (batch.columns[f].dtype.kind, batch.columns[f].dtype.itemsize) not in _TO_V2
        ]
        if bad:
            raise ModelError(f"columns {', '.join(bad)} cannot be sent as V2 tensors (numeric scalars only)")
        row_bytes = sum(batch.columns[f].dtype.itemsize for f in self.feature_names) + 1
        step = max(1, MAX_REQUEST_BYTES // row_bytes)
        bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
        futures = [
            self._stub.ModelInfer.future(self._request(batch, lo, hi), timeout=self.timeout_s) for lo, hi in bounds
        ]
        out = np.empty(n, dtype=np.float64)
        try:
            for (lo, hi), fut in zip(bounds, futures):
                out[lo:hi] = self._decode(fut.result(), hi - lo)
        except grpc.RpcError as e:
            for f in futures:
                f.cancel()
            raise _rpc_error(self.addr, "ModelInfer", e) from None
        return Scores(out)

    def close(self) -> None:
        self._channel.close()
