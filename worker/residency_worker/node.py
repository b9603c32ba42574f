"""A worker joined to the cluster: the engine's HTTP server plus the node agent in one process."""

from __future__ import annotations

import logging
import threading

import uvicorn

from residency.heap import freeze_heap
from residency_worker.agent import NodeAgent
from residency_worker.engine import Engine
from residency_worker.presence import AgentConfig
from residency_worker.profiler import BackgroundProfiler
from residency_worker.publish import ProfilePublisher
from residency_worker.server import ServerSettings, create_app

log = logging.getLogger("residency.node")


def load_kube_config() -> None:
    """In-cluster credentials when running in a pod, else $KUBECONFIG."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def serve_node(
    engine: Engine,
    settings: ServerSettings,
    host: str,
    port: int,
    agent_config: AgentConfig | None,
    log_level: str = "info",
) -> None:
    """Serve inference; with an agent config, also converge to this node's placements until stopped."""
    stop = threading.Event()
    agent_thread: threading.Thread | None = None
    if agent_config is not None:
        load_kube_config()
        agent = NodeAgent(engine, agent_config)
        if agent_config.background_profile:
            agent.publisher = ProfilePublisher(agent.custom, agent_config.node)
            agent.profiler = BackgroundProfiler(engine, agent.publisher.publish)
            threading.Thread(target=agent.profiler.run, args=(stop,), name="profiler", daemon=True).start()
        agent_thread = threading.Thread(target=agent.run, args=(stop,), name="node-agent", daemon=True)
        agent_thread.start()
        log.info("joined the cluster as node %s (endpoint %s)", agent_config.node, agent_config.endpoint)
    app = create_app(engine, settings)
    app.state.metrics.gc.install()
    # see residency/heap.py: what startup and each model load made is never walked by a collection again
    engine.add_listener(lambda _model, operation, _report: freeze_heap() if operation == "load" else None)
    freeze_heap()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    finally:
        stop.set()
        if agent_thread is not None:
            agent_thread.join(timeout=10)
