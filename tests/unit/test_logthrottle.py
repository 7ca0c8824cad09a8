"""LogThrottle: one line per key per interval, with a count of the rest."""

from twisted.internet.task import Clock

from tproxy_twist.logthrottle import LogThrottle


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def __call__(self, fmt: str, **fields) -> None:
        self.lines.append((fmt, fields))


def test_first_occurrence_is_logged_and_repeats_within_the_interval_are_counted():
    clock, lines = Clock(), Lines()
    throttle = LogThrottle(clock, interval=10)
    assert throttle.emit(lines, "disk", "disk full: {path}", path="/a")
    for _ in range(1000):
        assert not throttle.emit(lines, "disk", "disk full: {path}", path="/a")
    assert len(lines.lines) == 1
    assert throttle.suppressed("disk") == 1000


def test_the_line_after_the_interval_says_how_many_were_suppressed():
    clock, lines = Clock(), Lines()
    throttle = LogThrottle(clock, interval=10)
    throttle.emit(lines, "disk", "disk full")
    throttle.emit(lines, "disk", "disk full")
    throttle.emit(lines, "disk", "disk full")
    clock.advance(10)
    assert throttle.emit(lines, "disk", "disk full")
    fmt, fields = lines.lines[-1]
    assert "{suppressed} more like this" in fmt
    assert fields["suppressed"] == 2
    assert throttle.suppressed("disk") == 0


def test_keys_are_throttled_independently():
    clock, lines = Clock(), Lines()
    throttle = LogThrottle(clock, interval=10)
    assert throttle.emit(lines, "refused", "refused")
    assert throttle.emit(lines, "timeout", "timeout")
    assert not throttle.emit(lines, "refused", "refused")
    assert len(lines.lines) == 2
