"""The validation cost of a worker's progress post: parse and validate its body, as
JSON and as a form, and build the job rule's input from it (no HTTP, no store).

    python -m bench.validate_post
"""

from __future__ import annotations

import timeit

from progress_sse import api, inputs, schema

JSON = (b'{"progress": 42.5, "current": 17, "total": 40, "stage": "encode", '
        b'"message": "chunk 17 of 40", "seq": 170000000123, "attempt": 1}')
FORM = b"progress=42.5&current=17&total=40&stage=encode&message=chunk+17+of+40&seq=170000000123"


def parse_json() -> object:
    return api._progress_rule(inputs._validate_json(schema.Progress, JSON))


def parse_form() -> object:
    return api._progress_rule(inputs._validate(schema.Progress, inputs._form(FORM),
                                               strict=False))


def main() -> None:
    for case in (parse_json, parse_form):
        n = 100_000
        best = min(timeit.repeat(case, number=n, repeat=7)) / n
        print(f"{case.__name__}: {best * 1e6:.2f} us per post")


if __name__ == "__main__":
    main()
