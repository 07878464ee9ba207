"""A Ray cluster-launcher provider for "this machine": ``ray up`` / ``ray submit`` / ``ray down``
without SSH.

Ray's ``local`` provider reaches even 127.0.0.1 over SSH, and its ``fake_multinode`` provider needs
Docker for ``ray up``. This provider runs the launcher's commands in a local shell instead, so the
same cluster YAML workflow users run against Gaudi hosts can be exercised on a laptop and in CI
(``cluster_configs/local.yaml``). It manages exactly one node, the head. Node state is kept in a
small JSON file because ``ray up`` and ``ray down`` run in different processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from threading import RLock
from typing import Any

from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import TAG_RAY_NODE_KIND

HEAD_ID = "127.0.0.1"


class LocalShellRunner(CommandRunnerInterface):
    """Runs the launcher's commands with ``bash -c`` on this machine."""

    def __init__(self, log_prefix: str) -> None:
        self.log_prefix = log_prefix

    def run(  # noqa: PLR0913 - signature fixed by Ray
        self,
        cmd: str | None = None,
        timeout: int = 120,
        exit_on_fail: bool = False,
        port_forward: Any = None,
        with_output: bool = False,
        environment_variables: dict[str, object] | None = None,
        run_env: str = "auto",
        ssh_options_override_ssh_key: str = "",
        shutdown_after_run: bool = False,
    ) -> str:
        if not cmd:
            return ""
        env = dict(os.environ)
        for key, value in (environment_variables or {}).items():
            env[key] = value if isinstance(value, str) else json.dumps(value)
        done = subprocess.run(
            ["bash", "-c", cmd], env=env, capture_output=with_output, text=True, check=False
        )
        if done.returncode != 0:
            # Ray's updater treats CalledProcessError as "command failed" and reports it.
            raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        return done.stdout if with_output else ""

    def run_rsync_up(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        _copy(source, target)

    def run_rsync_down(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        _copy(source, target)

    def remote_shell_command_str(self) -> str:
        return "bash"


def _copy(source: str, target: str) -> None:
    src, dst = Path(os.path.expanduser(source)), Path(os.path.expanduser(target))
    if src.resolve() == dst.resolve():
        return
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


class LocalHostProvider(NodeProvider):
    """One head node: this machine. ``provider.state_path`` names the state file (optional)."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self._lock = RLock()
        default = Path(tempfile.gettempdir()) / f"fp8-orchestrator-cluster-{cluster_name}.json"
        self._state_path = Path(provider_config.get("state_path", default))

    def _load(self) -> dict[str, dict[str, str]]:
        if not self._state_path.exists():
            return {}
        return json.loads(self._state_path.read_text())

    def _save(self, nodes: dict[str, dict[str, str]]) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(nodes))
        os.replace(tmp, self._state_path)

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        with self._lock:
            nodes = self._load()
            return [n for n, tags in nodes.items() if all(tags.get(k) == v for k, v in tag_filters.items())]

    def is_running(self, node_id: str) -> bool:
        return node_id in self._load()

    def is_terminated(self, node_id: str) -> bool:
        return not self.is_running(node_id)

    def node_tags(self, node_id: str) -> dict[str, str]:
        return self._load()[node_id]

    def external_ip(self, node_id: str) -> str:
        return HEAD_ID

    def internal_ip(self, node_id: str) -> str:
        return HEAD_ID

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with self._lock:
            nodes = self._load()
            nodes[node_id].update(tags)
            self._save(nodes)

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> None:
        if tags.get(TAG_RAY_NODE_KIND) != "head":
            raise RuntimeError(
                "the local provider runs only a head node on this machine; set max_workers: 0 in the "
                "cluster YAML (use cluster_configs/gaudi*-8card.yaml for real multi-host clusters)"
            )
        with self._lock:
            nodes = self._load()
            nodes[HEAD_ID] = dict(tags)
            self._save(nodes)

    def terminate_node(self, node_id: str) -> None:
        with self._lock:
            nodes = self._load()
            nodes.pop(node_id, None)
            self._save(nodes)

    def get_command_runner(  # noqa: PLR0913 - signature fixed by Ray
        self,
        log_prefix: str,
        node_id: str,
        auth_config: dict[str, Any],
        cluster_name: str,
        process_runner: Any,
        use_internal_ip: bool,
        docker_config: dict[str, Any] | None = None,
    ) -> CommandRunnerInterface:
        return LocalShellRunner(log_prefix)
