"""Progress bars: drawn on stderr when it is a terminal, never in pipes, logs or CI."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios


def run_eda(demo_data, out, cache, stderr):
    argv = ["eda", "--data", str(demo_data), "--out", str(out)]
    code = f"import sys; from lowres_birds.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "LOWRES_BIRDS_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def test_bars_on_a_terminal_only(demo_data, tmp_path):
    piped = run_eda(demo_data, tmp_path / "piped", tmp_path / "cache-piped", subprocess.PIPE)
    _, err = piped.communicate(timeout=300)
    assert piped.returncode == 0
    assert "decoding" not in err.decode() and "it/s" not in err.decode()

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new terminal is 0 columns wide
    terminal = run_eda(demo_data, tmp_path / "terminal", tmp_path / "cache-terminal", follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert terminal.wait(timeout=300) == 0
    text = shown.decode(errors="replace")
    for step in ("decoding 30 images", "reading train headers", "perceptual hashes of train", "comparing LR/HR twins"):
        assert step in text, step
