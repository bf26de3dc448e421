"""Writes bench:1..KEYS through one node, so a benchmark's GETs never miss.

The bench scripts' one prefill: each value is a 200-byte JSON string with a
one-hour ttl and the tag "bench" (unless --no-tags), written one PUT at a
time on one keep-alive connection; any answer but 200 or 201 stops it
(exit 1) naming the key.

    python3 bench/prefill.py http://127.0.0.54:18300 10000
    python3 bench/prefill.py https://127.0.0.62:18300 10000 --ca ca.crt --no-tags
"""

import argparse
import http.client
import ssl
import sys
from urllib.parse import urlsplit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the node's base URL, http:// or https://")
    parser.add_argument("keys", type=int, help="how many keys: bench:1..KEYS")
    parser.add_argument("--ca", help="the CA certificate an https node's is checked against")
    parser.add_argument("--no-tags", action="store_true", help="items without the tag")
    args = parser.parse_args()

    url = urlsplit(args.url)
    if url.scheme == "https":
        context = ssl.create_default_context(cafile=args.ca)
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port)
    tags = "" if args.no_tags else ',"tags":["bench"]'
    body = '{"value":"%s","ttl":3600%s}' % ("v" * 200, tags)
    for i in range(1, args.keys + 1):
        conn.request("PUT", f"/api/v1/cache/bench:{i}", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status not in (200, 201):
            sys.exit(f"prefill: bench:{i} answered {r.status}")


if __name__ == "__main__":
    main()
