"""Start real Celery worker processes for tests (no eager mode) and talk to them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from orchestrator.celery_app import make_app
from orchestrator.settings import OrchestratorSettings


class WorkerHarness:
    """A unique queue plus the ``LTRR_*`` environment the worker processes run with."""

    def __init__(self, **env: str) -> None:
        self.queue = f"test-{uuid.uuid4().hex[:8]}"
        self.env = dict(os.environ, **env)
        keys = {k: v for k, v in self.env.items() if k.startswith("LTRR_")}
        old = {k: os.environ.get(k) for k in keys}
        os.environ.update(keys)
        try:
            self.app = make_app(OrchestratorSettings())
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "orchestrator.celery_app:app", "worker",
             "--pool=solo", "-Q", self.queue, "--loglevel=WARNING", "--without-heartbeat",
             "--without-gossip", "--without-mingle"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def send(self, task: str, **kwargs):  # type: ignore[no-untyped-def]
        return self.app.send_task(f"orchestrator.tasks.{task}", kwargs=kwargs, queue=self.queue)

    def run(self, *tasks: str, timeout: float = 300) -> list[dict]:
        """Start a worker, run ``tasks`` one after the other, stop the worker."""
        proc = self.start()
        try:
            return [self.send(t).get(timeout=timeout) for t in tasks]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
