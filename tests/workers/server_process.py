"""A real server process on a free loopback port for the tests: started, polled until /health answers, stopped
with SIGTERM (then killed if it hangs), its output kept in a log file."""
import os
import re
import signal
import subprocess
import time

import httpx

from tests.helpers import ROOT, free_port


class ServerProcess:
    def __init__(self, cmd, env, log_path, port=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return open(self.log_path, encoding="utf-8", errors="replace").read()

    def wait_ready(self, timeout=240.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            assert self.proc.poll() is None, f"the server exited:\n{self.output()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not answer /health in {timeout} s:\n{self.output()[-3000:]}")

    def serving_pid(self) -> int:
        """The pid of the process that serves HTTP (rank 0; the launcher's child under torchrun)."""
        return int(re.search(r"> Serving .* pid (\d+)\)", self.output()).group(1))

    def stop(self, timeout=60.0) -> int:
        """SIGTERM to the serving process; the launcher's exit status (killed: AssertionError after cleanup)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.serving_pid(), signal.SIGTERM)
            except (AttributeError, ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                self.log.close()
                raise AssertionError(f"the server did not stop in {timeout} s:\n{self.output()[-3000:]}")
        self.log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if not self.log.closed:
            self.log.close()
