"""Node.js test tooling: installs the pinned npm packages of tests/node once per checkout."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def node_available() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def ensure_node_modules() -> Path:
    """Runs `npm install` in tests/node if needed (guarded by a lock for parallel callers)."""
    stamp = NODE_DIR / "node_modules" / ".cbir-installed"
    with open(NODE_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                check=True,
                timeout=300,
            )
            stamp.touch()
    return NODE_DIR


def run_node(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    ensure_node_modules()
    return subprocess.run(
        ["node", str(NODE_DIR / script), *args], cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout
    )
