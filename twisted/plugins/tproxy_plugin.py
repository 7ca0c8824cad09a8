from twisted.application.service import ServiceMaker

tproxy = ServiceMaker(
    "tproxy-twist",
    "tproxy_twist.tap",
    "Transparent (TPROXY) HTTP proxy with client IP spoofing and Prometheus metrics.",
    "tproxy",
)
