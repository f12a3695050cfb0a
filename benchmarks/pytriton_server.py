"""PyTriton (a real Triton core) serving the same DigitsNet weights, as a peer for Bastion.

Triton's dynamic batcher gets the settings of ``models/repository/digits/config.pbtxt``: preferred
batches 16/32/64, max batch 64, 1 ms queue delay. It runs in PyTriton's own virtual environment
(``benchmarks/peers.py`` makes it), so it reaches the repository's model code through ``sys.path``
and must be started with ``LD_LIBRARY_PATH`` at the interpreter's ``LIBDIR`` (the runner does
that; PEERS.md explains why). SIGTERM stops it cleanly, so Triton and its workspace go with it.

Run: ``<pytriton-venv>/bin/python benchmarks/pytriton_server.py --http-port 8020``
(gRPC takes the next port, metrics the one after).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "digits"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Turns SIGTERM into the KeyboardInterrupt that ``Triton.serve`` shuts down on."""
    raise KeyboardInterrupt


def make_infer(model: object) -> Callable[..., dict[str, np.ndarray]]:
    """The batched callable Triton calls with the concatenated ``images`` of a batch."""
    import torch
    from pytriton.decorators import batch

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits, probabilities = model(torch.from_numpy(np.ascontiguousarray(images)))
        return {"logits": logits.numpy(), "probabilities": probabilities.numpy()}

    return infer


def serve(http_port: int, channels_last: bool) -> None:
    """Binds the model to a Triton listening on 127.0.0.1 and blocks until interrupted."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from bastion.benchmarks.workload import load_served, set_single_thread

    set_single_thread()
    model, source = load_served(channels_last=channels_last)
    layout = "channels_last" if channels_last else "nchw"
    print(f"pytriton_server: DigitsNet {source}, {layout}", flush=True)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=http_port + 1,
        metrics_address="127.0.0.1",
        metrics_port=http_port + 2,
    )
    batcher = DynamicBatcher(max_queue_delay_microseconds=1000, preferred_batch_size=[16, 32, 64])
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=make_infer(model),
            inputs=[Tensor(name="images", dtype=np.float32, shape=(1, 28, 28))],
            outputs=[
                Tensor(name="logits", dtype=np.float32, shape=(10,)),
                Tensor(name="probabilities", dtype=np.float32, shape=(10,)),
            ],
            config=ModelConfig(max_batch_size=64, batcher=batcher),
            strict=True,
        )
        triton.serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, default=8020)
    parser.add_argument("--channels-last", action="store_true", help="serve NHWC, as Bastion does")
    args = parser.parse_args()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    signal.signal(signal.SIGTERM, _interrupt)
    serve(args.http_port, args.channels_last)


if __name__ == "__main__":
    main()
