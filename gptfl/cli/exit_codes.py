"""How every GPT-FL command line ends a failure: one line on stderr and a documented exit code.

The codes are :mod:`gptfl.errors`' ``EXIT_*``; docs/cli.md ("Exit codes") documents them and
the table below. ``gptfl`` (every sub-command) and ``gptfl-synth regenerate`` run through
:func:`run_command`; a command that talks to a service reports a failed call with
:func:`report_rpc_error`, so a gRPC status means the same exit code whichever program saw it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType

import grpc
import pydantic

from gptfl.config_loading import format_validation_error
from gptfl.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_UNAVAILABLE,
    ConfigError,
    GptflError,
)

#: the exit code of a call that failed with a gRPC status; every status not listed (the
#: service refused or failed the call: FAILED_PRECONDITION, PERMISSION_DENIED, NOT_FOUND,
#: ALREADY_EXISTS, RESOURCE_EXHAUSTED, DATA_LOSS, INTERNAL, ...) exits with EXIT_FAILURE
RPC_EXIT_CODES: Mapping[grpc.StatusCode, int] = MappingProxyType(
    {
        # what was sent is wrong (a job spec, a request's options): fix the input
        grpc.StatusCode.INVALID_ARGUMENT: EXIT_CONFIG,
        # no answer (unreachable, a failed TLS handshake, shutting down, too slow): try again
        grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    }
)


def rpc_exit_code(code: grpc.StatusCode) -> int:
    """The exit code of a call that failed with ``code`` (see :data:`RPC_EXIT_CODES`)."""
    return RPC_EXIT_CODES.get(code, EXIT_FAILURE)


def describe_rpc_error(exc: grpc.RpcError, *, peer: str | None = None) -> str:
    """A failed call in one line: ``CODE: details``, or for ``UNAVAILABLE`` with a ``peer``
    (``"coordinator"``), ``<peer> unreachable (details); check the address and certificates``."""
    code: grpc.StatusCode = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and peer:
        return f"{peer} unreachable ({details}); check the address and certificates"
    return f"{code.name}: {details}"


def report_rpc_error(prog: str, exc: grpc.RpcError, *, peer: str | None = None) -> int:
    """Prints ``prog: <the failed call>`` on stderr; returns its exit code."""
    print(f"{prog}: {describe_rpc_error(exc, peer=peer)}", file=sys.stderr)
    return rpc_exit_code(exc.code())


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Runs ``command`` and returns its exit code, or the one of the error it raised.

    ``ConfigError`` and options that do not validate (``pydantic.ValidationError``) exit with
    EXIT_CONFIG, a failed gRPC call as :data:`RPC_EXIT_CODES` says, any other
    :class:`~gptfl.errors.GptflError` and Ctrl-C with EXIT_FAILURE; each as one line on
    stderr starting with ``prog:``. Anything else is a bug and keeps its traceback.
    """
    try:
        return command()
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except pydantic.ValidationError as exc:
        # a command's options validated into a request (gptfl synth generate --steps 0)
        print(f"{prog}: {format_validation_error(exc, source='options')}", file=sys.stderr)
        return EXIT_CONFIG
    except grpc.RpcError as exc:
        return report_rpc_error(prog, exc)
    except GptflError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
