"""The open-file limit and how many connections fit in it."""

from __future__ import annotations

import resource

from tproxy_twist.resources import MARGIN, capacity, raise_open_files_limit


def test_max_connections_fits_when_two_descriptors_each_and_the_margin_fit():
    fits = capacity(10_000, 65_536)
    assert (fits.effective, fits.lowered) == (10_000, False)


def test_a_limit_too_low_lowers_max_connections_and_says_the_numbers_and_the_fix():
    low = capacity(10_000, 1024)
    assert low.lowered and low.effective == (1024 - MARGIN) // 2 == 480
    warning = low.warning()
    for text in ("max_connections = 10000", f"{10_000 * 2 + MARGIN} open files", "is 1024",
                 "at most 480 connections", "LimitNOFILE", "lower max_connections"):  # fmt: skip
        assert text in warning


def test_even_a_tiny_limit_leaves_one_connection():
    assert capacity(100, 10).effective == 1


def test_the_soft_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        raised = raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
