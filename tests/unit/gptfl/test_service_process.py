"""A service process must stop on SIGTERM whichever of its threads the kernel delivers it to."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry

from gptfl.errors import ConfigError
from gptfl.service_process import start_metrics_http

# The child waits the way every service's main thread does. A helper thread sends SIGTERM to
# itself, as the kernel may when it picks a non-main thread for a process-directed signal;
# with a bare Event.wait() the main thread never runs the handler (seen as a CI hang).
CHILD = textwrap.dedent(
    """
    import logging, os, signal, sys, threading, time
    from gptfl.service_process import stop_on_signals, wait_for_stop

    logging.basicConfig(level=logging.INFO)
    stop = stop_on_signals()

    def signal_from_another_thread():
        time.sleep(0.2)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        time.sleep(10)
        os._exit(3)  # the main thread never woke

    threading.Thread(target=signal_from_another_thread, daemon=True).start()
    wait_for_stop(stop)
    sys.exit(0)
    """
)


def test_sigterm_delivered_to_another_thread_stops_the_waiting_main_thread() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "received SIGTERM; shutting down" in done.stderr


def test_a_metrics_port_in_use_is_a_config_error_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError) as info:
            start_metrics_http(address, CollectorRegistry())
    assert str(info.value).startswith(f"metrics_address: cannot listen on {address}: ")
