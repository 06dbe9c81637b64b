"""Checkpoint scratch folders left by a killed process are removed; a live process's are kept."""
import os
import signal
import socket
import subprocess
import sys
import textwrap

from rn50.io import staging

_MAKE_FOLDER_AND_WAIT = textwrap.dedent("""
    import sys, time
    from rn50.io import staging
    folder = staging.staging_folder()
    open(folder + "/state.pt", "wb").write(b"x" * 1000)
    print(folder, flush=True)
    time.sleep(60)
""")


def _process_with_a_folder(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-c", _MAKE_FOLDER_AND_WAIT], env=env,
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def test_a_killed_processs_folder_goes_and_a_live_ones_stays(tmp_path):
    killed, killed_folder = _process_with_a_folder(tmp_path)
    alive, alive_folder = _process_with_a_folder(tmp_path)
    unowned = tmp_path / f"{staging.PREFIX}abc123"  # no process id in its name: not ours to judge
    unowned.mkdir()
    # A dead pid of another host (a container sharing the temp dir): its processes are not ours.
    elsewhere = tmp_path / f"{staging.PREFIX}another-host-{killed.pid}-x"
    elsewhere.mkdir()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert os.path.isdir(killed_folder)  # a SIGKILLed process cannot clean up after itself
        assert staging.remove_orphaned(tmp_path) == 1
        assert not os.path.exists(killed_folder)
        assert os.path.isfile(os.path.join(alive_folder, "state.pt")) and unowned.is_dir()
        assert elsewhere.is_dir()
    finally:
        alive.kill()
        alive.wait()
    assert staging.remove_orphaned(tmp_path) == 1 and not os.path.exists(alive_folder)


def test_this_processs_folders_are_named_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with staging.download_folder() as downloading:
        assert os.path.basename(downloading).startswith(
            f"{staging.PREFIX}{socket.gethostname()}-{os.getpid()}-")
        assert staging.remove_orphaned(tmp_path) == 0 and os.path.isdir(downloading)
