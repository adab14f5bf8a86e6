"""nanoserve behind Ray Serve: each replica is one nanoserve engine and its OpenAI server, on one GPU.

Ray Serve's proxy takes HTTP on every node and its router spreads requests over the replicas, wherever they run in
the Ray cluster; the autoscaler adds replicas when they hold too many requests. nanoserve itself is unchanged: the
replica builds the same engine and the same Starlette app as `nanoserve serve` and hands the app to Serve.

    pip install "ray[serve]"          # not a nanoserve dependency (tried with ray 2.60.0)
    cd deploy && serve run ray_serve_app:build model=Qwen/Qwen2.5-0.5B-Instruct
    curl localhost:8000/v1/models

Arguments of `build` (all optional): model (default: the embedded model), num_gpus (per replica, default 1; 0 on a
CPU-only cluster), device (default auto), min_replicas (1), max_replicas (4). The API key is read from
$NANOSERVE_API_KEY, as with `nanoserve serve`.
"""
import os

from ray import serve
from ray.serve import Application

from nanoserve.async_engine import AsyncLLMEngine
from nanoserve.config import EngineConfig
from nanoserve.default_model import DEFAULT_MODEL_NAME
from nanoserve.engine import LLMEngine
from nanoserve.server import build_app


AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    # Requests in flight per replica (queued in nanoserve included) that the autoscaler aims for: above it, it adds
    # replicas. Well under max_ongoing_requests, so that it scales before the router has to hold requests back.
    "target_ongoing_requests": 32,
    "downscale_delay_s": 300,  # a new replica takes minutes to load its model: keep one through a short lull
}


@serve.deployment(
    ray_actor_options={"num_gpus": 1},  # one engine per GPU: Ray places each replica on a node with a free one
    autoscaling_config=AUTOSCALING,
    # The most requests the router hands one replica at once. nanoserve batches them all (continuous batching),
    # so this is large, not 1 as for a model that serves one request at a time.
    max_ongoing_requests=128,
    health_check_period_s=10,  # check_health below: a dead engine gets the replica replaced
    graceful_shutdown_timeout_s=20,  # on scale-down, requests in flight get this long to finish
)
@serve.ingress()  # no app yet: Serve calls __serve_build_asgi_app__ on the replica, after __init__
class NanoserveServer:
    def __init__(self, model: str | None = None, device: str = "auto"):
        self.name = model or DEFAULT_MODEL_NAME
        self.engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=model, device=device, served_model_name=self.name)))

    def __serve_build_asgi_app__(self):
        # nanoserve's own OpenAI-compatible app: /v1/*, /health, /metrics, as from `nanoserve serve`.
        return build_app(self.engine, self.name, api_key=os.environ.get("NANOSERVE_API_KEY"))

    def check_health(self) -> None:
        # Ray's counterpart of the liveness probe: a dead engine is also what turns /health to 503.
        if not self.engine.is_alive:
            raise RuntimeError(f"nanoserve's engine loop died: {self.engine.error!r}")

    def __del__(self):
        self.engine.shutdown()


def build(args: dict[str, str]) -> Application:
    """`serve run ray_serve_app:build key=value ...` passes the key=value pairs here, as strings."""
    options = {"ray_actor_options": {"num_gpus": float(args.get("num_gpus", 1))}}
    if "min_replicas" in args or "max_replicas" in args:
        options["autoscaling_config"] = {**AUTOSCALING, "min_replicas": int(args.get("min_replicas", 1)),
                                         "max_replicas": int(args.get("max_replicas", 4))}
    return NanoserveServer.options(**options).bind(args.get("model"), args.get("device", "auto"))
