"""Real Prefect and MLflow servers, and Prefect workers, on loopback for integration tests.

Every process is started in its own session and stopped with its whole group, with timeouts; logs go
to files that a failing test prints.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self.procs[name]

    def wait_healthy(self, name: str, url: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.tail(name)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{name} not healthy at {url} after {timeout:.0f} s:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def start_prefect_server(procs: Processes, home: Path, env: dict) -> str:
    port = free_port()
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",  # the schedule test waits seconds, not a minute
            # a run or task waiting for a concurrency slot asks again after seconds, not 30 (deployments) or 10 (tags)
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        }
    )
    procs.start(
        "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env
    )
    return env["PREFECT_API_URL"]


def start_mlflow_server(procs: Processes, store: Path, env: dict) -> str:
    port = free_port()
    store.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination",
        str(store / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    procs.start("mlflow-server", cmd, {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    return f"http://127.0.0.1:{port}"


class PrefectAPI:
    """The few REST calls the tests make: trigger, wait, list runs (no client settings to juggle)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def _call(self, method: str, path: str, **kwargs):
        # SQLite under load answers "database is locked" with 503; Prefect's own client retries those too.
        for attempt in range(6):
            r = self.http.request(method, path, **kwargs)
            if r.status_code != 503:
                break
            time.sleep(0.5 * 2**attempt)
        if r.is_error:
            raise RuntimeError(f"{method} {path} -> {r.status_code}: {r.text[:1000]}")
        return r.json()

    def deployment(self, name: str) -> dict:
        return self._call("GET", f"/deployments/name/{name}")

    def trigger(self, name: str, parameters: dict) -> str:
        return self._call(
            "POST", f"/deployments/{self.deployment(name)['id']}/create_flow_run", json={"parameters": parameters}
        )["id"]

    def flow_run(self, run_id: str) -> dict:
        return self._call("GET", f"/flow_runs/{run_id}")

    def wait(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run_id} still {run['state_type']} after {timeout:.0f} s")
            time.sleep(1)

    def flow_runs(self, **flow_runs_filter) -> list[dict]:
        return self._call("POST", "/flow_runs/filter", json={"flow_runs": flow_runs_filter, "limit": 200})

    def task_runs(self, flow_run_ids: list[str]) -> list[dict]:
        return self._call(
            "POST", "/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200}
        )

    def add_schedule(self, deployment: str, schedule: dict, parameters: dict) -> None:
        body = [{"schedule": schedule, "active": True, "parameters": parameters}]
        self._call("POST", f"/deployments/{self.deployment(deployment)['id']}/schedules", json=body)
