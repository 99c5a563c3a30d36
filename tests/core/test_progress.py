"""splice.core.progress: tqdm bars as plain lines off a terminal, quiet for short steps."""

from __future__ import annotations

import io

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
