"""
The status page for people: C{/status} (HTML), C{/status.json} and
C{tproxy-twist status}, served by the master beside C{/metrics}.

  - L{problems}: the workers' side: the recent upstream errors and
    rejections of each port, told to the master on the status pipe;
  - L{history}: the master's side: the summed metrics, sampled once a second
    into ten-minute rings (off the request path: a page only reads them);
  - L{document}: the JSON document, built from the supervisor, the history
    and the problems;
  - L{page}: the self-contained HTML page with inline SVG sparklines;
  - L{web}: the Twisted resources, and the C{status_allow} check.
"""
