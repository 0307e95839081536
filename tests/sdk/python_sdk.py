"""Sends a user's calls to Pulse through Segment's official Python SDK (segment-analytics-python,
unchanged: batches to /v1/batch, key in Basic auth, gzip on) and prints, as one JSON object on
stdout, the message id of each call and the SDK's errors.

    python tests/sdk/python_sdk.py <ingest url> <write key> <user id>
"""

import json
import logging
import sys

from segment.analytics import Client


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: python_sdk.py <ingest url> <write key> <user id>", file=sys.stderr)
        return 2
    host, write_key, user_id = sys.argv[1:]
    errors = []
    client = Client(
        write_key=write_key,
        host=host,
        gzip=True,
        on_error=lambda error, batch: errors.append(f"{error} ({len(batch)} events)"),
    )
    calls = []

    def call(name, fn, *args, **kwargs):
        ok, msg = fn(*args, **kwargs)
        calls.append({"name": name, "messageId": msg["messageId"], "queued": ok})

    call("identify", client.identify, user_id, {"gender": "female", "email": f"{user_id}@example.com"})
    call("page", client.page, user_id, "Shop", "Home", {"url": "https://shop.example/"})
    call("track", client.track, user_id, "Product Added",
         {"product_id": "sku-7", "price": "12.50", "quantity": 2})
    call("track", client.track, user_id, "Order Completed", {"order_id": "o-7", "total": "25.00"})
    call("screen", client.screen, user_id, "App", "Cart")
    call("group", client.group, user_id, "acme")
    call("alias", client.alias, f"anon-{user_id}", user_id)
    client.flush()
    client.join()
    print(json.dumps({"calls": calls, "errors": errors}))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
