"""Start the real MONAI Label server with our app as a subprocess on 127.0.0.1 (a free port)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MONAILABEL = Path(sys.executable).with_name("monailabel")
FILE_EXT = '["*.png","*.jpg","*.jpeg","*.tif","*.tiff","*.dcm","*.nii","*.nii.gz"]'


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_studies(dest: Path, names: list[str]) -> Path:
    """A temporary studies folder with the given sample images (the committed sample_data stays untouched)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(REPO / "sample_data" / "images" / name, dest / name)
    return dest


class Server:
    def __init__(self, studies: Path | str, conf: dict[str, str] | None = None, log: Path | None = None,
                 env: dict[str, str] | None = None, cwd: Path | None = None):
        """``studies``: a folder, or a DICOMweb URL (then give ``cwd``, where the log goes by default)."""
        cwd = cwd or Path(studies).parent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or cwd / "server.log"
        cmd = [str(MONAILABEL), "start_server", "--app", str(REPO / "apps" / "xray_textseg"),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port)]
        # zero-shot unless a test asks for the packaged starter adapter (tests/test_starter.py)
        for k, v in {"starter_adapter": "false", **(conf or {})}.items():
            cmd += ["--conf", k, str(v)]
        full_env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "MONAI_LABEL_DATASTORE_FILE_EXT": FILE_EXT,
                    # the monailabel script runs `python -m monailabel.main`: make that the venv's python
                    "MONAILABEL_PYEXE": sys.executable,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=str(cwd), start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def wait_ready(self, timeout: float = 300) -> dict:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = self.client.get("/info/", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.client.close()
        stop_group(self.proc)
        self._log.close()
