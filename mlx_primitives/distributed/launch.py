"""Start a distributed MLX program as ``n`` local processes.

What ``mlx.launch -n N`` does for one host, with the environment MLX's backends read
(``mlx/distributed/ring/ring.cpp``, ``nccl/nccl.cpp``), free ports picked by the OS, and
the ranks' exit codes returned (``mlx.launch`` only logs them), so tests and benchmarks
can tell a failed rank from a passing run.

* ring: ``MLX_RANK`` and ``MLX_HOSTFILE``, a JSON list of ``["127.0.0.1:port"]`` per rank.
* nccl: ``MLX_RANK``, ``MLX_WORLD_SIZE``, ``NCCL_HOST_IP``, ``NCCL_PORT`` and
  ``CUDA_VISIBLE_DEVICES`` set to the rank (one GPU per process); ``NCCL_NVLS_ENABLE=0`` unless set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from ..validation import check_choice, check_int

BACKENDS = ("ring", "nccl")


def _free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rank_environments(size: int, backend: str, hostfile: str) -> List[Dict[str, str]]:
    """The environment variables of each rank (``hostfile`` is written for the ring backend)."""
    check_choice("backend", backend, BACKENDS)
    if check_int("size", size) < 1:
        raise ValueError(f"size must be at least 1 (processes); got {size}")
    if backend == "ring":
        with open(hostfile, "w") as f:
            json.dump([[f"127.0.0.1:{port}"] for port in _free_ports(size)], f)
        return [{"MLX_RANK": str(r), "MLX_HOSTFILE": hostfile} for r in range(size)]
    port = _free_ports(1)[0]
    # NVLink multicast (NVLS) stays off unless the caller's environment turns it on: on hosts whose GPUs
    # are shared, a program using it can take them out of service.
    nvls = os.environ.get("NCCL_NVLS_ENABLE", "0")
    return [
        {"MLX_RANK": str(r), "MLX_WORLD_SIZE": str(size), "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(port),
         "CUDA_VISIBLE_DEVICES": str(r), "NCCL_NVLS_ENABLE": nvls}
        for r in range(size)
    ]


def launch_local(size: int, args: Sequence[str], backend: str = "ring", timeout: Optional[float] = None,
                 capture: bool = False) -> List[subprocess.CompletedProcess]:
    """Run ``python args...`` as ranks ``0 .. size - 1`` of one group and wait for all of them.

    Args:
        size: number of processes.
        args: arguments of the Python interpreter (``["-m", "module", ...]`` or ``["script.py", ...]``).
        backend: ``"ring"`` (TCP over loopback, any machine) or ``"nccl"`` (one CUDA GPU per rank).
        timeout: seconds before every rank still running is killed and ``TimeoutExpired`` raised (with
            ``capture``, its ``output`` and ``stderr`` hold every rank's text, each under its rank).
        capture: keep each rank's stdout and stderr (text) instead of inheriting them.

    Returns:
        One ``CompletedProcess`` per rank, in rank order.
    """
    if isinstance(args, str) or not all(isinstance(a, (str, os.PathLike)) for a in args):
        raise TypeError(f"args must be a list of strings or paths (arguments of the Python interpreter); got {args!r}")
    with tempfile.TemporaryDirectory() as tmp:
        envs = rank_environments(size, backend, os.path.join(tmp, "hosts.json"))
        logs = [(open(os.path.join(tmp, f"{r}.out"), "w+"), open(os.path.join(tmp, f"{r}.err"), "w+"))
                if capture else (None, None) for r in range(size)]
        procs = [
            subprocess.Popen([sys.executable, *args], env={**os.environ, **env}, stdout=out, stderr=err,
                             stdin=subprocess.DEVNULL, text=True)
            for env, (out, err) in zip(envs, logs)
        ]
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        try:
            for proc in procs:
                proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = []
        for proc, (out, err) in zip(procs, logs):
            text = [None, None]
            if capture:
                for i, f in enumerate((out, err)):
                    f.seek(0)
                    text[i] = f.read()
                    f.close()
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, *text))
        if timed_out:
            raise subprocess.TimeoutExpired(procs[0].args, timeout, output=_by_rank(results, "stdout"),
                                            stderr=_by_rank(results, "stderr"))
        return results


def _by_rank(results: Sequence[subprocess.CompletedProcess], stream: str) -> Optional[str]:
    """Every rank's captured ``stream`` under a ``--- rank r ---`` line (``None`` when nothing was captured)."""
    if getattr(results[0], stream) is None:
        return None
    return "".join(f"--- rank {r} ---\n{getattr(result, stream)}" for r, result in enumerate(results))
