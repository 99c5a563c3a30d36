"""splice.core.progress: tqdm bars as plain lines off a terminal, quiet for short steps."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys

from splice.core.progress import LineStream, busy, progress


def test_off_a_terminal_each_redraw_is_one_line() -> None:
    out = io.StringIO()
    for _ in progress(range(3), desc="scoring", unit="batch", stream=out, interval=0.0, delay=0.0):
        pass
    lines = out.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"scoring: {i}/3 batch" for i in range(4)]
    assert "\r" not in out.getvalue()


def test_short_steps_print_nothing() -> None:
    out = io.StringIO()
    for _ in progress(range(3), desc="quick", stream=out, delay=3600.0):
        pass
    with busy("converting", stream=out, delay=3600.0):
        pass
    assert out.getvalue() == ""


def test_line_stream_drops_repeats_of_the_final_state() -> None:
    out = io.StringIO()
    stream = LineStream(out)
    for text in ["\rx: 1/2 [00:01]", "\rx: 2/2 [00:02]", "\rx: 2/2 [00:03]", "\n", ""]:
        stream.write(text)
    assert out.getvalue() == "x: 1/2 [00:01]\nx: 2/2 [00:02]\n"
    assert not stream.isatty()



_PIPED = """
import io, sys
import splice.cli
splice.cli.main = lambda argv: 0
splice.cli.entry([])  # stderr is a pipe here: not a terminal
from tqdm.auto import tqdm  # as a library imports it after the program started
from splice.core.progress import busy, progress
library = io.StringIO()
for _ in tqdm(range(3), file=library):
    pass
ours = io.StringIO()
for _ in progress(range(3), desc="scoring", stream=ours, delay=0):
    pass
with busy("converting", stream=ours, delay=0, interval=0.01):
    pass
print(repr(library.getvalue()), repr(ours.getvalue()))
"""


def test_splice_bars_print_where_library_bars_are_disabled() -> None:
    """Off a terminal the splice program sets TQDM_DISABLE for libraries' plain tqdm bars (transformers'
    GGUF conversion redraws with carriage returns into a log); splice's own bars still print lines."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", _PIPED], capture_output=True, text=True, env=env, check=True)
    library, ours = (ast.literal_eval(part) for part in out.stdout.strip().split(" ", 1))
    assert library == ""
    assert "scoring: 3/3" in ours and "\r" not in ours
