#!/usr/bin/env python3
"""Publish Owlery envelopes straight into Iggy with the official Python SDK.

Owlery reads them like events published over its HTTP API. Needs `pip install
apache-iggy==0.8.0` (the SDK that speaks Iggy server 0.8's protocol) and an Owlery host
started with `--log iggy` once, so that the stream and topics exist.

    examples/iggy_producer.py --address 127.0.0.1:8090 --count 10

Prints the ids of the events it sent, as one JSON array. `--garbage` also sends one message
that is not an envelope: Owlery logs it with its position, dead-letters it and moves on.
"""

import argparse
import asyncio
import datetime
import json
import os
import sys
import uuid
import zlib

from apache_iggy import IggyClient, SendMessage

TOPIC = "incident-events"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:8090", help="Iggy TCP address")
    parser.add_argument("--username", default="iggy")
    parser.add_argument("--password", default="iggy")
    parser.add_argument("--stream", default="owlery")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--garbage", action="store_true", help="also send one message that is not an envelope")
    args = parser.parse_args()

    client = IggyClient(args.address)
    await client.connect()
    await client.login_user(args.username, args.password)
    partitions = (await client.get_topic(args.stream, TOPIC)).partitions_count

    sent = []
    for i in range(args.count):
        user = f"user-{i % 5}"
        envelope = {
            "eventId": str(uuid.uuid4()),
            "eventType": "incident.created",
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "source": "python-producer",
            "userId": user,
            "metadata": {"producer": "examples/iggy_producer.py"},
            "data": {"id": 9000 + i, "severity": "HIGH", "location": "dock-9"},
        }
        # One user's events go to one partition, so they stay in order.
        partition = zlib.crc32(user.encode()) % partitions
        await client.send_messages(args.stream, TOPIC, partition, [SendMessage(json.dumps(envelope))])
        sent.append(envelope["eventId"])
    if args.garbage:
        await client.send_messages(args.stream, TOPIC, 0, [SendMessage("this is not an envelope")])
    print(json.dumps(sent))
    # apache-iggy 0.8.0 was seen to abort (SIGABRT) while shutting down, after everything was
    # sent and acknowledged and this was printed; leave without that shutdown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
