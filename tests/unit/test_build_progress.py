"""The build's progress as people see it: the estimate of the time left (none until the rate
means something), plain lines every 5 % or 30 s in a log, one status line on a terminal that
other lines never run into. All on an injected clock."""

from __future__ import annotations

import io

from launcher.engines.cmake import BuildProgress
from launcher.engines.progress import BuildProgressView, ConsoleLines, TimeLeft, time_left


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_no_estimate_until_enough_time_and_progress() -> None:
    eta = TimeLeft()
    assert eta.seconds(0.0) is None
    eta.update(0.0, 0)
    eta.update(10.0, 5)
    assert eta.seconds(10.0) is None  # 10 s measured: too soon
    eta.update(25.0, 2)  # make prints another target's lower percentage: ignored
    assert eta.seconds(25.0) == 95 * 25 / 5  # 5 % in 25 s
    eta.update(30.0, 10)
    # 10 % in 30 s: 90 % to go is 270 s
    assert eta.seconds(30.0) == 270.0
    eta.update(60.0, 100)
    assert eta.seconds(60.0) == 0.0


def test_percentages_of_an_up_to_date_resumed_build_are_not_a_rate() -> None:
    eta = TimeLeft(settle=3.0)
    eta.update(0.0, 0)
    eta.update(0.5, 40)  # targets already built race by in the first seconds
    eta.update(1.0, 60)
    eta.update(31.0, 70)
    # measured from 60 % at 1 s: 10 % in 30 s, not 70 % in 31 s
    assert eta.seconds(31.0) == 30 * 30 / 10


def test_too_little_progress_gives_no_estimate() -> None:
    eta = TimeLeft(gain=3)
    eta.update(0.0, 0)
    eta.update(120.0, 2)  # one big file in two minutes says little about the rest
    assert eta.seconds(120.0) is None


def test_the_estimate_grows_while_nothing_moves() -> None:
    eta = TimeLeft()
    eta.update(0.0, 0)
    eta.update(60.0, 50)
    assert eta.seconds(60.0) == 60.0
    assert eta.seconds(120.0) == 120.0  # an honest estimate: the rate so far has halved


def test_time_left_reads_in_minutes() -> None:
    assert time_left(45) == "under a minute left"
    assert time_left(250) == "about 4 min left"


def plain_view(step: int = 5, interval: float = 30.0) -> tuple[BuildProgressView, io.StringIO, Clock]:
    out = io.StringIO()
    clock = Clock()
    view = BuildProgressView(ConsoleLines(out, interactive=False), label="engine: ", clock=clock,
                             step=step, interval=interval)
    return view, out, clock


def test_plain_lines_every_five_percent() -> None:
    view, out, clock = plain_view()
    view(BuildProgress("configure", "configuring llama.cpp-0c1e570-native-linux-x86_64"))
    for percent in range(0, 101):
        clock.now += 1.0
        view(BuildProgress("build", f"Building file{percent}.o", percent))
    lines = out.getvalue().splitlines()
    assert lines[0] == "engine: configure: configuring llama.cpp-0c1e570-native-linux-x86_64"
    percents = [int(line.split("[")[1].split("%")[0]) for line in lines[1:]]
    assert percents == list(range(0, 101, 5))
    assert all(line.startswith("engine: [") for line in lines[1:])


def test_plain_lines_every_thirty_seconds_when_percentages_crawl() -> None:
    view, out, clock = plain_view()
    for percent in (0, 1, 1, 2, 2, 3):
        view(BuildProgress("build", "Building big.o", percent))
        clock.now += 16.0  # one percent every 32 s at most
    times = [line.split("] ")[1].split(":")[0] for line in out.getvalue().splitlines()]
    # at 0 s, then the first event 30 s or more after the last line: 32 s, 64 s
    assert times == ["0s", "32s", "1m04s"]


def test_a_line_says_the_time_left_once_there_is_an_estimate() -> None:
    view, out, clock = plain_view()
    view(BuildProgress("build", "Building a.o", 0))
    clock.now += 40.0
    view(BuildProgress("build", "Building b.o", 20))
    clock.now += 20.0
    view(BuildProgress("build", "Linking CXX executable ../bin/llama-server", 100))
    lines = out.getvalue().splitlines()
    assert lines[0] == "engine: [  0%] 0s: Building a.o"
    # 20 % in 40 s: 80 % to go is 160 s
    assert lines[1] == "engine: [ 20%] 40s, about 3 min left: Building b.o"
    assert lines[2] == "engine: [100%] 1m00s: Linking CXX executable ../bin/llama-server"


def test_the_last_line_is_shown_once() -> None:
    view, out, _ = plain_view()
    for message in ("Linking llama-server", "Built target llama-server"):
        view(BuildProgress("build", message, 100))
    view.close()
    assert out.getvalue().count("[100%]") == 1


def test_terminal_status_line_stays_below_other_lines() -> None:
    out = io.StringIO()
    console = ConsoleLines(out, interactive=True, columns=lambda: 40)
    view = BuildProgressView(console, label="engine: ", clock=Clock())
    message = "Building CXX object src/CMakeFiles/llama.dir/llama-model.cpp.o"
    view(BuildProgress("build", message, 42))
    console.line("demo: download  50% of 94.0 MiB")
    view.close()
    clear = "\r\x1b[K"
    status = f"engine: [ 42%] 0s: {message}"[:39]
    assert out.getvalue() == (clear + status  # the status, cut to the terminal's width
                              + clear + "demo: download  50% of 94.0 MiB\n" + status  # redrawn
                              + clear)  # and gone when the build ends


def test_status_is_silent_off_a_terminal() -> None:
    out = io.StringIO()
    console = ConsoleLines(out, interactive=False)
    console.status("engine: [ 42%]")
    console.line("demo: done")
    console.clear_status()
    assert out.getvalue() == "demo: done\n"
