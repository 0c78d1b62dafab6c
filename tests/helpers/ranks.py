"""K processes of one run, started the way torchrun starts them: the same command, each with its RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the rendezvous address in its environment."""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, args, cwd) -> list[subprocess.Popen]:
    port = free_port()
    processes = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            "HYDRA_FULL_ERROR": "0",
        }
        command = [sys.executable, "-m", "metalearn", *map(str, args)]
        processes.append(
            subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return processes


def run_ranks(world: int, args, cwd, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run the K processes to the end; fail with their output if one fails."""
    processes = start_ranks(world, args, cwd)
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    for rank, result in enumerate(results):
        if result.returncode != 0:
            raise AssertionError(f"rank {rank} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return results
