"""The candidate's side of a sandboxed run (executed by ``python -I -S`` inside the sandbox).

Standard library only. It holds nothing about the job but the program: it reads the program
and then one call at a time from the request descriptor (``argv[1]``), runs the candidate
function, and answers each call with its return value as plain data (:mod:`_plain`) on the
reply descriptor (``argv[2]``). The tests, their expected values and the verdict live in the
judge, another process (:mod:`_judge`); whatever the program does to this process, all it can
send is a return value. ``argv[3]`` holds the resource limits as JSON.
"""

import builtins
import contextlib
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plain


def main() -> None:  # noqa: C901  (the sandboxed call server imports nothing of ours: one flat dispatch)
    req_fd, rep_fd = int(sys.argv[1]), int(sys.argv[2])
    limits = json.loads(sys.argv[3])
    # Bound now: the program may replace them on the shared modules.
    read, write, encode, decode, exit_ = os.read, os.write, _plain.encode, _plain.decode, os._exit
    streams = (sys.stdout, sys.stderr)
    buffer = bytearray()

    def leave(code: int) -> None:
        for stream in streams:  # the captured output, as far as the program printed it
            with contextlib.suppress(BaseException):
                stream.flush()
        exit_(code)

    def receive() -> object:
        while b"\n" not in buffer:
            chunk = read(req_fd, 1 << 16)
            if not chunk:
                leave(0)  # the judge is done
            buffer.extend(chunk)
        cut = buffer.index(b"\n") + 1
        line = bytes(buffer[:cut])
        del buffer[:cut]
        return decode(line)

    def send(*message: object) -> None:
        try:
            data = encode(message)
        except (TypeError, ValueError, RecursionError) as exc:
            data = encode(("raised", type(exc).__name__, str(exc)[:300]))
        view = memoryview(data)
        while view:
            view = view[write(rep_fd, view) :]

    for name, value in (
        ("RLIMIT_CPU", limits["cpu_s"]),
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_NPROC", limits["processes"]),
        ("RLIMIT_CORE", 0),
    ):
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))

    def stop(exc: BaseException) -> None:
        """End the run on what the program cannot go on after: an exit or no memory left."""
        kind = "exit" if isinstance(exc, SystemExit) else "memory"
        send("error", kind, type(exc).__name__, str(exc)[:300])
        leave(1)

    program, entry = receive()  # type: ignore[misc]
    ns: dict = {"__name__": "__embr_program__", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), ns)  # type: ignore[arg-type]
        candidate = ns.get(entry)  # type: ignore[call-overload]
        if not callable(candidate):
            raise NameError(f"{entry!r} is not defined")
    except (SystemExit, MemoryError) as exc:
        stop(exc)
    except BaseException as exc:
        send("error", "error", type(exc).__name__, str(exc)[:300])
        leave(1)
    send("ready")
    while True:
        args, kwargs = receive()  # type: ignore[misc]
        try:
            value = candidate(*args, **kwargs)  # type: ignore[operator]
        except (SystemExit, MemoryError) as exc:
            stop(exc)
        except BaseException as exc:  # the test sees it raised, as if in-process
            send("raised", type(exc).__name__, str(exc)[:300])
            continue
        send("value", value)


if __name__ == "__main__":
    main()
