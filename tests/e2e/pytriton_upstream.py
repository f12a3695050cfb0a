"""A real Triton core (PyTriton) for the remote-backend tests: the upstream Bastion fronts.

Runs in PyTriton's own environment (``benchmarks/peers.py`` builds it), reaching the repository's
model code through ``sys.path``. It serves the bundled digits weights under several names, each
telling a test something a client alone could not:

- ``digits``: the weights as they are;
- ``digits_offset``: the same logits plus 0.25, so a client's outputs show whose they are (the
  upstream's, not the gateway's local screening copy);
- ``broken``: fails every request (a server error upstream);
- ``slow``: answers after ``--slow-s`` seconds;
- ``other_shape``: takes 32x32 images (a config that does not match it).

Run: ``<pytriton-venv>/bin/python tests/e2e/pytriton_upstream.py --http-port P`` (gRPC on P+1,
metrics on P+2); SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(http_port: int, slow_s: float) -> None:
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from bastion.benchmarks.workload import load_served, set_single_thread

    set_single_thread()
    model, _ = load_served(channels_last=True)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, probabilities = model(torch.from_numpy(np.ascontiguousarray(images)))
        return logits.numpy(), probabilities.numpy()

    @batch
    def digits(images: np.ndarray) -> dict[str, np.ndarray]:
        logits, probabilities = run(images)
        return {"logits": logits, "probabilities": probabilities}

    @batch
    def digits_offset(images: np.ndarray) -> dict[str, np.ndarray]:
        logits, probabilities = run(images)
        return {"logits": logits + np.float32(0.25), "probabilities": probabilities}

    @batch
    def broken(images: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("/srv/models/broken/secret_path.py: the model fell over")

    @batch
    def slow(images: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(slow_s)
        logits, probabilities = run(images)
        return {"logits": logits, "probabilities": probabilities}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=http_port + 1,
        metrics_address="127.0.0.1",
        metrics_port=http_port + 2,
    )
    outputs = [
        Tensor(name="logits", dtype=np.float32, shape=(10,)),
        Tensor(name="probabilities", dtype=np.float32, shape=(10,)),
    ]
    batcher = DynamicBatcher(max_queue_delay_microseconds=1000, preferred_batch_size=[16, 32, 64])
    with Triton(config=config) as triton:
        for name, infer, side in (
            ("digits", digits, 28),
            ("digits_offset", digits_offset, 28),
            ("broken", broken, 28),
            ("slow", slow, 28),
            ("other_shape", digits, 32),
        ):
            triton.bind(
                model_name=name,
                infer_func=infer,
                inputs=[Tensor(name="images", dtype=np.float32, shape=(1, side, side))],
                outputs=outputs,
                config=ModelConfig(max_batch_size=64, batcher=batcher),
                strict=name != "broken",
            )
        print("pytriton_upstream: serving", flush=True)
        triton.serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--slow-s", type=float, default=3.0)
    args = parser.parse_args()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    signal.signal(signal.SIGTERM, _interrupt)
    serve(args.http_port, args.slow_s)


if __name__ == "__main__":
    main()
