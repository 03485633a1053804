"""Start a private Orthanc PACS (scripts/orthanc.sh: DICOMweb plugin, 127.0.0.1 only, free ports, storage in
a temporary folder) for the DICOMweb tests, and upload radiographs through its REST API."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
from server import stop_group

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "orthanc.sh"


def locate_or_skip() -> None:
    """Skip (with the reason) when Orthanc or its DICOMweb plugin is not installed."""
    r = subprocess.run(["bash", str(SCRIPT), "--locate"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"Orthanc is not available: {r.stderr.strip() or r.stdout.strip()} "
                    "(scripts/install.sh installs it when run as root on Debian)")


class Orthanc:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._log = open(folder / "orthanc.stdout", "w")
        self.proc = subprocess.Popen(["bash", str(SCRIPT), str(folder)], stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.env: dict[str, str] = {}

    def wait_ready(self, timeout: float = 60) -> Orthanc:
        t_end = time.time() + timeout
        env_file = self.folder / "orthanc.env"
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            if env_file.is_file():
                self.env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
                try:
                    if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        raise TimeoutError(f"Orthanc not ready after {timeout} s:\n{self.log_tail()}")

    @property
    def url(self) -> str:
        return self.env["ORTHANC_URL"]

    @property
    def dicomweb(self) -> str:
        return self.env["DICOMWEB_URL"]

    def upload(self, path: Path) -> dict:
        """POST /instances: Orthanc's answer (ID, ParentSeries, Status...)."""
        r = httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=60)
        r.raise_for_status()
        return r.json()

    def log_tail(self, n: int = 40) -> str:
        text = ""
        for name in ("orthanc.stdout", "Orthanc.log"):
            path = self.folder / name
            if path.is_file():
                text += f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:]) + "\n"
        return text

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()
