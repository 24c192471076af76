"""Running a stage: a user's mistake is one line and exit 2, Ctrl-C one line and exit 130."""
import os
import re
import signal
import sys
from contextlib import contextmanager


def quiet_start():
    """Ctrl-C (or a kill's SIGTERM) while the heavy modules load (a second or more) ends the run
    quietly: nothing has been written yet. run() takes over once they are loaded."""
    def stop(*_):
        sys.stderr.write("\ninterrupted while starting; nothing was written\n")
        os._exit(130)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def torch_pair_problem(torch_version, torchvision_version):
    """Why a torch and a torchvision do not belong together, or None. torchvision 0.(N+15) is
    built for torch 2.N, and both for one platform: two platform tags (+cpu, +cu128) must match,
    and a CPU build goes with no CUDA one (PyPI's Linux wheels, untagged, are CUDA builds)."""
    def release(version):
        public, _, tag = version.partition("+")
        return [int(p) for p in re.findall(r"\d+", public)[:2]], tag
    (t, t_tag), (v, v_tag) = release(torch_version), release(torchvision_version)
    pair = f"torch {torch_version} with torchvision {torchvision_version}"
    if t[0] == 2 and v != [0, t[1] + 15]:
        return f"{pair}: torch 2.{t[1]} takes torchvision 0.{t[1] + 15}"
    platforms = [tag for tag in (t_tag, v_tag) if re.fullmatch(r"cpu|cu\d+|rocm[\d.]*|xpu", tag)]
    if t_tag != v_tag and (len(platforms) == 2 or "cpu" in platforms):  # not a source build's git hash
        return f"{pair}: builds for different platforms ({t_tag or 'untagged'}, {v_tag or 'untagged'})"
    return None


def check_torch_pair():
    """A torchvision that does not belong to its torch fails inside its import with a traceback
    (operator torchvision::nms does not exist): said here in one line, exit 2, before any work.
    The versions are read from the installed metadata, without importing either."""
    from importlib import metadata
    try:
        problem = torch_pair_problem(metadata.version("torch"), metadata.version("torchvision"))
    except metadata.PackageNotFoundError:
        return  # importing it says which one is missing
    if problem:
        print(f"error: {problem}; reinstall them as a pair: pip uninstall -y torch torchvision && "
              "pip install -r requirements.txt", file=sys.stderr)
        sys.exit(2)


def interrupts_as_keyboard_interrupt():
    """From here on both Ctrl-C and SIGTERM raise KeyboardInterrupt."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit code 2, no traceback."""


class Interrupted(Exception):
    """Ctrl-C, after the resumable state has been left in a clean place: exit code 130."""


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


_published = []  # set by publish(): the run's outputs are in place
_last_words = []  # what a run says last (the files it wrote): printed by run() once nothing can interrupt it


def mark_published():
    _published.append(True)


def say_last(text):
    """Print `text` as the run's last line, once main() is over and (from the shell) Ctrl-C is
    ignored: a user who sees it knows that a Ctrl-C now changes nothing."""
    _last_words.append(text)


def run(main):
    """Run a stage's main(): user errors become one line on stderr (exit 2), Ctrl-C one line
    (exit 130). Once main() is over, a script run from the shell ignores Ctrl-C: the
    interpreter's teardown (torch's, threading's) is where a late one would otherwise print a
    traceback, or kill the process without a word, after the outputs were written."""
    code = 0
    _published.clear()
    _last_words.clear()
    try:
        main()
        ending(main)
        for text in _last_words:
            print(text, flush=True)
    except UserError as e:
        ending(main)
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (KeyboardInterrupt, Interrupted) as e:
        ending(main)
        said = str(e) if isinstance(e, Interrupted) and str(e) else (
            "the run had finished; its outputs are written" if _published
            else "the previous outputs are as they were")
        print(f"\ninterrupted: {said}", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    if code:
        sys.exit(code)


def ending(main):
    """The run is over: from the shell, nothing is left for Ctrl-C or SIGTERM to stop. (Python
    keeps an ignored signal ignored through its teardown; a test, an interactive session or
    IPython keeps its handlers.)"""
    if getattr(main, "__module__", None) == "__main__" and not sys.flags.interactive and "IPython" not in sys.modules:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done, then interrupt as usual. (Python runs
    signal handlers in the main thread, whichever thread the signal reached.)"""
    caught = []
    old = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def interrupted_inside(error):
    """True when an exception was raised because of a KeyboardInterrupt inside it (torch.save
    wraps one in a RuntimeError)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False
