import asyncio
import os

import nats


async def main():
    nc = await nats.connect(os.environ["NATS_URL"])
    # Returns once JetStream stored it; `seq` is the event's SSE id.
    ack = await nc.jetstream().publish(
        "events.orders.42", b'{"status":"shipped"}', headers={"Sse-Event": "order.shipped"}
    )
    print(ack.seq)
    await nc.close()


asyncio.run(main())
