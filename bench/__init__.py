"""The side-by-side benchmark: direct, HAProxy, Squid and tproxy-twist through TPROXY.

Run it with ``bench/run`` (see ``bench/README.md``).
"""
