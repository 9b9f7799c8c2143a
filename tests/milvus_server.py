"""A real Milvus Lite server (`milvus-lite server`) on a free loopback port, for tests and benchmarks: started as a
child process, stopped by its own pid, restartable on the same data folder."""
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from serving.torchserve import free_port

MILVUS_LITE = Path(sys.executable).with_name("milvus-lite")


class MilvusLite:
    def __init__(self, data_dir, port=None):
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.process, self.log = None, self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def uri(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=120):
        """Starts the server and waits until it answers a client call."""
        assert self.process is None, "already started"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(MILVUS_LITE), "server", "--data-dir", str(self.data_dir),
                                             "--host", "127.0.0.1", "--port", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, f"milvus-lite exited: {self.log.read_text()[-2000:]}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                from visual_search.catalogue.milvus import MilvusSettings, connect  # noqa: PLC0415

                connect(MilvusSettings(self.uri, "none", timeout=5)).close()  # the serving client's options
                return self
            except Exception:  # noqa: BLE001 (not listening yet)
                time.sleep(0.2)
        raise TimeoutError(f"milvus-lite did not answer on {self.uri} within {timeout} s")

    def stop(self, timeout=60):
        """Stops the server by its pid (SIGTERM, then SIGKILL) and waits for it to exit."""
        if self.process is None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        self.process = None

    def running(self):
        return self.process is not None and self.process.poll() is None


@contextmanager
def running_milvus(data_dir):
    server = MilvusLite(data_dir).start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.running()
