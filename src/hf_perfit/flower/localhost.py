"""A real Flower deployment on one machine: a SuperLink and N SuperNodes on 127.0.0.1, as separate processes.

For trying a deployment before spreading it over machines, and for the tests and benchmarks. Connections are
insecure (plaintext HTTP), which is acceptable on the loopback interface only; across machines use TLS (see
`docs/flower.md`).

```python
from hf_perfit.flower.localhost import LocalFederation

with LocalFederation("work", num_nodes=2) as fed:  # flower-superlink + 2 flower-supernode processes
    run_id = fed.run(config, app_dir="recipes/flower")  # `flwr run`
    report = fed.wait(config.output_dir, run_id)  # the ServerApp's flower_run.json
```
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from ..federated.config import FederatedConfig
from .server_app import REPORT_NAME
from .supernode import DEFAULT_CAP

__all__ = ["LocalFederation", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalFederation:
    """`flower-superlink` and `flower-supernode` processes on 127.0.0.1, each in its own process group, with their
    own Flower home (`<workdir>/flwr_home`, holding the SuperLink connection `localhost` for `flwr`).

    Args:
        workdir (`str` or `os.PathLike`): where the Flower home and the processes' logs go.
        num_nodes (`int`): SuperNodes to start; node `k` gets `--node-config "partition-id=k num-partitions=N"`.
        bin_dir (`str` or `os.PathLike`, *optional*): where the Flower executables are (default: next to this
            Python interpreter).
        threads_per_node (`int`, *optional*): torch threads of each process (`OMP_NUM_THREADS`), so that N nodes
            sharing this machine do not oversubscribe its cores; default: torch's own choice.
        warm (`bool`, defaults to `True`): start each SuperNode with `--isolation process` next to a long-running
            ClientApp process (`python -m hf_perfit.flower.warm`, named `warm<k>`) that keeps the model loaded
            across messages; `False`: Flower's default, a fresh `flwr-clientapp` process per message.
        node_poll_interval (`float`, *optional*, defaults to 0.1): start the SuperNodes with `python -m
            hf_perfit.flower.supernode --poll-interval <s>` (Flower's SuperNode with its waits for its own ClientApp
            woken by the node's state and its 3 s idle poll of the SuperLink capped at `s`; the documented
            deployment command); `None`: plain `flower-supernode`.
        in_node (`bool`, defaults to `False`): with `warm` and the launcher (`node_poll_interval` set), run the
            ClientApp inside each SuperNode's process (`python -m hf_perfit.flower.supernode --clientapp
            hf_perfit.flower.client_app:app`) instead of in a `warm<k>` process next to it: no HTTP between the
            node and its ClientApp, one process per node.
    """

    CONNECTION = "localhost"

    def __init__(
        self,
        workdir: str | os.PathLike,
        num_nodes: int,
        bin_dir: str | os.PathLike | None = None,
        threads_per_node: int | None = None,
        warm: bool = True,
        node_poll_interval: float | None = DEFAULT_CAP,
        in_node: bool = False,
    ) -> None:
        if in_node and (not warm or node_poll_interval is None):
            raise ValueError(
                "in_node=True runs the ClientApp inside hf_perfit's SuperNode launcher: it needs warm=True and a "
                "node_poll_interval (the launcher), not plain flower-supernode."
            )
        self.root = Path(workdir)
        self.num_nodes = int(num_nodes)
        self.bin = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.port = free_port()
        self.warm = bool(warm)
        self.node_poll_interval = node_poll_interval
        self.in_node = bool(in_node)
        self.home = self.root / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperNodes start flwr-clientapp by name
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        if threads_per_node is not None:
            self.env["OMP_NUM_THREADS"] = str(int(threads_per_node))
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ processes

    def log(self, name: str) -> Path:
        """The log file of process `name` (`superlink`, `node0`, ...)."""
        return self.root / f"{name}.log"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.log(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def start(self, timeout: float = 120.0) -> LocalFederation:
        """Start the SuperLink, wait until it answers, then start the SuperNodes."""
        self._spawn(
            "superlink",
            [
                str(self.bin / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",  # the apps' code is installed; nothing at run time
            ],
        )
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive("superlink")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as res:
                    if res.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the SuperLink did not answer within {timeout}s; see {self.log('superlink')}.")
            time.sleep(0.5)
        for k in range(self.num_nodes):
            runtime_port = free_port()  # this node's Runtime API, where its ClientApp processes connect
            if self.node_poll_interval is None:
                supernode = [str(self.bin / "flower-supernode")]
            else:
                supernode = [sys.executable, "-m", "hf_perfit.flower.supernode"]
                supernode += ["--poll-interval", str(self.node_poll_interval)]
                if self.in_node:
                    supernode += ["--clientapp", "hf_perfit.flower.client_app:app"]
            self._spawn(
                f"node{k}",
                [
                    *supernode,
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(runtime_port),
                    "--node-config",
                    f"partition-id={k} num-partitions={self.num_nodes}",
                    *(["--isolation", "process"] if self.warm else []),
                ],
            )
            if self.warm and not self.in_node:
                self._spawn(
                    f"warm{k}",
                    [
                        sys.executable,
                        "-m",
                        "hf_perfit.flower.warm",
                        "--runtime-api-address",
                        f"127.0.0.1:{runtime_port}",
                        "--insecure",
                    ],
                )
        return self

    def check_alive(self, *names: str) -> None:
        """Raise `RuntimeError` (with the end of its log) if one of the processes `names` (default: all) exited."""
        for name in names or tuple(self.procs):
            code = self.procs[name].poll()
            if code is not None:
                raise RuntimeError(f"{name} exited with {code}:\n{self.log(name).read_text()[-3000:]}")

    def kill(self, name: str) -> None:
        """SIGKILL process `name` (with SuperNode `node<k>`, also its long-running ClientApp process `warm<k>`), its
        process group and every process it started."""
        if name.startswith("node") and f"warm{name[4:]}" in self.procs:
            self._kill(f"warm{name[4:]}")
        self._kill(name)

    def _kill(self, name: str) -> None:
        import psutil

        proc = self.procs[name]
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)

    def close(self) -> None:
        """Kill every process (SuperNodes first)."""
        for name in reversed(list(self.procs)):
            self._kill(name)

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ runs

    def flwr(self, *args: str, timeout: float = 300.0) -> str:
        """Run the `flwr` CLI against this federation; returns its stdout (a failure raises with its output)."""
        done = subprocess.run(
            [str(self.bin / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done.stdout

    def run(self, config: FederatedConfig, app_dir: str | os.PathLike, **run_config: Any) -> str:
        """`flwr run <app_dir> localhost` with `config` (written next to the logs); returns the run id.

        Args:
            config ([`FederatedConfig`]): the run.
            app_dir (`str` or `os.PathLike`): the Flower app folder (`recipes/flower` in this repository).
            **run_config: more run config entries (`round_timeout=60.0` becomes `round-timeout=60.0`).
        """
        path = self.root / f"config_{Path(config.output_dir).name}_{time.time_ns()}.json"
        path.write_text(json.dumps(config.to_dict()))
        entries = [f'config="{path}"'] + [f"{k.replace('_', '-')}={json.dumps(v)}" for k, v in run_config.items()]
        out = self.flwr("run", str(app_dir), self.CONNECTION, "--run-config", " ".join(entries), "--format", "json")
        return str(json.loads(out[out.index("{") :])["run-id"])

    def status(self, run_id: str) -> str:
        """The SuperLink's status of a run (`flwr ls`), e.g. `running` or `finished:completed`."""
        listed = json.loads(self.flwr("ls", self.CONNECTION, "--run-id", run_id, "--format", "json"))
        return str(listed["runs"][0]["status"])

    def wait(
        self,
        output_dir: str | os.PathLike,
        run_id: str,
        timeout: float = 1800.0,
        alive: tuple[str, ...] = ("superlink",),
    ) -> dict[str, Any]:
        """Wait until the ServerApp wrote its final `flower_run.json` and the SuperLink lists the run as finished.

        Returns:
            `dict`: the report, plus `flwr_status` (the SuperLink's final status of the run).

        Raises:
            TimeoutError: the run did not finish within `timeout` seconds.
            RuntimeError: one of the `alive` processes exited meanwhile.
        """
        deadline = time.monotonic() + timeout
        path = Path(output_dir) / REPORT_NAME
        report: dict[str, Any] = {}
        while report.get("status") in (None, "running"):
            self.check_alive(*alive)
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish within {timeout}s; last report: {report}")
            time.sleep(0.5)
            try:
                report = json.loads(path.read_text()) if path.is_file() else {}
            except json.JSONDecodeError:  # never half-written (atomic), but be safe
                report = {}
        while True:
            time.sleep(1.0)  # the SuperLink marks the run finished once the ServerApp process exits
            status = self.status(run_id)
            if status.startswith("finished") or time.monotonic() > deadline:
                break
        report["flwr_status"] = status
        return report
