"""Python from this checkout as uid/gid 65534 with CAP_NET_RAW and nothing else (least privilege, R6 in
docs/contract.md#reliability).

The checkout may sit under a directory only root can enter (root's home, `mktemp -d`), so uid 65534 is not
given the checkout's own path: the process runs in a private mount namespace where the checkout is
bind-mounted read-only at a fresh directory under /tmp (world-traversable); its cwd, PYTHONPATH and
interpreter are that view. The mount lives and dies with the process; nobody else sees it.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
CAP_NET_RAW_ONLY = "0000000000002000"  # CapEff with bit 13 (CAP_NET_RAW) alone

# Runs as root inside the new mount namespace: $1 the checkout, $2 the view; the rest is the command.
_ENTER_VIEW = 'mount --bind -o ro "$1" "$2" && cd "$2" && export PYTHONPATH="$2" && shift 2 && exec "$@"'


def _python_in(view: Path) -> str:
    """This interpreter as seen through the view (a virtual environment inside the checkout finds its
    site-packages from the interpreter's path); an interpreter outside the checkout as it is."""
    executable = Path(sys.executable).absolute()
    if executable.is_relative_to(ROOT):
        return str(view / executable.relative_to(ROOT))
    return str(executable)


@contextmanager
def python_as_nobody_with_net_raw(*python_args: str) -> Iterator[list[str]]:
    """The command that runs `python *python_args` from the checkout as uid and gid 65534, no supplementary
    groups, CAP_NET_RAW alone (effective, inherited, ambient and bounding), its cwd the checkout's view.
    Start and end the process inside the `with`: the view's directory is removed on exit."""
    view = Path(tempfile.mkdtemp(prefix="havip-view-", dir="/tmp"))
    try:
        view.chmod(0o755)
        caps = ["--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw"]
        yield [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", _ENTER_VIEW, "sh", str(ROOT), str(view),
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *caps,
            _python_in(view), *python_args,
        ]  # fmt: skip
    finally:
        view.rmdir()


def assert_nobody_with_net_raw_only(pid: int) -> None:
    """The process runs as uid 65534 with CAP_NET_RAW as its only effective capability."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[:2] == [str(NOBODY)] * 2, status
    assert fields["CapEff"].strip() == CAP_NET_RAW_ONLY, status
