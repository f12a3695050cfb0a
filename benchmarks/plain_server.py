"""The baseline a team would write first: FastAPI, one infer route, the model called per request.

It speaks just enough of the KServe v2 binary tensor extension for ``tritonclient.http`` (JSON
header + raw FP32 input; binary outputs when asked), runs under the same uvicorn settings as Bastion
(uvloop, httptools, one worker, no access log) with one torch thread, and never batches: each
request is one forward pass of batch 1. It calls the model inline on the event loop because a thread
hop would only add latency to a sub-millisecond model served by a single worker.

Run: ``python -m bastion.benchmarks.plain_server --port 8010``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import orjson
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from bastion.benchmarks.workload import DIGITS_SHAPE, load_served, set_single_thread

MODEL_NAME = "digits"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
HEADER_LENGTH = "Inference-Header-Content-Length"


class BadRequest(ValueError):
    """A request this server cannot read; answered with 400 and Triton's ``{"error": ...}``."""


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, np.ndarray]:
    """The JSON header and the (n, 1, 28, 28) FP32 input of a tritonclient request."""
    try:
        json_size = int(header_length) if header_length is not None else len(body)
        header = orjson.loads(body[:json_size])
        spec = next(item for item in header["inputs"] if item["name"] == INPUT_NAME)
        shape = [int(dim) for dim in spec["shape"]]
    except (ValueError, KeyError, TypeError, StopIteration) as error:
        raise BadRequest(f"malformed request: {error!r}") from None
    if spec.get("datatype") != "FP32" or len(shape) != 4 or tuple(shape[1:]) != DIGITS_SHAPE:
        raise BadRequest(f"expected FP32 [-1, 1, 28, 28], got {spec.get('datatype')} {shape}")
    try:
        if "data" in spec:
            values = np.asarray(spec["data"], dtype=np.float32)
        else:
            values = np.frombuffer(body, dtype="<f4", offset=json_size)
    except (ValueError, TypeError) as error:
        raise BadRequest(f"unreadable tensor data: {error}") from None
    if values.size != math.prod(shape):
        raise BadRequest(f"{values.size} values for shape {shape}")
    return header, values.reshape(shape)


def wants_binary(header: dict) -> bool:
    """tritonclient asks for binary outputs whenever it lists none (``binary_data_output``)."""
    if header.get("parameters", {}).get("binary_data_output"):
        return True
    return any(out.get("parameters", {}).get("binary_data") for out in header.get("outputs", []))


def encode_response(header: dict, outputs: dict[str, np.ndarray]) -> Response:
    """A Triton-shaped response: JSON, then the output blobs in JSON order when binary."""
    binary = wants_binary(header)
    requested = {out.get("name") for out in header.get("outputs", [])} or set(outputs)
    described, blobs = [], []
    for name, array in outputs.items():
        if name not in requested:
            continue
        item: dict = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blob = array.astype("<f4").tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = array.ravel().tolist()
        described.append(item)
    payload = {"model_name": MODEL_NAME, "model_version": "1", "outputs": described}
    if "id" in header:
        payload["id"] = header["id"]
    head = orjson.dumps(payload)
    if not binary:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def create_app(model: torch.nn.Module) -> FastAPI:
    """The app with its two routes: readiness and infer."""
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200)

    @app.post(f"/v2/models/{MODEL_NAME}/infer")
    async def infer(request: Request) -> Response:
        try:
            header, images = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
        except BadRequest as error:
            error_body = orjson.dumps({"error": str(error)})
            return Response(error_body, status_code=400, media_type="application/json")
        with torch.inference_mode():
            results = model(torch.from_numpy(images.copy()))
        return encode_response(
            header, {name: out.numpy() for name, out in zip(OUTPUT_NAMES, results, strict=True)}
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--channels-last", action="store_true", help="serve NHWC, as Bastion does")
    args = parser.parse_args()
    set_single_thread()
    model, source = load_served(channels_last=args.channels_last)
    layout = "channels_last" if args.channels_last else "nchw"
    print(f"plain_server: DigitsNet {source}, {layout}", flush=True)
    uvicorn.run(
        create_app(model),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        workers=1,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
