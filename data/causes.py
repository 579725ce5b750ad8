"""The exceptions behind an exception: Ray wraps what its tasks and workers raise in its own types (as
`__cause__`, `__context__` or a `cause` attribute), so the error that says what went wrong is found by walking them."""

from __future__ import annotations

from collections.abc import Iterator


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception behind it, each once."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
