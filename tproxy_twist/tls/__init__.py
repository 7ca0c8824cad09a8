"""TLS on intercepted ports: reading the ClientHello, deciding, splicing (and bumping)."""
